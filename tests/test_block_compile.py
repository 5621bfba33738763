"""Compiling only the repeated blocks (``li_compile.compile_repeated_blocks``): Dynamo traces one block
for every block of a shape, the model's top level stays eager, and a world compiled this way, behind
the cache at its call boundary, generates what the whole-model compiled world does, with the plans
acting in every block and the same cache hits. Each model keeps its own accelerator."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import li_compile
from li_compile import regions
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.base import MethodModule

from test_regions import SPARSE, Stack, assert_generates_alike, generate_with_accelerator

FORMS = ("hy_worldplay", "hy_worldplay_cached", "matrix_game3", "matrix_game3_cached")
OPTIONS = {"inner": "eager", "sparsity": SPARSE, "cache": {"reuse_steps": 1}}


def _tiny(name: str):
    """A tiny world two blocks deep; ``hy_worldplay_cached``: HY in its KV-cache form, whose model is a
    method of the DiT; ``matrix_game3_cached``: Matrix-Game in its KV-cache form, whose model is a method
    too (``matrix_game3``: upstream's full-sequence form, the default)."""
    module = matrix_game3 if name.startswith("matrix_game3") else hy_worldplay
    spec = dataclasses.replace(module.PRESETS["tiny"], depth=2, steps=2)
    if name == "hy_worldplay_cached":
        return hy_worldplay.build(dataclasses.replace(spec, block_causal=True), form="cached")
    if name == "matrix_game3_cached":
        return matrix_game3.build(spec, form="cached")
    return module.build(spec)


def test_dynamo_traces_one_block_for_every_block_of_a_shape():
    torch.manual_seed(0)
    model = Stack(6)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        want = model(x)
        assert li_compile.compile_repeated_blocks(model, {"inner": "eager"}) is model
        frames = counters["frames"]["ok"]
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        assert counters["frames"]["ok"] - frames == 1  # six blocks, one trace
        model(torch.randn(2, 12, 16))  # another sequence length: one more trace
    assert counters["frames"]["ok"] - frames == 2
    (site,) = [s for s in li_compile.report(model).sites if s.kind == "attention"][:1]
    assert site.status == "rewritten"


def test_each_model_runs_its_blocks_with_its_own_accelerator():
    a, b = Stack(4), Stack(4)
    for model in (a, b):
        li_compile.compile_repeated_blocks(model, {"inner": "eager"})
        with torch.no_grad():
            model(torch.randn(1, 8, 16))
    assert li_compile.accelerator(a) is not li_compile.accelerator(b)
    slots = [list(li_compile.accelerator(m).plan) for m in (a, b)]
    assert slots[0] and slots[1] and not {id(s) for s in slots[0]} & {id(s) for s in slots[1]}


def test_a_model_without_repeated_blocks_or_compiled_with_other_options_is_refused():
    with pytest.raises(ValueError, match="no nn.ModuleList of 4 or more blocks"):
        li_compile.compile_repeated_blocks(Stack(3))
    model = Stack(4)
    li_compile.compile_repeated_blocks(model, {"inner": "eager"})
    assert li_compile.compile_repeated_blocks(model, {"inner": "eager"}) is model  # the same options: as is
    with pytest.raises(ValueError, match="already compiled with other options"):
        li_compile.compile_repeated_blocks(model, {"inner": "eager", "sparsity": {"enabled": False}})
    for other in ({"dynamic": None}, {"min_blocks": 2}, {"mode": "max-autotune-no-cudagraphs"}):
        with pytest.raises(ValueError, match="already compiled with other options or settings"):
            li_compile.compile_repeated_blocks(model, {"inner": "eager"}, **other)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copy_of_a_block_compiled_model_is_eager_until_its_blocks_are_compiled_again(copier):
    """As for any module compiled in place, a deep copy or a pickle of the model drops its blocks'
    compiled calls: it is an eager model (``li_compile.accelerator`` refuses it), and compiling its
    blocks gives it an accelerator and plan slots of its own."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = li_compile.compile_repeated_blocks(Stack(4), {"inner": "eager"})
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model) if copier == "deepcopy" else pickle.loads(pickle.dumps(model))
    with pytest.raises(ValueError, match="was not compiled by torch.compile"):
        li_compile.accelerator(twin)
    assert li_compile.compile_repeated_blocks(twin, {"inner": "eager"}) is twin
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-5)
    assert li_compile.accelerator(twin) is not li_compile.accelerator(model)
    assert not {id(s) for s in li_compile.accelerator(twin).plan} & {id(s) for s in li_compile.accelerator(model).plan}
    assert all(block._compiled_call_impl is not None for block in twin.blocks)


def test_row_blocks_under_a_torch_whose_module_compile_keeps_no_compiled_call_is_refused(monkeypatch):
    """``context.row_blocks`` wraps the call ``nn.Module.compile`` keeps (``_compiled_call_impl``, a
    private attribute of torch 2.11 and 2.13): where a torch keeps none, compiling says so."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="context.row_blocks wraps the call .* turn context.row_blocks off"):
        li_compile.compile_repeated_blocks(Stack(4), {"inner": "eager", "context": {"row_blocks": True}})


def _generation(name: str, blocks_only: bool, sparse_calls):
    """A tiny world, two blocks deep, along a loop (revisits hit the cache), every plan sparse: the
    whole model compiled, or only its blocks with the model behind ``li_compile.cached``."""
    world = _tiny(name)
    trajectory = trajectories.make("loop", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    if blocks_only:
        li_compile.compile_repeated_blocks(world.model, OPTIONS, min_blocks=2)
        compiled = world.compile(lambda m: m)  # the encoder's blocks are the model's: compiled already
        compiled.model = li_compile.cached(world.model, latent="x", timestep="sigma")
    else:
        compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=OPTIONS,
                                                         fullgraph=True, dynamic=False))
    return generate_with_accelerator(compiled, world, trajectory, sparse_calls)


