"""Regional compilation: a graph of repeated blocks compiles one block, and computes what the whole
graph does.

Specifications: identical blocks share one compiled function however deep the model is; blocks that
differ in a constant or in their inputs' layout never share; a regionally compiled world generates
exactly what the whole-model compiled one does, with the block-sparse plans and the denoising cache
acting in every block, also when each block is traced once (a nested compile region); the report
says how each graph was cut.
"""

import dataclasses

import pytest
import torch
from torch import nn

import li_compile
from li_compile import inner
from li_compile import regions
from li_compile.regions import MIN_BLOCKS, inputs_key
from li_compile.repeated_blocks import nest_repeated_blocks
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.base import MethodModule
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import configure_for

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
# 4x4-token frames in 16-token blocks: every plan runs the block-sparse kernel
SPARSE = {"block_q": 16, "block_k": 16, "max_density": 1.0}


class Block(nn.Module):
    def __init__(self, width: int, scale: float = 1.0) -> None:
        super().__init__()
        self.qkv, self.out, self.scale = nn.Linear(width, 3 * width), nn.Linear(width, width), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).transpose(1, 3).unbind(2)  # (B, 2 heads, L, d)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.scale * self.out(y)


class Stack(nn.Module):
    def __init__(self, depth: int, width: int = 16, scales: tuple[float, ...] | None = None) -> None:
        super().__init__()
        scales = scales or (1.0,) * depth
        self.embed, self.head = nn.Linear(width, width), nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width, s) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def compiles(monkeypatch):
    """The graphs the (eager) inner compiler is handed, by node count."""
    seen = []

    def counting_eager(gm, example_inputs, mode):
        seen.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setitem(inner.INNER, "eager", counting_eager)
    return seen


def _compiled(model, **options):
    return torch.compile(model, backend="light_interaction", options={"inner": "eager", **options}, fullgraph=True)


@pytest.mark.parametrize("depth", [4, 7])
def test_identical_blocks_compile_once_however_deep_the_model(compiles, depth):
    torch.manual_seed(0)
    model, x = Stack(depth), torch.randn(2, 8, 16)
    torch.testing.assert_close(_compiled(model)(x), model(x), rtol=1e-5, atol=1e-6)
    block_graph = max(compiles)
    assert compiles.count(block_graph) == 1  # one block compiled, reused by the others
    assert len(compiles) == 3  # before the blocks, one block, after them


def test_a_model_with_fewer_blocks_than_the_threshold_compiles_whole(compiles):
    model, x = Stack(MIN_BLOCKS - 1), torch.randn(2, 8, 16)
    torch.testing.assert_close(_compiled(model)(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1


class EmbeddedStack(Stack):
    """``Stack`` with a timestep-style embedding in an ``nn.Sequential`` (Linear, SiLU, Linear)."""

    def __init__(self, depth: int, width: int = 16) -> None:
        super().__init__(depth, width)
        self.embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))


