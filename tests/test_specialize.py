"""Graphs Dynamo traces with symbolic shapes (``dynamic=None`` at a second shape, ``dynamic=True``).

Specifications: a symbolic graph compiles a static copy per concrete shape, at the first call of
that shape, and equals eager; a shape seen before compiles nothing; a world compiled with
torch.compile's default ``dynamic=None`` generates exactly what ``dynamic=False`` does, with its
attention rewritten in every graph, the plans acting and the cache hitting, in fewer Dynamo traces;
a graph that cannot be specialized (a data-dependent value) compiles as traced with the reason in
the report and still equals eager.
"""

import dataclasses

import torch
from torch import nn
from torch._dynamo.utils import counters

import li_compile
from li_compile.specialize import SPECIALIZE_COUNTER
from li_compile.worlds import hy_worldplay, trajectories
from li_compile.worlds.pipeline import generate, warm_up
from li_compile.worlds.report_tools import configure_for

SPARSE = {"block_q": 16, "block_k": 16, "max_density": 1.0}  # every plan runs the block-sparse kernel


class Attention(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).transpose(1, 3).unbind(2)  # (B, 2 heads, L, d)
        return x + self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _specialized() -> int:
    return counters[SPECIALIZE_COUNTER]["compiled"]


@torch.no_grad()
def test_a_symbolic_graph_compiles_once_per_shape_and_equals_eager():
    torch.manual_seed(0)
    model = Attention()
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, dynamic=True)
    before = _specialized()
    for length in (24, 40, 24):
        x = torch.randn(2, length, 16)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert _specialized() - before == 2  # 24 and 40; the second 24 reuses its copy
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert sites and all(s.status == "rewritten" for s in sites)


