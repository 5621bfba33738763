"""Run Triton kernels in the interpreter when there is no GPU (read when kernels are first jitted),
and give every test a fresh Dynamo cache."""

import os

import pytest
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
