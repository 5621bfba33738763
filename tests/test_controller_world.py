"""The controller driving the tiny reference worlds, compiled with light_interaction.

Specifications: a 64-chunk trajectory with pruning active compiles once per capacity bucket during
warm-up and never after (no graph break: fullgraph); pruned frames never reach attention; with
thresholds that keep everything the controller reproduces dense generation.
"""

import dataclasses

import pytest
import torch

import li_compile
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.report_tools import light_interaction_setup
from li_compile.worlds.pipeline import DENSE_MEASURE, ContextSelection, DensePolicy, gather_context, generate, warm_up

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
BACKEND_OPTIONS = {"inner": "eager", "sparsity": {"block_q": 16, "block_k": 16, "max_density": 1.0}}  # 4x4-token frames; every plan runs sparse
PRUNING_THRESHOLD = 0.6  # on the tiny loop trajectory this drops memory frames on most chunks


def _world(name: str, **spec_changes):
    """The tiny preset, one block deep and two sampler steps: the structure is what is tested."""
    module = WORLDS[name]
    spec = dataclasses.replace(module.PRESETS["tiny"], **{"depth": 1, "steps": 2, **spec_changes})
    return module.build(spec)


def _accelerated(world, trajectory, capacity_fractions=None, **context):
    """``world`` compiled with the backend (fullgraph, static) and its model's accelerator, configured
    with these context options (the denoising cache off: these tests are about the context)."""
    spec = world.spec
    options = {**BACKEND_OPTIONS, "cache": {"enabled": False}, "context": {
        "window_min": 1, "window_max": spec.window, "keep_threshold": PRUNING_THRESHOLD, **context}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options,
                                                     fullgraph=True, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    buckets = {} if capacity_fractions is None else {"capacity_fractions": capacity_fractions}
    accelerator.configure(memory_k=spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                          layout=world.layout, **buckets)
    return compiled, accelerator


def test_a_long_run_with_pruning_compiles_once_per_bucket_during_warm_up():
    world = _world("hy_worldplay", steps=1)
    trajectory = trajectories.make("loop", 24 * world.spec.chunk_frames)
    # one bucket per context size: compaction fits exactly and the plan stays dense, so the long run
    # avoids the (slow, interpreted) kernel; chunk 0 (no context, one padded slot) runs it sparse
    compiled, accelerator = _accelerated(world, trajectory, capacity_fractions=tuple(i / 6 for i in range(1, 7)))
    controller = accelerator.controller
    warm_up(compiled, controller.warm_up_buckets())
    warm = len(accelerator.compilations)  # graphs the backend compiled for this model
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(compiled, trajectory, chunks=24, accelerator=accelerator, decode=False)
    controller.flush_fallbacks()
    assert warm == len(controller.warm_up_buckets()) == 6
    assert len(accelerator.compilations) == warm
    stats = [s.values for s in controller.stats]
    assert sum(s["memory_dropped"] for s in stats) > 0  # pruning was active
    assert len({s["capacity"] for s in stats}) > 1  # and the compact context changed size
    assert stats[0]["plan"] == "sparse"  # a plan written in place, not a recompile
    assert not any("fallbacks" in s for s in stats)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_pruned_frames_never_reach_attention(name):
    world = _world(name)
    spec = world.spec
    trajectory = trajectories.make("loop", 12 * spec.chunk_frames)
    # one full-size bucket: the frames pruned by the threshold leave padding that the plan skips
    # (never filled with other memory frames here: that is what this test must see)
    compiled, accelerator = _accelerated(world, trajectory, window_rule="fixed", window_max=1,
                                         capacity_fractions=(1.0,), fill_density=1.0)
    first = 10 * spec.chunk_frames
    history = torch.randn(first, *spec.latent_shape, generator=torch.Generator().manual_seed(0))
    poses, chunk_poses = trajectory.poses[:first], trajectory.poses[first:first + spec.chunk_frames]
    actions = trajectory.actions()[first:first + spec.chunk_frames]
    noise = torch.randn(1, spec.chunk_frames, *spec.latent_shape, generator=torch.Generator().manual_seed(1))

    def chunk_output(latents: torch.Tensor) -> tuple[torch.Tensor, ContextSelection]:
        with accelerator.chunk(10, poses, chunk_poses, latents) as chunk:
            context = gather_context(latents, poses, chunk.selection, chunk.capacity)
            inputs = compiled.inputs(context, chunk_poses, actions, first)
            return compiled.model(noise, spec.sigmas()[0], **inputs), chunk.selection

    with torch.no_grad():
        chunk_output(history)  # compiles; the plan slots exist from now on
        reference, selection = chunk_output(history)
        stats = accelerator.controller.stats[-1].values
        assert stats["memory_dropped"] > 0 and stats["plan"] == "sparse"
        dropped = [f for f in range(first) if f not in selection.frames]
        perturbed = history.clone()
        perturbed[dropped] = torch.randn(len(dropped), *spec.latent_shape) * 100
        out, again = chunk_output(perturbed)
        assert again.frames == selection.frames
        assert torch.equal(out, reference)
        kept = history.clone()
        kept[selection.memory[0]] += 1.0
        assert not torch.equal(chunk_output(kept)[0], reference)  # a kept frame does reach attention


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_thresholds_that_keep_everything_reproduce_dense_generation(name):
    world = _world(name)
    spec = world.spec
    trajectory = trajectories.make("out_and_back", 3 * spec.chunk_frames)  # chunk 2: 4 frames in 5 slots
    dense = generate(world, trajectory, DensePolicy(spec.window, spec.memory), decode=False)
    compiled, accelerator = _accelerated(world, trajectory, keep_threshold=0.0, window_rule="fixed",
                                         similarity=DENSE_MEASURE)
    warm_up(compiled, accelerator.controller.warm_up_buckets())
    ours = generate(compiled, trajectory, accelerator=accelerator, decode=False)
    assert [s.frames for s in ours.selections] == [s.frames for s in dense.selections]
    assert any(s.values.get("plan") == "sparse" for s in accelerator.controller.stats)  # padded buckets ran the kernel
    torch.testing.assert_close(ours.latents, dense.latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_filled_padding_brings_back_the_dense_policys_memory_and_its_output(name):
    """Every memory frame below the keep threshold (1.0), but any padding filled (fill_density 0):
    the controller feeds exactly the dense policy's memory frames, all of which reach attention."""
    world = _world(name)
    spec = world.spec
    trajectory = trajectories.make("out_and_back", 4 * spec.chunk_frames)
    dense = generate(world, trajectory, DensePolicy(spec.window, spec.memory), decode=False)
    compiled, accelerator = _accelerated(world, trajectory, keep_threshold=1.0, fill_density=0.0, window_rule="fixed",
                                         similarity=DENSE_MEASURE, capacity_fractions=(1.0,))
    warm_up(compiled, accelerator.controller.warm_up_buckets())
    ours = generate(compiled, trajectory, accelerator=accelerator, decode=False)
    assert [s.frames for s in ours.selections] == [s.frames for s in dense.selections]
    assert sum(s.values["memory_filled"] for s in accelerator.controller.stats) > 0
    torch.testing.assert_close(ours.latents, dense.latents, rtol=1e-4, atol=1e-5)


def test_the_report_lists_each_chunks_context_decisions():
    world = _world("hy_worldplay")
    trajectory = trajectories.make("loop", 3 * world.spec.chunk_frames)
    compiled, accelerator = _accelerated(world, trajectory)
    generate(compiled, trajectory, chunks=3, accelerator=accelerator, decode=False)
    chunks = li_compile.report(compiled.model).chunks
    assert [c.chunk for c in chunks] == [0, 1, 2]
    assert [c.values["memory_kept"] for c in chunks] == [s.values["memory_kept"] for s in accelerator.controller.stats]
    assert "chunk 2: window=" in str(li_compile.report(compiled.model))


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_warm_up_takes_the_sparse_path_at_every_capacity_bucket(name, sparse_calls):
    """The kernel compiles and autotunes per shape on its first sparse call: warm-up must make that
    call at every bucket (a bucket's sites get their plan slots only once it has compiled), or the
    first pruned chunk of each bucket stalls in a timed run."""
    world = _world(name)
    setup = light_interaction_setup(world, BACKEND_OPTIONS)
    setup.warm_up()
    buckets = li_compile.accelerator(setup.world.model).controller.warm_up_buckets()
    assert set(sparse_calls) == {world.layout(capacity).kv_len for capacity in buckets}


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_warm_up_calls_the_model_once_per_bucket_and_runs_both_attention_routes_there(name, sparse_calls,
                                                                                       monkeypatch):
    """One call per capacity bucket compiles it, runs the block-sparse kernel on the warm-up plan
    (written into each plan slot as the call compiles its site) and, once per slot and mask form,
    the dense SDPA route a denser chunk takes (cuDNN builds per shape): a second full forward per
    bucket was a third of a cold warm-up at HY's real depth. Afterwards every slot is dense."""
    from li_compile import planned_attention

    dense_calls = []
    original = planned_attention.dense_attention
    monkeypatch.setattr(planned_attention, "dense_attention",
                        lambda q, k, *rest: dense_calls.append((q.shape[2], k.shape[2])) or original(q, k, *rest))
    world = _world(name, depth=2)  # two blocks, one plan slot: the dense route runs once, not per block
    compiled, accelerator = _accelerated(world, trajectories.make("loop", world.spec.chunk_frames))
    calls = []

    def call(capacity):
        calls.append(capacity)
        warm_up(compiled, (capacity,))

    accelerator.warm_up(call)
    buckets = accelerator.controller.warm_up_buckets()
    kv_lens = {world.layout(capacity).kv_len for capacity in buckets}
    assert calls == list(buckets)
    assert set(sparse_calls) == kv_lens == {slot.signature.kv_len for slot in accelerator.plan}
    for slot in accelerator.plan:  # once per slot (one mask form each here), not once per block
        assert dense_calls.count((slot.signature.q_len, slot.signature.kv_len)) == 1
    assert all(slot.is_dense for slot in accelerator.plan) and not accelerator.plan.warming


def test_a_model_that_records_cuda_graphs_is_warmed_up_twice_per_bucket_the_second_time_on_the_warm_up_plan(
        sparse_calls):
    """CUDA graphs record on a graph's second call: under a mode that records them
    (``records_cuda_graphs``, e.g. ``mode="reduce-overhead"``) warm-up calls each bucket twice, the
    plan still written, so no chunk records; otherwise once."""
    from li_compile.backend import records_cuda_graphs

    assert records_cuda_graphs("reduce-overhead") and not records_cuda_graphs(None)
    world = _world("hy_worldplay")
    compiled, accelerator = _accelerated(world, trajectories.make("loop", world.spec.chunk_frames))
    calls = []
    accelerator.records_cuda_graphs = True
    accelerator.warm_up(lambda capacity: calls.append(capacity) or warm_up(compiled, (capacity,)))
    buckets = accelerator.controller.warm_up_buckets()
    assert calls == [c for capacity in buckets for c in (capacity, capacity)]
    assert sparse_calls == {world.layout(capacity).kv_len: 2 for capacity in buckets}  # both calls sparse (depth 1)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_warm_up_launches_every_kernel_shape_a_trajectory_reaches(name):
    """Warm-up writes the plans real chunks get (camera tile plans, the chunk's span split off), so
    a trajectory after it launches the block-sparse kernel in no new shape: on the GPU, no autotune
    (seconds per shape) inside a timed chunk."""
    from li_compile.worlds.report_tools import timed_run

    world = _world(name)
    trajectory = trajectories.make("out_and_back", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    run = timed_run(light_interaction_setup(world, {**BACKEND_OPTIONS, "cache": {"enabled": False}}), trajectory, 4, 0)
    assert any(s["density"] < 1 for s in run.stats)  # the kernel ran
    assert run.recompiles == 0 and run.kernel_autotunes == 0


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_top_k_density_compiles_once_per_bucket_and_changes_only_what_it_drops(name):
    """``sparsity.density`` < 1 selects blocks inside the op at run time: no recompilation, finite
    output, different from keeping every planned block (so the selection is live)."""
    from li_compile.worlds.report_tools import timed_run

    world = _world(name)
    trajectory = trajectories.make("loop", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)
    runs = {}
    for density in (1.0, 0.5):
        torch._dynamo.reset()
        options = {**BACKEND_OPTIONS, "sparsity": {**BACKEND_OPTIONS["sparsity"], "density": density},
                   "cache": {"enabled": False}}
        runs[density] = timed_run(light_interaction_setup(world, options), trajectory, 4, seed=0)
        assert runs[density].recompiles == 0
    latents = {d: r.generation.latents for d, r in runs.items()}
    assert torch.isfinite(latents[0.5]).all()
    assert not torch.equal(latents[0.5], latents[1.0])
