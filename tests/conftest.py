"""Run Triton kernels in the interpreter when there is no GPU (read when kernels are first jitted),
and give every test a fresh Dynamo cache."""

import os

import pytest
from hypothesis import settings
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from an empty Dynamo cache: graphs another test left on the same model code
    would otherwise count against the recompile limit and turn on automatic dynamic shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Property tests: the quick profile in CI; LI_HYPOTHESIS_PROFILE=thorough checks far more generated
# graphs and layouts (each property test draws up to 1,000 examples).
settings.register_profile("quick", settings(deadline=None))
settings.register_profile("thorough", settings(max_examples=1000, deadline=None))
settings.load_profile(os.environ.get("LI_HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture
def sparse_calls(monkeypatch):
    """Calls of the block-sparse path of ``li::planned_attention``, counted by the key length of the
    slot they ran (the plans acting: a dense slot never gets here)."""
    import collections

    from li_compile import planned_attention

    calls = collections.Counter()
    original = planned_attention._sparse

    def spy(q, k, v, attn_mask, slot, *rest):
        calls[slot.signature.kv_len] += 1
        return original(q, k, v, attn_mask, slot, *rest)

    monkeypatch.setattr(planned_attention, "_sparse", spy)
    return calls