@pytest.mark.parametrize("depth", [MIN_BLOCKS - 2, MIN_BLOCKS])
def test_the_leaves_of_a_sequential_are_not_blocks(compiles, depth):
    """Only indexed modules holding modules of their own count as blocks: the embedding's three
    leaves neither make a shallow model regional nor add to the blocks the report counts."""
    torch.manual_seed(0)
    model, x = EmbeddedStack(depth), torch.randn(2, 8, 16)
    compiled = _compiled(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    rows = [s.reason for s in li_compile.report(compiled).sites if s.kind == "regions"]
    if depth < MIN_BLOCKS:
        assert len(compiles) == 1 and rows == []
    else:
        assert len(compiles) == 3 and rows and rows[0].startswith(f"{depth} repeated blocks")


class RawBlock(nn.Module):
    """A block computing with its own parameters alone (fused weights), no submodules."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x @ self.weight)


def test_blocks_without_submodules_are_blocks_too(compiles):
    torch.manual_seed(0)
    model, x = Stack(1), torch.randn(2, 8, 16)
    model.blocks = nn.ModuleList(RawBlock(16) for _ in range(MIN_BLOCKS + 2))
    compiled = _compiled(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    rows = [s.reason for s in li_compile.report(compiled).sites if s.kind == "regions"]
    assert len(compiles) == 3 and rows[0].startswith(f"{MIN_BLOCKS + 2} repeated blocks")


def test_a_stack_of_torch_transformer_layers_is_cut_into_regions(compiles):
    """``nn.TransformerEncoderLayer`` in eval runs its fused path, calling none of its submodules:
    its layers are blocks by being many of one class in one container."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model, x = nn.TransformerEncoder(layer, MIN_BLOCKS + 1, enable_nested_tensor=False).eval(), torch.randn(2, 8, 16)
    with torch.no_grad():
        compiled = _compiled(model)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    rows = [s.reason for s in li_compile.report(compiled).sites if s.kind == "regions"]
    assert rows and rows[0].startswith(f"{MIN_BLOCKS + 1} repeated blocks")


def test_regional_false_compiles_the_unrolled_graph(compiles):
    model, x = Stack(4), torch.randn(2, 8, 16)
    torch.testing.assert_close(_compiled(model, regional=False)(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1


def test_blocks_that_differ_in_a_constant_compile_apart_and_stay_exact(compiles):
    torch.manual_seed(0)
    model, x = Stack(4, scales=(1.0, 0.5, 1.0, 0.5)), torch.randn(2, 8, 16)
    torch.testing.assert_close(_compiled(model)(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(compiles) == 4  # before, the 1.0 block, the 0.5 block, after


def test_a_region_the_inner_compiler_fails_on_runs_as_written_and_the_report_says_why(monkeypatch):
    def failing_on_blocks(gm, example_inputs, mode):
        if any(n.target is nn.functional.scaled_dot_product_attention or "attention" in str(n.target)
               for n in gm.graph.nodes):
            raise RuntimeError("no kernel for this region")
        return gm.forward

    monkeypatch.setitem(inner.INNER, "eager", failing_on_blocks)
    torch.manual_seed(0)
    model, x = Stack(4), torch.randn(2, 8, 16)
    compiled = _compiled(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    reasons = [s.reason for s in li_compile.report(compiled).sites if s.kind == "regions" and s.status == "skipped"]
    assert reasons == ["inner compiler failed on a region (RuntimeError: no kernel for this region); it runs as written"]


def test_inputs_of_another_layout_never_share_compiled_code():
    x = torch.randn(4, 8)
    same = inputs_key([torch.randn(4, 8)])
    assert inputs_key([x]) == same
    for other in (x.t().contiguous().t(), x.half(), x[1:], x[:, 1:], torch.randn(4, 9)):
        assert inputs_key([other]) != same
    assert inputs_key([x, x]) != inputs_key([x, x.clone()])  # aliasing inputs are their own layout


def test_inductor_compiles_a_regional_stack_to_the_eager_result():
    torch.manual_seed(0)
    model, x = Stack(4), torch.randn(2, 8, 16)
    compiled = torch.compile(model, backend="light_interaction", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "regions"]
    assert site.status == "rewritten" and "4 repeated blocks" in site.reason


def _generation(name: str, regional: bool, sparse_calls, nested: bool = False):
    """A tiny world, two blocks deep, along a loop (revisits hit the cache), every plan sparse;
    ``nested``: its blocks traced once (``nest_repeated_blocks``)."""
    module = WORLDS[name]
    world = module.build(dataclasses.replace(module.PRESETS["tiny"], depth=2, steps=2))
    if nested:
        dit_path = "module." if isinstance(world.model, MethodModule) else ""  # Matrix-Game's model: a DiT method
        assert nest_repeated_blocks(world.model, min_blocks=2) == [dit_path + "blocks"]
    trajectory = trajectories.make("loop", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    options = {"inner": "eager", "regional": regional, "sparsity": SPARSE, "cache": {"reuse_steps": 1}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options,
                                                     fullgraph=True, dynamic=False))
    return generate_with_accelerator(compiled, world, trajectory, sparse_calls)


def generate_with_accelerator(compiled, world, trajectory, sparse_calls):
    """Four chunks of ``trajectory`` by ``compiled`` (``world`` with its model compiled) driven by its
    model's accelerator, counting block-sparse calls afresh: (latents, accelerator)."""
    accelerator = li_compile.accelerator(compiled.model)
    configure_for(accelerator, world, trajectory)
    sparse_calls.clear()
    generation = generate(compiled, trajectory, chunks=4, accelerator=accelerator, decode=False)
    return generation.latents, accelerator


def assert_generates_alike(reference, candidate, sparse_calls):
    """Run two generations (each a callable returning latents and accelerator): the same latents
    (fp32, 1e-5), as many block-sparse kernel calls (some), the same cache decisions (some hits).
    Returns the candidate's accelerator."""
    want, want_acc = reference()
    want_sparse = sum(sparse_calls.values())
    got, got_acc = candidate()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(sparse_calls.values()) == want_sparse > 0
    hits = [[s.values.get("cache") for s in acc.denoise.history] for acc in (want_acc, got_acc)]
    assert hits[0] == hits[1] and "hit" in hits[0]
    return got_acc


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_a_regional_world_generates_what_the_whole_compiled_one_does(name, sparse_calls, monkeypatch):
    """Same latents, same number of block-sparse kernel calls (the plans act in every block), same
    cache hits (the cache acts around the cut graph). The threshold is lowered so that a two-block
    world (quick to run) is cut."""
    monkeypatch.setattr(regions, "MIN_BLOCKS", 2)
    regional_acc = assert_generates_alike(lambda: _generation(name, False, sparse_calls),
                                          lambda: _generation(name, True, sparse_calls), sparse_calls)
    assert any(s.kind == "regions" and s.status == "rewritten" for s in regional_acc.report().sites)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_a_world_with_blocks_traced_once_generates_what_the_plain_one_does(name, sparse_calls, monkeypatch):
    """Blocks as nested compile regions (Dynamo traces one body for all): same latents, as many
    block-sparse kernel calls (the plans act in every call of the one body), the same cache hits."""
    monkeypatch.setattr(regions, "MIN_BLOCKS", 2)
    assert_generates_alike(lambda: _generation(name, True, sparse_calls),
                           lambda: _generation(name, True, sparse_calls, nested=True), sparse_calls)