@pytest.mark.parametrize("name", FORMS)
def test_a_world_with_only_its_blocks_compiled_generates_what_the_whole_compiled_one_does(name, sparse_calls,
                                                                                          monkeypatch):
    """Same latents, as many block-sparse kernel calls (the plans act in every block), the same cache
    hits (served at the model's call boundary). The region threshold is lowered so that the whole
    two-block model is cut into regions too."""
    monkeypatch.setattr(regions, "MIN_BLOCKS", 2)
    assert_generates_alike(lambda: _generation(name, False, sparse_calls),
                           lambda: _generation(name, True, sparse_calls), sparse_calls)


@pytest.mark.parametrize("through_cached", [False, True])
def test_blocks_compiled_without_the_boundary_cache_report_why_the_cache_never_acts(through_cached, sparse_calls):
    """Only the blocks compiled, the model called directly: no graph holds a denoiser call, so the
    cache never acts, and the report says so and what to do (``li_compile.cached``); behind it, the
    cache acts and the report says nothing of the kind."""
    world = _tiny("hy_worldplay")
    trajectory = trajectories.make("loop", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    li_compile.compile_repeated_blocks(world.model, OPTIONS, min_blocks=2)
    compiled = world.compile(lambda m: m)
    if through_cached:
        compiled.model = li_compile.cached(world.model, latent="x", timestep="sigma")
    _, acc = generate_with_accelerator(compiled, world, trajectory, sparse_calls)
    report = acc.report()
    if through_cached:
        assert report.cache_idle is None and "hit" in [c.values["cache"] for c in report.chunks]
    else:
        assert {c.values["cache"] for c in report.chunks} == {"off"}
        assert "li_compile.cached" in report.cache_idle and "li_compile.cached" in str(report)


def _dit(model: torch.nn.Module) -> torch.nn.Module:
    """The DiT a world's model runs (unwrapped from ``li_compile.cached`` and from ``MethodModule``)."""
    model = model.compiled if isinstance(model, li_compile.CachedCalls) else model
    return model.module if isinstance(model, MethodModule) else model


@pytest.mark.parametrize("name", FORMS)
def test_the_benchmark_compiles_blocks_on_a_copy_that_shares_the_weights(name):
    from li_compile.worlds.report_tools import dense_setup, light_interaction_setup

    world = _tiny(name)
    for setup in (light_interaction_setup(world, {"inner": "eager"}, blocks=True), dense_setup(world, blocks=True)):
        dit = _dit(setup.world.model)
        mine, theirs = list(dit.parameters()), list(world.model.parameters())
        assert dit is not world.model and len(mine) == len(theirs) and all(p is q for p, q in zip(mine, theirs))
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in dit.blocks)
        if hasattr(setup.world, "encoder"):
            assert setup.world.encoder.module is dit  # the context pass runs the compiled blocks too
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in _dit(world.model).blocks)  # the world's own: eager
