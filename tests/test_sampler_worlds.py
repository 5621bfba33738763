"""The denoising cache on a reference world: a looping trajectory revisits its first chunks."""

import pytest
import torch

import li_compile
from li_compile import inner
from li_compile.passes.sampler import META
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.pipeline import DensePolicy, chunk_noise, gather_context, generate
from li_compile.worlds.report_tools import configure_for
from li_compile.worlds.sampling import sampler_update

FRAMES, PERIOD = 12, 8  # 6 chunks of 2 frames; frames 8..11 repeat the cameras of frames 0..3


@pytest.fixture
def graph_runs(monkeypatch):
    """Count the executions of compiled denoiser graphs (what a cache hit must skip)."""
    runs = [0]

    def counting_eager(gm, example_inputs, mode):
        def run(*args):
            runs[0] += META in gm.meta
            return gm.forward(*args)
        return run

    monkeypatch.setitem(inner.INNER, "eager", counting_eager)
    yield runs


def psnr(a, b):
    return float(10 * torch.log10(b.abs().max() ** 2 / (a - b).pow(2).mean()))


def _generate(world, trajectory, cache: bool):
    """``world`` compiled with the backend (eager inner), the controller off (upstream's fixed window
    and memory count), the denoising cache on or off: (generation, chunk stats of the cache)."""
    # whole graphs (regional=False): the fixture counts runs of the graph that holds the sampler
    options = {"inner": "eager", "regional": False, "cache": {"reuse_steps": 1} if cache else {"enabled": False},
               "context": {"enabled": False, "window_max": world.spec.window}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    configure_for(accelerator, world, trajectory)
    return generate(compiled, trajectory, accelerator=accelerator, decode=False), accelerator.denoise.history


def test_revisited_chunks_skip_early_steps_and_stay_close_to_dense(graph_runs):
    world = matrix_game3.build("tiny")
    trajectory = trajectories.loop(FRAMES, period=PERIOD)
    dense, _ = _generate(world, trajectory, cache=False)
    graph_runs[0] = 0
    cached, history = _generate(world, trajectory, cache=True)

    steps, per_chunk = world.spec.steps, world.spec.chunk_frames
    assert [s.values["cache"] for s in history] == ["miss"] * 4 + ["hit"] * 2
    assert graph_runs[0] == 6 * steps - 2  # one early step skipped on each of the two revisits
    for s in history:
        frames = slice(s.chunk * per_chunk, (s.chunk + 1) * per_chunk)
        if s.values["cache"] == "miss":
            torch.testing.assert_close(cached.latents[frames], dense.latents[frames], rtol=1e-5, atol=1e-5)
        else:
            assert psnr(cached.latents[frames], dense.latents[frames]) > 25


def test_a_compiled_chunk_function_of_a_world_caches_its_unrolled_steps(graph_runs):
    world = hy_worldplay.build("tiny")
    spec, trajectory = world.spec, trajectories.loop(FRAMES, period=PERIOD)
    poses, sigmas = trajectory.poses.float(), spec.sigmas()
    history = torch.randn(4, *spec.latent_shape, generator=torch.Generator().manual_seed(0))
    selection = DensePolicy(spec.window, spec.memory).select(2, poses[:4], poses[4:6], history)
    context = gather_context(history, poses[:4], selection, spec.context_frames)
    inputs = world.inputs(context, poses[4:6], trajectory.actions()[4:6], 4)

    def denoise_chunk(noise, inputs):
        x = noise[0]
        for s in range(spec.steps):
            v = world.model(x, sigmas[s], **inputs)
            x = sampler_update(spec.sampler, x, v, sigmas[s], sigmas[s + 1], noise[s + 1])
        return x

    compiled = torch.compile(denoise_chunk, backend="light_interaction",
                             options={"inner": "eager", "cache": {"reuse_steps": 2}})
    runtime = li_compile.accelerator(compiled).denoise
    outputs = []
    with torch.no_grad():
        for chunk in range(2):  # the same cameras twice, other noise
            runtime.begin_chunk(chunk, poses[4:6], sigmas)
            outputs.append(compiled(chunk_noise(world, chunk, 0), inputs))
            runtime.end_chunk()
        dense = [denoise_chunk(chunk_noise(world, chunk, 0), inputs) for chunk in range(2)]
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert [s.detail["step"] for s in sites] == list(range(spec.steps))
    assert [c.values["cache"] for c in runtime.history] == ["miss", "hit"]
    assert runtime.history[1].values["steps_reused"] == 2
    torch.testing.assert_close(outputs[0], dense[0], rtol=1e-5, atol=1e-5)
    assert psnr(outputs[1], dense[1]) > 20
