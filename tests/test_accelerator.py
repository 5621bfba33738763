"""One accelerator per compiled model: two models in one process never see each other's plans,
cache entries or statistics, even when Dynamo shares one compiled graph between them."""

import dataclasses
import itertools

import pytest
import torch

import li_compile
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.pipeline import chunk_noise, gather_context
from li_compile.worlds.sampling import sampler_update

CHUNKS = 5
OPTIONS = {"inner": "eager", "sparsity": {"block_q": 16, "block_k": 16, "max_density": 1.0},
           "context": {"keep_threshold": 0.6, "window_min": 1}, "cache": {"reuse_steps": 1}}


def tiny(module, seed: int = 0):
    spec = dataclasses.replace(module.PRESETS["tiny"], depth=1, steps=2)
    return module.build(spec, seed=seed)


def accelerated(world, trajectory):
    options = {**OPTIONS, "context": {**OPTIONS["context"], "window_max": world.spec.window}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    accelerator.reset()  # the model's accelerator outlives a run: start each from an empty cache
    accelerator.configure(memory_k=world.spec.memory, fov_y_deg=trajectory.fov_y_deg, layout=world.layout,
                          revisit_inputs=world.revisit_inputs)
    return compiled, accelerator


def chunk_loop(world, accelerator, trajectory, out: list):
    """The README's loop over ``CHUNKS`` chunks, pausing (yield) after every model call; the clean
    latents of every chunk are appended to ``out``."""
    spec = world.spec
    poses, actions = trajectory.poses.float(), trajectory.actions()
    sigmas = spec.sigmas()
    history = torch.zeros(CHUNKS * spec.chunk_frames, *spec.latent_shape)
    for c in range(CHUNKS):
        first = c * spec.chunk_frames
        chunk_poses = poses[first:first + spec.chunk_frames]
        with accelerator.chunk(c, poses[:first], chunk_poses, history[:first], sigmas) as chunk:
            context = gather_context(history[:first], poses[:first], chunk.selection, chunk.capacity)
            inputs = world.inputs(context, chunk_poses, actions[first:first + spec.chunk_frames], first)
            noise = chunk_noise(world, c, 0)
            x = noise[0]
            for s in range(spec.steps):
                chunk.step(s)
                with torch.no_grad():
                    v = world.model(x, sigmas[s], **inputs)
                x = sampler_update(spec.sampler, x, v, sigmas[s], sigmas[s + 1], noise[s + 1])
                yield
        history[first:first + spec.chunk_frames] = x[0]
        out.append(x[0].clone())


def alone(world, trajectory):
    torch._dynamo.reset()
    compiled, accelerator = accelerated(world, trajectory)
    out = []
    for _ in chunk_loop(compiled, accelerator, trajectory, out):
        pass
    return torch.cat(out), accelerator.report()


@pytest.mark.parametrize("pair", ["hy+matrix_game3", "hy seed 0+hy seed 1"])
def test_two_models_interleaved_match_their_own_single_runs_and_reports(pair):
    """Two different worlds, or two instances of one class (whose calls share one compiled graph),
    run call by call interleaved: each output equals its single-model run (fp32 rounding), each report
    lists only its own graphs and chunks."""
    def make():  # the same weights each time, and models (so accelerators) of their own
        return ([tiny(hy_worldplay), tiny(matrix_game3)] if pair.startswith("hy+")
                else [tiny(hy_worldplay, 0), tiny(hy_worldplay, 1)])

    trajectory = trajectories.make("loop", CHUNKS * make()[0].spec.chunk_frames)
    single = [alone(w, trajectory) for w in make()]
    torch._dynamo.reset()
    runs = [accelerated(w, trajectory) for w in make()]
    outs: list[list] = [[], []]
    loops = [chunk_loop(c, a, trajectory, o) for (c, a), o in zip(runs, outs)]
    for _ in itertools.zip_longest(*loops):
        pass
    for (expected, report), (_, accelerator), got in zip(single, runs, outs):
        torch.testing.assert_close(torch.cat(got), expected, rtol=1e-5, atol=1e-5)  # a leak would be O(1)
        mine = accelerator.report()
        assert [c.chunk for c in mine.chunks] == list(range(CHUNKS))
        decisions = ("memory_kept", "memory_dropped", "capacity", "cache", "steps_reused")
        assert [[c.values[k] for k in decisions] for c in mine.chunks] == [
            [c.values[k] for k in decisions] for c in report.chunks]
    assert runs[0][1] is not runs[1][1]
    assert {s.id for s in runs[0][1].plan}.isdisjoint({s.id for s in runs[1][1].plan})
    assert any(c.values.get("plan") == "sparse" for c in runs[0][1].report().chunks)  # plans were live


def test_a_copied_model_gets_an_accelerator_of_its_own():
    import copy

    world = tiny(hy_worldplay)
    compiled = torch.compile(world.model, backend="light_interaction", options=OPTIONS, dynamic=False)
    twin = copy.deepcopy(world.model)
    compiled_twin = torch.compile(twin, backend="light_interaction", options=OPTIONS, dynamic=False)
    assert li_compile.accelerator(compiled) is not li_compile.accelerator(compiled_twin)
    assert li_compile.accelerator(compiled) is li_compile.accelerator(
        torch.compile(world.model, backend="light_interaction", options=OPTIONS, dynamic=False))


class MethodDenoiser(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def denoise(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).transpose(1, 3).unbind(2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Pipeline:
    """Not a module: a pipeline object holding the model, whose method is compiled."""

    def __init__(self) -> None:
        self.model = MethodDenoiser()

    def denoise(self, x):
        return self.model.denoise(x)


class SlottedPipeline:
    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model = MethodDenoiser()

    def denoise(self, x):
        return self.model.denoise(x)


def test_a_compiled_method_of_an_object_that_holds_no_attributes_is_refused_naming_why():
    pipeline = SlottedPipeline()
    compiled = torch.compile(pipeline.denoise, backend="light_interaction", options=OPTIONS)
    with pytest.raises(Exception, match="SlottedPipeline instances hold no attributes"), torch.no_grad():
        compiled(torch.randn(1, 8, 16))


@pytest.mark.parametrize("owner", [MethodDenoiser, Pipeline])
def test_a_compiled_method_gets_its_owners_accelerator_the_one_its_graphs_run_with(owner):
    """``torch.compile(model.denoise)`` or ``torch.compile(pipeline.denoise)``: the accelerator is the
    instance's (the graphs run with it), one per instance, not one on the class's function."""
    first, second = owner(), owner()
    compiled = torch.compile(first.denoise, backend="light_interaction", options=OPTIONS)
    other = torch.compile(second.denoise, backend="light_interaction", options=OPTIONS)
    with torch.no_grad():
        compiled(torch.randn(1, 8, 16))
    acc = li_compile.accelerator(compiled)
    assert acc is not li_compile.accelerator(other)
    assert acc.plan.slots_for(q_len=8) and not li_compile.accelerator(other).plan.slots_for(q_len=8)
    assert [s.status for s in li_compile.report(compiled).sites if s.kind == "attention"] == ["rewritten"]


def test_the_accelerator_needs_a_light_interaction_compile():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="backend='light_interaction'"):
        li_compile.accelerator(torch.compile(model, backend="eager"))
    with pytest.raises(ValueError, match="was not compiled by torch.compile"):
        li_compile.accelerator(model)
    with pytest.raises(ValueError, match="configure"):
        li_compile.accelerator(torch.compile(model, backend="light_interaction")).warm_up(lambda capacity: None)


def test_a_chunks_plan_holds_inside_its_scope_only():
    """Outside ``accelerator.chunk(...)`` every plan slot is dense: a later call with another context
    can never run the last chunk's plan."""
    world = tiny(hy_worldplay)
    trajectory = trajectories.make("loop", CHUNKS * world.spec.chunk_frames)
    compiled, accelerator = accelerated(world, trajectory)
    out, sparse_inside = [], []
    for _ in chunk_loop(compiled, accelerator, trajectory, out):  # pauses after every model call
        sparse_inside.append(any(not slot.is_dense for slot in accelerator.plan))
    assert any(sparse_inside)  # some chunk ran a sparse plan ...
    assert len(out) == CHUNKS and all(slot.is_dense for slot in accelerator.plan)  # ... and none outlives it


def _opened_once(trajectory_chunks: int = 3):
    """A tiny HY world compiled and run through ``trajectory_chunks`` chunks (its plan slots made)."""
    world = tiny(hy_worldplay)
    trajectory = trajectories.make("loop", CHUNKS * world.spec.chunk_frames)
    compiled, accelerator = accelerated(world, trajectory)
    for _ in chunk_loop(compiled, accelerator, trajectory, []):
        pass
    return world, trajectory, accelerator


def _scope(world, trajectory, accelerator, chunk: int, sigmas=None):
    frames = world.spec.chunk_frames
    first = chunk * frames
    poses = trajectory.poses.float()
    history = torch.zeros(first, *world.spec.latent_shape)
    return accelerator.chunk(chunk, poses[:first], poses[first:first + frames], history,
                             world.spec.sigmas() if sigmas is None else sigmas)


@pytest.mark.parametrize("sigmas", [[1.0, float("nan")], [0.5]])
def test_a_chunk_that_fails_to_open_leaves_no_plan_and_no_statistics(sigmas):
    """The sigmas are checked before anything is planned, and whatever fails while the scope opens
    leaves the plan slots dense: a later call outside a chunk runs dense, as documented."""
    world, trajectory, accelerator = _opened_once()
    planned = len(accelerator.controller.stats)
    with pytest.raises(ValueError, match="sigmas"):
        with _scope(world, trajectory, accelerator, 3, sigmas):
            pass
    assert all(slot.is_dense for slot in accelerator.plan)
    assert len(accelerator.controller.stats) == planned and accelerator.open_chunk is None


def test_a_chunk_whose_planning_fails_leaves_the_plan_slots_dense(monkeypatch):
    world, trajectory, accelerator = _opened_once()
    select = accelerator.controller.select

    def select_then_fail(*args):
        select(*args)  # writes the plans, then something fails before the chunk opens
        raise RuntimeError("out of memory")

    monkeypatch.setattr(accelerator.controller, "select", select_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        with _scope(world, trajectory, accelerator, 3):
            pass
    assert all(slot.is_dense for slot in accelerator.plan) and not accelerator.denoise.active


def test_chunk_scopes_do_not_nest():
    world, trajectory, accelerator = _opened_once()
    with _scope(world, trajectory, accelerator, 3):
        with pytest.raises(RuntimeError, match="chunk 3 is open: chunk scopes do not nest"):
            with _scope(world, trajectory, accelerator, 4):
                pass
        assert accelerator.denoise.active  # the outer chunk is untouched
    assert accelerator.open_chunk is None


def test_reset_inside_a_chunk_scope_closes_the_chunk_and_the_scope_exits_cleanly():
    world, trajectory, accelerator = _opened_once()
    with _scope(world, trajectory, accelerator, 3) as chunk:
        chunk.step(0)
        accelerator.reset()  # e.g. after a write through .data in the middle of the chunk
        assert not accelerator.denoise.active and all(slot.is_dense for slot in accelerator.plan)
        chunk.step(1)  # the loop goes on: its remaining calls run dense, without the cache
    with _scope(world, trajectory, accelerator, 4):
        assert accelerator.denoise.active


def test_reset_inside_a_chunk_whose_reused_rows_went_wrong_raises_after_forgetting_everything():
    """The chunk a reset closes may have an output that reusing context rows made wrong: the reset
    raises that error, but only once the plans are dense again and the statistics and the probe's
    verdict are forgotten (a later call outside a chunk runs dense)."""
    world, trajectory, accelerator = _opened_once()
    with _scope(world, trajectory, accelerator, 3) as chunk:
        chunk.step(0)
        assert not all(slot.is_dense for slot in accelerator.plan)
        accelerator.context_rows.verdict = True
        accelerator.context_rows.lose("a block call found nothing kept")
        with pytest.raises(RuntimeError, match="a block call found nothing kept"):
            accelerator.reset()
        assert all(slot.is_dense for slot in accelerator.plan)
        assert accelerator.context_rows.verdict is None and not accelerator.context_rows.history
        assert not accelerator.controller.stats and not accelerator.denoise.active
        chunk.step(1)
    with _scope(world, trajectory, accelerator, 4):
        assert accelerator.denoise.active


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_chunk_with_poses_in_a_half_type_plans_as_with_float32_ones(dtype):
    """Cameras in fp16 or bf16 pass the scope's check within their rounding, and the tile plan, which
    checks them again, sees the nearest rigid poses: the chunk opens and plans alike."""
    world, trajectory, accelerator = _opened_once()
    frames, first = world.spec.chunk_frames, 3 * world.spec.chunk_frames
    poses, history = trajectory.poses.float(), torch.zeros(first, *world.spec.latent_shape)
    plans = []
    for cast in (lambda p: p, lambda p: p.to(dtype)):
        with accelerator.chunk(3, cast(poses[:first]), cast(poses[first:first + frames]), history,
                               world.spec.sigmas()):
            plans.append([slot.is_dense for slot in accelerator.plan])
            plans.append(accelerator.controller.stats[-1].values["plan"])
    assert plans[0] == plans[2] and plans[1] == plans[3] and not all(plans[0])


def test_an_interrupted_chunk_keeps_none_of_its_outputs_in_the_cache():
    world, trajectory, accelerator = _opened_once()
    accelerator.reset()
    entries = []
    with pytest.raises(KeyboardInterrupt):
        with _scope(world, trajectory, accelerator, 0), torch.no_grad():
            accelerator.denoise.step("runner", lambda: "key", torch.zeros(1, 2), lambda: torch.ones(1, 2), step=0)
            entries.append(len(accelerator.denoise.cache))
            raise KeyboardInterrupt
    assert entries == [1] and len(accelerator.denoise.cache) == 0
    assert accelerator.denoise.history[-1].values["cache"] == "interrupted"

