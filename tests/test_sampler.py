"""The sampler pass and its cached-denoise runners, on a toy flow-matching denoiser.

Both granularities: the model compiled alone (one graph per model call) and the whole chunk with
its denoising loop unrolled. Model calls are counted by a custom op inside the model, so the count
does not rely on what the runtime says it did.
"""

import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import li_compile
from li_compile.controller.poses import look_at
from li_compile.passes import sampler_runners
from li_compile.worlds.sampling import renoise_step, sigma_schedule

CALLS = [0]
SHAPE = (1, 4, 2, 4, 4)  # (B, C, F, h, w)


@torch.library.custom_op("li_sampler_test::model_call", mutates_args=())
def model_call(x: torch.Tensor) -> torch.Tensor:
    """Identity that counts the model calls that really ran."""
    CALLS[0] += 1
    return x.clone()


@model_call.register_fake
def _(x):
    return torch.empty_like(x)


class ToyDenoiser(nn.Module):
    """A flow-matching velocity model that knows its scene: ``x0 = scene + small(x, sigma)``,
    ``v = (x - x0) / sigma``, with a sinusoidal timestep embedding as real DiTs have."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.scene = nn.Parameter(torch.randn(SHAPE, generator=gen))
        self.mix = nn.Linear(4, 4)
        self.temb = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = model_call(x)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        angles = sigma.reshape(-1, 1).float() * 1000 * freqs
        emb = torch.cat([angles.sin(), angles.cos()], -1).to(x.dtype)
        feat = self.mix(x.movedim(1, -1)).movedim(-1, 1) + self.temb(emb)[:, :, None, None, None]
        x0 = self.scene + 0.1 * torch.tanh(feat)
        return (x - x0) / sigma.clamp_min(1e-3)


def cameras(x: float) -> torch.Tensor:
    """Two frames of cameras at (x, 0, 0), looking down +z."""
    eye = torch.tensor([[x, 0.0, 0.0], [x + 0.01, 0.0, 0.0]])
    return look_at(eye, eye + torch.tensor([0.0, 0.0, 5.0]))


HERE, ELSEWHERE = cameras(0.0), cameras(4.0)


def noise(seed: int, dtype=torch.float32, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max()
    return float(10 * torch.log10(peak**2 / (a - b).pow(2).mean()))


def sample(model, x, sigmas, sampler="euler"):
    """The reference loop: Euler or predict-x0-and-renoise (fixed renoise noise)."""
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i])
        if sampler == "euler":
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        else:
            x = renoise_step(x, v, sigmas[i], sigmas[i + 1], noise(100 + i, x.dtype, x.shape))
    return x


def run_chunk(compiled, fn, poses, sigmas, *args, chunk=0):
    """One chunk through ``fn`` inside the denoising cache's chunk of ``compiled``'s accelerator:
    (output, model calls that ran, stats)."""
    runtime = li_compile.accelerator(compiled).denoise
    before = CALLS[0]
    runtime.begin_chunk(chunk, poses, sigmas)
    try:
        with torch.no_grad():
            out = fn(*args)
    finally:
        stats = runtime.end_chunk().values
    return out, CALLS[0] - before, stats


# ---- the model compiled alone: one graph per model call ----


def compiled_model(model, reuse_steps=2, inner="eager"):
    options = {"inner": inner, "cache": {"reuse_steps": reuse_steps}}
    return torch.compile(model, backend="light_interaction", fullgraph=True, options=options)


def test_the_timestep_input_of_a_denoiser_call_is_found_and_reported():
    model = ToyDenoiser()
    compiled = compiled_model(model)
    with torch.no_grad():
        compiled(noise(0), torch.tensor(0.5))
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert site.status == "rewritten"
    assert site.detail["granularity"] == "model call" and site.detail["timestep"] == "sigma"
    assert site.detail["found_by"] == "sin/cos embedding"


class WithContext(nn.Module):
    """``ToyDenoiser`` that also reads clean context frames shaped like its latent (as many context
    frames as the chunk's), under the argument names given."""

    def __init__(self, latent: str, context: str) -> None:
        super().__init__()
        self.denoiser, self.latent, self.context = ToyDenoiser(), latent, context

    def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.denoiser(kwargs[self.latent] + 0.1 * kwargs[self.context], kwargs["sigma"])


@pytest.mark.parametrize("latent, context, found", [("x", "memory", "x"), ("sample", "frames", "sample"),
                                                    ("a", "b", None), ("x", "latents", None)])
def test_an_input_shaped_like_the_latent_is_told_apart_by_its_name_or_the_site_is_skipped(latent, context, found):
    """Two inputs shaped like the output: the one named like a noisy latent is the latent; with none
    or both so named the site is skipped with the reason (a guess could key the cache on the noise)."""
    compiled = torch.compile(WithContext(latent, context), backend="light_interaction",
                             options={"inner": "eager"})
    with torch.no_grad():
        compiled(**{latent: noise(0), context: noise(1), "sigma": torch.tensor(0.5)})
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    if found is None:
        assert site.status == "skipped" and "named like the noisy latent" in site.reason
    else:
        assert site.status == "rewritten" and site.detail["latent"].endswith(f"{found}_")


def test_a_cache_miss_gives_exactly_the_dense_output_and_a_trajectory_without_revisits_never_hits():
    model, sigmas = ToyDenoiser(), sigma_schedule(4)
    compiled = compiled_model(model)
    for chunk, x in enumerate([0.0, 4.0, 8.0]):
        out, calls, stats = run_chunk(compiled, lambda: sample(compiled, noise(chunk), sigmas), cameras(x), sigmas, chunk=chunk)
        with torch.no_grad():
            assert torch.equal(out, sample(model, noise(chunk), sigmas))
        assert calls == 4 and stats["cache"] == "miss" and stats["steps_reused"] == 0


@pytest.mark.parametrize("reuse_steps", [1, 2, 3])
def test_a_revisit_skips_reuse_steps_model_calls_and_stays_close_to_dense(reuse_steps):
    model, sigmas = ToyDenoiser(), sigma_schedule(4, shift=3.0)
    compiled = compiled_model(model, reuse_steps)
    run_chunk(compiled, lambda: sample(compiled, noise(0), sigmas), HERE, sigmas, chunk=0)
    run_chunk(compiled, lambda: sample(compiled, noise(1), sigmas), ELSEWHERE, sigmas, chunk=1)
    out, calls, stats = run_chunk(compiled, lambda: sample(compiled, noise(2), sigmas), HERE, sigmas, chunk=2)
    assert calls == 4 - reuse_steps and stats["steps_computed"] == 4 - reuse_steps
    assert stats["cache"] == "hit" and stats["steps_reused"] == reuse_steps
    with torch.no_grad():
        dense = sample(model, noise(2), sigmas)
    assert psnr(out, dense) > 30, f"PSNR {psnr(out, dense):.1f} dB against dense"


def test_compiles_once_across_hits_and_misses_with_no_graph_break():
    model, sigmas = ToyDenoiser(), sigma_schedule(3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("light_interaction")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(noise(0), sigmas[0])  # compiles (the accelerator of a wrapped backend exists from then on)
    run_chunk(compiled, lambda: sample(compiled, noise(0), sigmas), HERE, sigmas, chunk=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        for chunk, poses in enumerate([HERE, ELSEWHERE, HERE, HERE], start=1):
            run_chunk(compiled, lambda: sample(compiled, noise(chunk), sigmas), poses, sigmas, chunk=chunk)
        with torch.no_grad():
            sample(compiled, noise(9), sigmas)  # outside any chunk: plain calls
    assert counter.frame_count == 1
    history = li_compile.accelerator(compiled).denoise.history
    assert [c.values["cache"] for c in history] == ["miss", "hit", "miss", "hit", "hit"]


@pytest.mark.parametrize("change", ["model", "resolution", "dtype"])
def test_an_entry_from_another_model_resolution_or_dtype_never_hits(change):
    sigmas = sigma_schedule(3)
    first, second = ToyDenoiser(seed=0), ToyDenoiser(seed=0)
    x, y = noise(0), noise(1)
    if change == "model":
        second = ToyDenoiser(seed=1)
    elif change == "resolution":
        second.scene = nn.Parameter(torch.randn(1, 4, 2, 8, 8))
        y = noise(1, shape=(1, 4, 2, 8, 8))
    else:
        second = second.double()
        y = y.double()
    one, two = compiled_model(first), compiled_model(second)
    run_chunk(one, lambda: sample(one, x, sigmas), HERE, sigmas, chunk=0)
    out, calls, stats = run_chunk(two, lambda: sample(two, y, sigmas), HERE, sigmas, chunk=1)
    assert calls == 3 and stats["cache"] == "miss"
    with torch.no_grad():
        assert torch.equal(out, sample(second, y, sigmas))


def test_same_model_compiled_with_inductor_hits_on_revisits():
    model, sigmas = ToyDenoiser(), sigma_schedule(3)
    compiled = compiled_model(model, reuse_steps=1, inner="inductor")
    run_chunk(compiled, lambda: sample(compiled, noise(0), sigmas), HERE, sigmas, chunk=0)
    out, calls, stats = run_chunk(compiled, lambda: sample(compiled, noise(1), sigmas), HERE, sigmas, chunk=1)
    assert calls == 2 and stats["cache"] == "hit"
    with torch.no_grad():
        assert psnr(out, sample(model, noise(1), sigmas)) > 30


def test_a_graph_that_updates_state_in_place_is_left_alone_with_the_reason():
    class Stateful(ToyDenoiser):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x, sigma):
            self.seen.add_(1)
            return super().forward(x, sigma)

    compiled = compiled_model(Stateful())
    with torch.no_grad():
        compiled(noise(0), torch.tensor(0.5))
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert site.status == "skipped" and "in place" in site.reason


@pytest.mark.parametrize("in_place", [False, True])
def test_an_operator_on_an_input_is_in_place_only_when_spelled_so(in_place):
    """``valid | extra`` on an input mask (a block-causal model's) makes a new tensor: the site stays;
    ``valid |= extra`` updates the caller's tensor: the site is left alone."""
    class Masked(ToyDenoiser):
        def forward(self, x, sigma, valid):
            if in_place:
                valid |= valid.flip(-1)
            else:
                valid = valid | valid.flip(-1)
            return super().forward(x, sigma) * valid.any()

    compiled = compiled_model(Masked())
    with torch.no_grad():
        compiled(noise(0), torch.tensor(0.5), torch.tensor([True, False]))
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert (site.status == "skipped" and "in place" in site.reason) if in_place else site.status == "rewritten"


# ---- the whole chunk compiled: the denoising loop unrolled in one graph ----


def spelled_euler(spelling):
    """The Euler update written the ways people write it."""
    return {
        "x + (s1 - s0) * v": lambda x, v, s0, s1: x + (s1 - s0) * v,
        "(s1 - s0) * v + x": lambda x, v, s0, s1: (s1 - s0) * v + x,
        "x - (s0 - s1) * v": lambda x, v, s0, s1: x - (s0 - s1) * v,
    }[spelling]


def chunk_function(model, sigmas, sampler, spelling, python_sigmas):
    schedule = sigmas.tolist() if python_sigmas else sigmas
    update = spelled_euler(spelling)

    def generate_chunk(x, renoise):
        for i in range(len(schedule) - 1):
            v = model(x, sigmas[i])
            if sampler == "euler":
                x = update(x, v, schedule[i], schedule[i + 1])
            else:
                x = renoise_step(x, v, schedule[i], schedule[i + 1], renoise[i])
        return x

    return generate_chunk


@settings(max_examples=8, deadline=None)
@given(
    sampler=st.sampled_from(["euler", "renoise"]),
    spelling=st.sampled_from(["x + (s1 - s0) * v", "(s1 - s0) * v + x", "x - (s0 - s1) * v"]),
    steps=st.integers(2, 5),
    shift=st.sampled_from([1.0, 3.0]),
    reuse_steps=st.integers(0, 5),
    python_sigmas=st.booleans(),
)
def test_unrolled_chunk_steps_are_found_and_early_steps_reused_on_revisits(
    sampler, spelling, steps, shift, reuse_steps, python_sigmas
):
    torch._dynamo.reset()
    model, sigmas = ToyDenoiser(), sigma_schedule(steps, shift)
    fn = chunk_function(model, sigmas, sampler, spelling, python_sigmas)
    compiled = torch.compile(
        fn, backend="light_interaction", fullgraph=True, options={"inner": "eager", "cache": {"reuse_steps": reuse_steps}}
    )
    renoise = torch.stack([noise(50 + i) for i in range(steps)])
    out, calls, _ = run_chunk(compiled, compiled, HERE, sigmas, noise(0), renoise, chunk=0)
    with torch.no_grad():
        assert torch.equal(out, fn(noise(0), renoise))  # a miss is exactly dense
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert [s.detail["step"] for s in sites] == list(range(steps)) and calls == steps

    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(1), renoise, chunk=1)
    reused = min(reuse_steps, steps - 1)  # the last step always runs
    assert calls == steps - reused and stats["steps_reused"] == reused
    with torch.no_grad():
        dense = fn(noise(1), renoise)
    assert psnr(out, dense) > 25, f"PSNR {psnr(out, dense):.1f} dB against dense"


@pytest.mark.parametrize("start, hits", [
    (lambda noise, sigmas, cond: noise * sigmas[0], True),  # scaled by the schedule (EDM-style samplers)
    (lambda noise, sigmas, cond: noise * sigmas[0] + cond[:, :1], False),  # another tensor mixed in: all keyed
    (lambda noise, sigmas, cond: cond + noise[:, :, :1], False),  # the noise the smaller one: all keyed
    (lambda noise, sigmas, cond: torch.lerp(cond, noise[:, :, :1], 0.5), False),
    (lambda noise, sigmas, cond: noise + cond, False),  # two latent-sized inputs: which is noise is not known
])
def test_a_chunk_whose_noise_is_scaled_before_the_first_step_hits_on_revisits_and_keys_the_rest(start, hits):
    """The noise is told by following the first step's latent back to one input: through scales by
    single numbers, never through an op that mixes in another tensor (whichever is larger). What is
    not the noise stays in the cache key: a revisit with other conditioning computes in full."""
    torch._dynamo.reset()
    model, sigmas = ToyDenoiser(), sigma_schedule(3, 1.0)

    def generate_chunk(noise, cond):
        x = start(noise, sigmas, cond)
        for i in range(len(sigmas) - 1):
            x = x + (sigmas[i + 1] - sigmas[i]) * model(x, sigmas[i])
        return x + 0.01 * cond

    compiled = torch.compile(generate_chunk, backend="light_interaction", fullgraph=True, options={"inner": "eager"})
    cond = noise(7)
    run_chunk(compiled, compiled, HERE, sigmas, noise(0), cond, chunk=0)
    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(1), cond, chunk=1)
    assert (stats["steps_reused"] > 0) == hits and calls == 3 - stats["steps_reused"]
    for chunk, cond in ((2, noise(8)), (3, noise(9))):  # other conditioning (chunk 3: chunk 2's noise again)
        out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(2), cond, chunk=chunk)
        assert stats["steps_reused"] == 0 and calls == 3
        with torch.no_grad():
            torch.testing.assert_close(out, generate_chunk(noise(2), cond), rtol=1e-5, atol=1e-5)