@torch.no_grad()
def test_a_graph_that_cannot_be_specialized_compiles_as_traced_with_the_reason():
    class Scaled(Attention):
        def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * gain.item()  # a data-dependent value: fake tensors cannot know it

    torch.manual_seed(0)
    model, gain = Scaled(), torch.tensor(0.5)
    torch._dynamo.config.capture_scalar_outputs = True
    try:
        compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, dynamic=True)
        for length in (24, 40):
            x = torch.randn(2, length, 16)
            torch.testing.assert_close(compiled(x, gain), model(x, gain), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.config.capture_scalar_outputs = False
    (graph_site,) = [s for s in li_compile.report(compiled).sites if s.kind == "graph"]
    assert graph_site.status == "skipped" and "not specialized" in graph_site.reason and "dynamic=False" in graph_site.reason


@torch.no_grad()
def test_an_int_that_is_no_size_compiles_at_most_recompile_limit_copies_then_runs_as_traced():
    """An int argument that changes every call (a step counter) is symbolic under ``dynamic=None``;
    each value is a shape of its own, so past Dynamo's ``recompile_limit`` static copies the graph runs
    compiled as traced, with the reason in the report, and still equals eager."""
    def scaled(x, step: int):
        return nn.functional.scaled_dot_product_attention(x, x, x) * (step + 1)

    compiled = torch.compile(scaled, backend="light_interaction", options={"inner": "eager"})
    x = torch.randn(1, 2, 16, 8)
    before = _specialized()
    for step in range(3 * torch._dynamo.config.recompile_limit):
        torch.testing.assert_close(compiled(x, step), scaled(x, step), rtol=1e-5, atol=1e-5)
    assert _specialized() - before <= torch._dynamo.config.recompile_limit
    reasons = [s.reason for s in li_compile.report(compiled).sites if s.kind == "graph" and s.status == "skipped"]
    assert any("recompile_limit" in r for r in reasons)


@torch.no_grad()
@torch._dynamo.config.patch(recompile_limit=1)  # (not monkeypatch: undoing it deletes a config entry)
def test_past_the_limit_or_unspecializable_a_graph_runs_as_traced_for_every_later_shape():
    """With the default inner compiler (Inductor), the graph run as traced is not compiled for the
    call that reached it: every later shape and int value still equals eager (a first call's concrete
    inputs made Inductor specialize to them), and a graph that reads ``.item()`` runs at all."""
    def scaled(x, step: int):
        return nn.functional.scaled_dot_product_attention(x, x, x) * (step + 1)

    compiled = torch.compile(scaled, backend="light_interaction", dynamic=True)
    for length, step in ((16, 0), (24, 1), (32, 2), (24, 5)):
        x = torch.randn(1, 2, length, 8)
        torch.testing.assert_close(compiled(x, step), scaled(x, step), rtol=1e-5, atol=1e-5)
    traced = [c for c in li_compile.report(compiled).compilations if any(s.kind == "graph" for s in c.sites)]
    assert traced and all(c.inner == "eager" for c in traced)  # the report names what ran it

    def item_scaled(x, gain):
        return nn.functional.scaled_dot_product_attention(x, x, x) * gain.item()

    torch._dynamo.config.capture_scalar_outputs = True
    try:
        compiled = torch.compile(item_scaled, backend="light_interaction", dynamic=True)
        for length, gain in ((16, 1.0), (24, 3.0)):
            x, g = torch.randn(1, 2, length, 8), torch.tensor(gain)
            torch.testing.assert_close(compiled(x, g), item_scaled(x, g), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.config.capture_scalar_outputs = False


@torch.no_grad()
def test_a_vmap_inside_a_symbolic_graph_keeps_its_level_bookkeeping():
    """``torch.vmap`` enters and leaves its level through calls that return an int: a static copy keeps
    them (folding them away crashed), at every shape."""
    def rows(x, w):
        return torch.vmap(lambda row: (row * w).sum())(x)

    compiled = torch.compile(rows, backend="light_interaction", options={"inner": "eager"}, dynamic=True)
    for length in (3, 5):
        x, w = torch.randn(length, 4), torch.randn(4)
        torch.testing.assert_close(compiled(x, w), rows(x, w), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_flex_block_mask_passed_in_is_rewritten_at_every_shape_of_a_symbolic_graph():
    """A BlockMask made outside the compiled function reaches a symbolic graph with its sequence
    lengths as int inputs: the static copy reads them as constants, so the flex site (and the SDPA
    site beside it) are rewritten at each shape, equal to eager."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def attend(q, block_mask):
        return flex_attention(q, q, q, block_mask=block_mask) + nn.functional.scaled_dot_product_attention(q, q, q)

    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"}, dynamic=True)
    for length in (64, 96):
        q = torch.randn(1, 2, length, 16)
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, length, length, device="cpu", BLOCK_SIZE=32)
        torch.testing.assert_close(compiled(q, mask), attend(q, mask), rtol=1e-5, atol=1e-5)
        sites = [s for s in li_compile.report(compiled).sites if s.kind in ("attention", "graph")][-2:]
        assert [s.status for s in sites] == ["rewritten", "rewritten"], sites


def _generation(dynamic, sparse_calls):
    """The tiny HY world, two blocks deep, along a loop (revisits hit the cache), every plan sparse."""
    world = hy_worldplay.build(dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=2, steps=2))
    trajectory = trajectories.make("loop", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    options = {"inner": "eager", "sparsity": SPARSE, "cache": {"reuse_steps": 1}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=dynamic))
    accelerator = li_compile.accelerator(compiled.model)
    configure_for(accelerator, world, trajectory)
    frames = counters["frames"]["ok"]
    warm_up(compiled, accelerator.controller.warm_up_buckets())  # every capacity bucket, as a deployment would
    sparse_calls.clear()
    generation = generate(compiled, trajectory, chunks=4, accelerator=accelerator, decode=False)
    return generation.latents, accelerator, counters["frames"]["ok"] - frames


def test_a_world_under_the_default_dynamic_generates_what_a_static_one_does(sparse_calls):
    """Same latents, as many block-sparse kernel calls, the same cache hits; every graph's
    self-attention rewritten; fewer Dynamo traces (the symbolic one serves several capacities)."""
    static, static_acc, static_traces = _generation(False, sparse_calls)
    static_sparse = sum(sparse_calls.values())
    specialized_before = _specialized()
    default, default_acc, default_traces = _generation(None, sparse_calls)
    torch.testing.assert_close(default, static, rtol=1e-5, atol=1e-5)
    assert sum(sparse_calls.values()) == static_sparse > 0
    hits = [[s.values.get("cache") for s in acc.denoise.history] for acc in (static_acc, default_acc)]
    assert hits[0] == hits[1] and "hit" in hits[0]
    assert _specialized() > specialized_before and default_traces < static_traces
    sites = default_acc.report().sites
    assert not any(s.kind == "attention" and "symbolic" in (s.reason or "") for s in sites)