class Pipeline:
    """Not a module: a pipeline whose compiled method is its chunk function, beside its own ``__call__``."""

    def __init__(self) -> None:
        self.model, self.sigmas = ToyDenoiser(), sigma_schedule(3, 1.0)

    def __call__(self, noise, cam, text=None):  # the pipeline's entry point: other parameters
        return self.run(noise, False, cam)

    def run(self, noise, guidance, cam):
        x, s = noise, self.sigmas
        for i in range(len(s) - 1):
            x = x + (s[i + 1] - s[i]) * (3.0 if guidance else 1.0) * self.model(x, s[i])
        return x + 0.0 * cam.sum()

    @torch.no_grad()
    def decorated_run(self, noise, guidance, cam):  # as diffusers pipelines decorate theirs
        return self.run(noise, guidance, cam)


class CallOverride(nn.Module):
    """A module whose ``__call__`` takes other parameters than its forward (and calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pipeline = Pipeline()

    def __call__(self, noise, guidance, cam):
        return super().__call__(noise, cam, guidance=guidance)

    def forward(self, noise, cam, guidance=False):
        return self.pipeline.run(noise, guidance, cam)


@pytest.mark.parametrize("spelling", ["method", "decorated method", "module overriding __call__"])
def test_a_compiled_callable_binds_its_arguments_by_its_own_signature(spelling):
    """The cache key names the arguments by the compiled callable's own parameters (a method's, through
    its decorators; an overridden ``__call__``'s), not its object's ``__call__`` or a module's forward:
    a revisit with another Python value (``guidance``) computes in full, while the declared revisit
    input (``cam``) stays out of the key."""
    torch._dynamo.reset()
    if spelling == "module overriding __call__":
        module = CallOverride()
        sigmas, eager, target = module.pipeline.sigmas, module.pipeline.run, module
    else:
        pipe = Pipeline()
        sigmas, eager = pipe.sigmas, pipe.run
        target = pipe.run if spelling == "method" else pipe.decorated_run
    compiled = torch.compile(target, backend="light_interaction", fullgraph=True, options={"inner": "eager"})
    li_compile.accelerator(compiled).configure(revisit_inputs=("cam",))
    run_chunk(compiled, compiled, HERE, sigmas, noise(0), False, torch.zeros(3), chunk=0)
    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(1), True, torch.zeros(3), chunk=1)
    assert stats["steps_reused"] == 0 and calls == 3
    with torch.no_grad():
        torch.testing.assert_close(out, eager(noise(1), True, torch.zeros(3)), rtol=1e-5, atol=1e-5)
    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(2), True, torch.ones(3), chunk=2)
    # the same guidance, another cam: a revisit; a decorated method, which Dynamo unwraps from its
    # instance, is bound by position: every value keyed, cam too (a lost hit, never a stale one)
    assert (stats["steps_reused"] > 0) == (spelling != "decorated method")


def test_a_loop_in_a_function_without_a_model_is_not_taken_for_a_sampler():
    def residual(x, w):
        for _ in range(3):
            h = x @ w
            x = x + 0.5 * torch.tanh(h @ w)
        return x

    compiled = torch.compile(residual, backend="light_interaction", options={"inner": "eager"})
    compiled(torch.randn(4, 4), torch.randn(4, 4))
    assert [s for s in li_compile.report(compiled).sites if s.kind == "sampler"] == []


def test_in_place_updates_of_intermediates_do_not_block_the_cache():
    class Accumulating(ToyDenoiser):
        def forward(self, x, sigma):
            v = super().forward(x, sigma)
            v += 0.0
            return v

    compiled = compiled_model(Accumulating())
    with torch.no_grad():
        compiled(noise(0), torch.tensor(0.5))
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert site.status == "rewritten"


def test_guidance_inside_an_unrolled_step_skips_both_model_calls_on_a_hit():
    model, sigmas = ToyDenoiser(), sigma_schedule(3)

    def guided_chunk(x, cond):
        for i in range(3):
            uncond_v = model(x, sigmas[i])
            cond_v = model(x + cond, sigmas[i])
            v = uncond_v + 2.0 * (cond_v - uncond_v)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    compiled = torch.compile(guided_chunk, backend="light_interaction", fullgraph=True,
                             options={"inner": "eager", "cache": {"reuse_steps": 1}})
    cond = 0.1 * noise(7)
    _, calls, _ = run_chunk(compiled, compiled, HERE, sigmas, noise(0), cond, chunk=0)
    assert calls == 6
    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(1), cond, chunk=1)
    assert calls == 4 and stats["steps_reused"] == 1
    with torch.no_grad():
        assert psnr(out, guided_chunk(noise(1), cond)) > 30


@pytest.mark.parametrize("variant", ["per-step output", "self-conditioning"])
def test_a_chunk_that_also_returns_each_steps_output_or_feeds_it_back_is_split_and_cached(variant):
    """A step factor traced after a model call's extra output (``means.append(v.mean())``), or the
    previous prediction fed back into the next call, still splits into per-step pieces: a miss is
    exactly dense and a revisit skips the early model calls."""
    model, sigmas = ToyDenoiser(), sigma_schedule(3)

    def chunk(x, s):
        means, previous = [], torch.zeros_like(x)
        for i in range(3):
            v = model(x + 0.1 * previous, s[i]) if variant == "self-conditioning" else model(x, s[i])
            means.append(v.mean())
            x = x + (s[i + 1] - s[i]) * v
            previous = x - s[i + 1] * v
        return x, torch.stack(means)

    compiled = torch.compile(chunk, backend="light_interaction", fullgraph=True,
                             options={"inner": "eager", "cache": {"reuse_steps": 2}})
    (out, means), calls, _ = run_chunk(compiled, compiled, HERE, sigmas, noise(0), sigmas, chunk=0)
    with torch.no_grad():
        dense = chunk(noise(0), sigmas)
    assert calls == 3 and torch.equal(out, dense[0]) and torch.equal(means, dense[1])
    (out, _), calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(1), sigmas, chunk=1)
    assert calls == 1 and stats["steps_reused"] == 2
    with torch.no_grad():
        assert psnr(out, chunk(noise(1), sigmas)[0]) > 25


def _drawing_between_steps(model, x, s, state):
    for i in range(3):
        v = model(x, s[i])
        x = x + (s[i + 1] - s[i]) * v + 0.01 * (torch.randn_like(x) - torch.randn(x.shape))
    return x


def _drawing_in_the_call(model, x, s, state):
    for i in range(3):
        v = model(x + 0.01 * torch.randn(x.shape), s[i])
        x = x + (s[i + 1] - s[i]) * v + 0.01 * torch.randn(4)[:, None, None, None]
    return x


def _writing_state_in_place(model, x, s, state):
    for i in range(3):
        v = model(x + state, s[i])
        x = x + (s[i + 1] - s[i]) * v
        state.add_(0.5)
    return x


def _drawing_before_the_loop(model, x, s, state):
    extra = torch.randn(x.shape)  # read only after the loop
    for i in range(3):
        x = x + (s[i + 1] - s[i]) * model(x, s[i]) + 0.01 * torch.randn(x.shape)
    return x + 0.1 * extra


def _writing_state_before_the_loop(model, x, s, state):
    state.add_(0.5)
    for i in range(3):
        x = x + (s[i + 1] - s[i]) * model(x + state, s[i])
    return x


def _drawing_between_guidance_calls(model, x, s, state):
    for i in range(3):
        cond = model(x, s[i])
        noise = torch.randn(x.shape)
        uncond = model(0.5 * x, s[i])
        x = x + (s[i + 1] - s[i]) * (uncond + 2.0 * (cond - uncond)) + 0.01 * noise
    return x


def _adding_to_state_between_guidance_calls(model, x, s, state):
    for i in range(3):
        cond = model(x, s[i])
        state += 1
        uncond = model(0.5 * x + 0.01 * state, s[i])
        x = x + (s[i + 1] - s[i]) * (uncond + 2.0 * (cond - uncond))
    return x


def _reading_state_then_writing_it(model, x, s, state):
    for i in range(3):
        shift = state * 0.1
        state.add_(1)
        x = x + (s[i + 1] - s[i]) * model(x + shift, s[i])
    return x


def _scaling_the_latent_in_place(model, x, s, state):
    x = x.clone()
    means = []
    for i in range(3):
        h = x.mul_(0.9)
        means.append(x.std())
        x = x + (s[i + 1] - s[i]) * model(h, s[i])
    return x + 0.0 * torch.stack(means).sum()


@pytest.mark.parametrize("loop", [_drawing_between_steps, _drawing_in_the_call, _writing_state_in_place,
                                  _drawing_before_the_loop, _writing_state_before_the_loop,
                                  _drawing_between_guidance_calls, _adding_to_state_between_guidance_calls,
                                  _reading_state_then_writing_it, _scaling_the_latent_in_place],
                         ids=["draws between steps", "draws in the call", "state written in place",
                              "a draw before the loop", "state written before the loop",
                              "a draw between guidance calls", "state += 1 between guidance calls",
                              "state read then written", "the latent scaled in place"])
def test_a_chunk_with_random_draws_or_in_place_writes_compiles_whole_and_equals_eager(loop):
    """Serving a step's model calls skips their draws and writes, and splitting the chunk may move a
    draw or a write past the reads it stood between: a chunk function with a random draw or an
    in-place write (but one inside the model's own computation) compiles whole, uncached, with the
    reason, and a run equals eager draw for draw. Compile the model instead to cache its calls."""
    model, sigmas = ToyDenoiser(), sigma_schedule(3)

    def chunk(x, s, state):
        return loop(model, x, s, state)

    compiled = torch.compile(chunk, backend="light_interaction", fullgraph=True,
                             options={"inner": "eager", "cache": {"reuse_steps": 2}})
    torch.manual_seed(7)
    out, calls, _ = run_chunk(compiled, compiled, HERE, sigmas, noise(0), sigmas, torch.zeros(()), chunk=0)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = chunk(noise(0), sigmas, torch.zeros(()))
    assert torch.equal(out, expected)
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert sites and all(s.status == "skipped" and "could not split" in s.reason for s in sites), sites


def test_a_chunk_graph_that_cannot_be_split_is_compiled_whole_with_the_reason(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no split today")

    monkeypatch.setattr(sampler_runners, "split_module", refuse)
    model, sigmas = ToyDenoiser(), sigma_schedule(2)
    fn = chunk_function(model, sigmas, "euler", "x + (s1 - s0) * v", False)
    compiled = torch.compile(fn, backend="light_interaction", options={"inner": "eager"})
    out, calls, stats = run_chunk(compiled, compiled, HERE, sigmas, noise(0), None)
    with torch.no_grad():
        assert torch.equal(out, fn(noise(0), None))
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert len(sites) == 2 and all(s.status == "skipped" and "no split today" in s.reason for s in sites)
    assert calls == 2 and stats["cache"] == "off"


class PerFrameDenoiser(ToyDenoiser):
    """``ToyDenoiser`` with one timestep per frame, ``sigma (B, F)``, as diffusion-forcing models
    (SkyReels-V2-DF, AnyFlow FAR) take it: each frame is denoised at its own noise level."""

    def forward(self, x, sigma):
        x = model_call(x)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        angles = sigma[..., None] * 1000 * freqs  # (B, F, 8)
        emb = self.temb(torch.cat([angles.sin(), angles.cos()], -1))  # (B, F, 4)
        feat = self.mix(x.movedim(1, -1)).movedim(-1, 1) + emb.permute(0, 2, 1)[..., None, None]
        x0 = self.scene + 0.1 * torch.tanh(feat)
        return (x - x0) / sigma.clamp_min(1e-3)[:, None, :, None, None]


def per_frame_sample(model, x, sigmas, velocities=None):
    """Euler with a per-frame schedule ``sigmas (steps + 1, F)``; appends each step's model output
    to ``velocities`` if given."""
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i][None])
        if velocities is not None:
            velocities.append((x, v))
        x = x + (sigmas[i + 1] - sigmas[i])[None, None, :, None, None] * v
    return x


def test_per_frame_timesteps_get_a_sampler_site_and_revisits_reuse_their_early_steps():
    """Diffusion forcing: frame 1 runs ahead of frame 0 on a staggered schedule. The timestep
    input ``(B, F)`` is found, and a revisit under the same schedule serves its first two steps,
    each frame converted at its own noise level: the served velocities are close to the ones the
    model computes from the same latents."""
    model = PerFrameDenoiser()
    compiled = compiled_model(model, reuse_steps=2)
    sigmas = torch.tensor([[1.0, 0.7], [0.7, 0.4], [0.4, 0.1], [0.0, 0.0]])
    _, calls, _ = run_chunk(compiled, lambda x: per_frame_sample(compiled, x, sigmas), HERE, sigmas, noise(0))
    assert calls == 3
    served = []
    out, calls, stats = run_chunk(compiled, lambda x: per_frame_sample(compiled, x, sigmas, served), HERE, sigmas,
                                  noise(1), chunk=1)
    assert calls == 1 and stats["steps_reused"] == 2
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert site.status == "rewritten" and site.detail["per_frame_timesteps"]
    with torch.no_grad():
        for step, (x, v) in enumerate(served[:2]):
            assert psnr(v, model(x, sigmas[step][None])) > 30, step
        assert psnr(out, per_frame_sample(model, noise(1), sigmas)) > 30




# ---- a model call split by a graph break: the cache at the call boundary ----


class BrokenDenoiser(ToyDenoiser):
    """``ToyDenoiser`` with a graph break in its forward (as HunyuanVideo 1.5's data-dependent
    branch): no graph is the whole model call."""

    def forward(self, x, sigma):
        x = model_call(x)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        angles = sigma.reshape(-1, 1).float() * 1000 * freqs
        feat = self.mix(x.movedim(1, -1)).movedim(-1, 1) + self.temb(torch.cat([angles.sin(), angles.cos()], -1))[
            :, :, None, None, None]
        x0 = self.scene + 0.1 * torch.tanh(feat)
        scale = sigma.clamp_min(1e-3)
        torch._dynamo.graph_break()
        return (x - x0) / scale


def test_a_model_call_split_by_a_graph_break_is_cached_at_its_boundary():
    """The sampler pass cannot see the call (its site is skipped, naming graph breaks);
    ``li_compile.cached`` serves the revisit's first two steps around the whole call: one model call
    of three runs, and the chunk stays close to the uncached one."""
    model = BrokenDenoiser()
    compiled = torch.compile(model, backend="light_interaction",
                             options={"inner": "eager", "cache": {"reuse_steps": 2}})
    sigmas = sigma_schedule(3)
    with torch.no_grad():
        compiled(noise(0), sigmas[0])
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "sampler"]
    assert site.status == "skipped" and "graph break" in site.reason
    dit = li_compile.cached(compiled, latent="x", timestep="sigma")
    _, calls, _ = run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(0))
    assert calls == 3
    out, calls, stats = run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(1), chunk=1)
    assert calls == 1 and stats["steps_reused"] == 2
    with torch.no_grad():
        assert psnr(out, sample(model, noise(1), sigmas)) > 30


def test_a_boundary_cache_around_a_graph_level_site_counts_each_step_once():
    compiled = compiled_model(ToyDenoiser(), reuse_steps=2)
    dit = li_compile.cached(compiled, latent="x", timestep="sigma")
    sigmas = sigma_schedule(3)
    run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(0))
    _, calls, stats = run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(1), chunk=1)
    assert calls == 1 and stats["steps_reused"] == 2 and stats["steps_computed"] == 1


def test_new_weights_never_hit_outputs_cached_at_the_boundary_under_the_old_ones():
    model = BrokenDenoiser()
    compiled = torch.compile(model, backend="light_interaction",
                             options={"inner": "eager", "cache": {"reuse_steps": 2}})
    dit = li_compile.cached(compiled, latent="x", timestep="sigma")
    sigmas = sigma_schedule(3)
    run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(0))
    with torch.no_grad():
        model.scene.add_(1.0)  # in place: the parameter's version changes
    _, calls, stats = run_chunk(compiled, lambda x: sample(dit, x, sigmas), HERE, sigmas, noise(1), chunk=1)
    assert calls == 3 and stats["steps_reused"] == 0


def test_a_boundary_cache_names_an_argument_the_model_does_not_take():
    with pytest.raises(ValueError, match="no argument 'latents'"):
        li_compile.cached(compiled_model(ToyDenoiser()), latent="latents", timestep="sigma")
