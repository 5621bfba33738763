"""The denoising cache store and its per-chunk runtime: stamps, revisit lookup, LRU, bytes, steps."""

import pytest
import torch

from li_compile.controller.poses import look_at
from li_compile import denoise_cache
from li_compile.controller.similarity import DEFAULT_FAR, REVISIT_MAX_DISTANCE, similarity
from li_compile.denoise_cache import DenoiseCache, Stamp, chunk_revisit_scores, frame_revisit_scores
from li_compile.denoise_runtime import DenoiseRuntime, frame_axis
from li_compile.options import CacheOptions


def chunk_cameras(x: float, frames: int = 2) -> torch.Tensor:
    """A chunk of cameras at (x, 0, 0) .. moving 1cm per frame, all looking down +z."""
    eye = torch.tensor([[x + 0.01 * f, 0.0, 0.0] for f in range(frames)])
    return look_at(eye, eye + torch.tensor([0.0, 0.0, 5.0]))


LATENT = torch.zeros(1, 4, 2, 3, 3)
STAMP = Stamp.of("model-a", LATENT)


def filled(cache, poses, stamp=STAMP, steps=2, value=1.0):
    entry = cache.open_entry(poses, stamp)
    for step in range(steps):
        cache.store(entry, step, torch.full(stamp.shape, value + step, dtype=stamp.dtype))
    return entry


def test_same_cameras_hit_and_distant_cameras_miss():
    cache = DenoiseCache(capacity=4)
    entry = filled(cache, chunk_cameras(0.0))
    assert cache.lookup(chunk_cameras(0.0), STAMP, steps=2, threshold=0.9) is entry
    assert cache.lookup(chunk_cameras(3.0), STAMP, steps=2, threshold=0.9) is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


@pytest.mark.parametrize(
    "other",
    [
        Stamp.of("model-b", LATENT),
        Stamp.of("model-a", torch.zeros(1, 4, 2, 6, 6)),
        Stamp.of("model-a", LATENT.half()),
        Stamp.of("model-a", LATENT, prediction="x0"),
        Stamp("model-a", tuple(LATENT.shape), LATENT.dtype, "cuda:0"),
    ],
    ids=["model", "resolution", "dtype", "prediction", "device"],
)
def test_an_entry_with_another_stamp_never_hits(other):
    cache = DenoiseCache(capacity=4)
    filled(cache, chunk_cameras(0.0), stamp=other)
    assert cache.lookup(chunk_cameras(0.0), STAMP, steps=2, threshold=0.0) is None


def test_an_entry_missing_an_early_step_does_not_hit():
    cache = DenoiseCache(capacity=4)
    filled(cache, chunk_cameras(0.0), steps=1)
    assert cache.lookup(chunk_cameras(0.0), STAMP, steps=2, threshold=0.5) is None


def test_least_recently_used_entry_is_evicted_first_and_bytes_are_accounted():
    cache = DenoiseCache(capacity=2)
    a = filled(cache, chunk_cameras(0.0))
    b = filled(cache, chunk_cameras(3.0))
    assert cache.nbytes == 2 * 2 * LATENT.numel() * 4
    assert cache.lookup(chunk_cameras(0.0), STAMP, 2, 0.9) is a  # a is now most recently used
    filled(cache, chunk_cameras(6.0))
    assert a in cache and b not in cache and len(cache) == 2
    assert cache.stats.evictions == 1


def test_byte_bound_evicts_older_entries_but_keeps_the_one_being_filled():
    per_entry = 2 * LATENT.numel() * 4
    cache = DenoiseCache(capacity=10, max_bytes=per_entry)
    a = filled(cache, chunk_cameras(0.0))
    b = filled(cache, chunk_cameras(3.0))
    assert b in cache and a not in cache and cache.nbytes == per_entry


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        DenoiseCache(0)
    with pytest.raises(ValueError, match=r"must be \(F, 4, 4\).*\(3, 4\)"):
        DenoiseCache(1).open_entry(torch.eye(4)[:3], STAMP)
    with pytest.raises(ValueError, match="must match the entry's stamp"):
        cache = DenoiseCache(1)
        cache.store(cache.open_entry(chunk_cameras(0.0), STAMP), 0, torch.zeros(3))


def test_chunk_score_is_the_worst_frame():
    current = chunk_cameras(0.0)
    turned = current.clone()
    turned[1] = look_at(torch.tensor([0.01, 0.0, 0.0]), torch.tensor([5.0, 0.0, 0.0]))
    scores = chunk_revisit_scores(current, torch.stack([current, turned]))
    assert scores[0] > 0.99 and scores[1] < 0.5


@pytest.mark.parametrize("pair_batch", [3, 256])
@pytest.mark.parametrize("measure", ["frustum", "proxy"])
def test_frame_scores_are_each_pairs_similarity_and_zero_beyond_the_revisit_distance(measure, pair_batch, monkeypatch):
    monkeypatch.setattr(denoise_cache, "PAIR_BATCH", pair_batch)  # scored in several calls, or in one
    gen = torch.Generator().manual_seed(0)
    current = chunk_cameras(0.0, frames=3)
    bank = torch.cat([chunk_cameras(0.1, frames=3), chunk_cameras(5.0, frames=3)])  # near and far camera centres
    bank[:, :3, 3] += 0.05 * torch.randn(bank.shape[0], 3, generator=gen)
    scores = frame_revisit_scores(current, bank, measure)
    for f in range(current.shape[0]):
        for m in range(bank.shape[0]):
            apart = (current[f, :3, 3] - bank[m, :3, 3]).norm() > REVISIT_MAX_DISTANCE * DEFAULT_FAR
            want = 0.0 if apart else float(similarity(current[f], bank[m][None], measure)[0])
            assert abs(float(scores[f, m]) - want) < 1e-6, (f, m)
    assert (scores[:, current.shape[0]:] == 0).all() and (scores[:, :current.shape[0]] > 0).any()


# ---- the runtime: which model calls run ----


class Model:
    """A stand-in model: counts calls, returns a step-dependent velocity."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, step):
        self.calls += 1
        return x * 0.5 + step


def KEY():  # the cache key of every call of the stand-in model (weights and conditioning unchanged)
    return "fp"


def run_chunk(runtime, model, poses, steps=4, sigmas=None, options=CacheOptions(reuse_steps=2), x=None, chunk=0):
    x = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(0)) if x is None else x
    runtime.options = options  # the model's cache options (an accelerator's runtime is built with them)
    runtime.begin_chunk(chunk, poses, sigmas)
    with torch.no_grad():
        outs = [runtime.step("model", KEY, x, lambda i=i: model(x, i)) for i in range(steps)]
    return outs, runtime.end_chunk()


def test_outside_a_chunk_the_model_always_runs():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    for _ in range(3):
        runtime.step("model", KEY, LATENT, lambda: model(LATENT, 0))
    assert model.calls == 3 and len(runtime.cache) == 0


def test_revisit_serves_reuse_steps_and_computes_the_rest():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    first, stats = run_chunk(runtime, model, chunk_cameras(0.0))
    assert model.calls == 4 and stats.values["cache"] == "miss" and stats.values["cache_entries"] == 1
    again, stats = run_chunk(runtime, model, chunk_cameras(0.0))
    assert model.calls == 4 + 2
    assert stats.values["steps_reused"] == 2 and stats.values["steps_computed"] == 2
    assert stats.values["cache"] == "hit" and stats.values["cache_bytes"] == 2 * LATENT.numel() * 4
    assert stats.values["reused_chunk"] == 0
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_x0_reuse_with_the_same_latent_gives_the_same_velocity():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    first, _ = run_chunk(runtime, model, chunk_cameras(0.0), sigmas=sigmas)
    again, stats = run_chunk(runtime, model, chunk_cameras(0.0), sigmas=sigmas)
    assert stats.values["steps_reused"] == 2
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_raw_storage_is_chosen_by_option_even_with_sigmas():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    sigmas, options = [1.0, 0.5, 0.0], CacheOptions(reuse_steps=1, stored="raw")
    run_chunk(runtime, model, chunk_cameras(0.0), steps=2, sigmas=sigmas, options=options)
    (entry,) = runtime.cache.entries()
    assert entry.stamp.prediction == "raw"
    x = torch.randn(LATENT.shape)
    out, stats = run_chunk(runtime, model, chunk_cameras(0.0), steps=2, sigmas=sigmas, options=options, x=x)
    assert stats.values["steps_reused"] == 1
    torch.testing.assert_close(out[0], entry.outputs[0, 0], rtol=0, atol=0)  # served unchanged


def test_told_steps_keep_several_calls_per_step_apart():
    runtime, sigmas = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw")), [1.0, 0.5, 0.0]
    outputs = []
    for chunk in range(2):
        runtime.begin_chunk(chunk, chunk_cameras(0.0), sigmas)
        for step in range(2):
            runtime.set_step(step)
            for guidance in (0.0, 1.0):  # conditional and unconditional, as separate calls
                fresh = torch.full(LATENT.shape, 10 * step + guidance + chunk)
                with torch.no_grad():
                    outputs.append(runtime.step("model", KEY, LATENT, lambda f=fresh: f))
        assert runtime.end_chunk().values["steps_reused"] == (0 if chunk == 0 else 2)
    first, again = outputs[:4], outputs[4:]
    assert [float(o[0, 0, 0, 0, 0]) for o in again] == [0.0, 1.0, 11.0, 12.0]  # step 0 served, call by call
    assert [float(o[0, 0, 0, 0, 0]) for o in first] == [0.0, 1.0, 10.0, 11.0]


def test_the_last_step_always_computes():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    run_chunk(runtime, model, chunk_cameras(0.0), steps=2, sigmas=[1.0, 0.5, 0.0], options=CacheOptions(reuse_steps=5))
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0), steps=2, sigmas=[1.0, 0.5, 0.0], options=CacheOptions(reuse_steps=5))
    assert stats.values["steps_reused"] == 1 and stats.values["steps_computed"] == 1


@pytest.mark.parametrize("steps, reused", [(4, 3), (3, 2), (2, 1), (6, 5), (1, 0)])
def test_by_default_a_revisit_serves_every_step_but_the_last(steps, reused):
    """``reuse_steps=None``: every early step of a revisit is served; the last step computes."""
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    run_chunk(runtime, model, chunk_cameras(0.0), steps=steps, sigmas=sigmas, options=CacheOptions())
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0), steps=steps, sigmas=sigmas, options=CacheOptions())
    assert stats.values["steps_reused"] == reused and stats.values["steps_computed"] == steps - reused


def test_without_sigmas_the_step_count_is_learned_from_the_chunks_before():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    options = CacheOptions(stored="raw")
    run_chunk(runtime, model, chunk_cameras(0.0), options=options)
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0), options=options)
    assert stats.values["steps_reused"] == 3 and stats.values["steps_computed"] == 1


@pytest.mark.parametrize("reuse_steps", [3, 4, 10])
def test_without_sigmas_the_last_step_computes_whatever_reuse_steps_says(reuse_steps):
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    options = CacheOptions(stored="raw", reuse_steps=reuse_steps)
    run_chunk(runtime, model, chunk_cameras(0.0), steps=3, options=options)
    calls = model.calls
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0), steps=3, options=options)
    assert stats.values["steps_reused"] == 2 and model.calls == calls + 1


def test_a_chunk_without_sigmas_that_ran_fewer_steps_than_before_and_was_served_its_last_raises():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    options = CacheOptions(stored="raw")
    run_chunk(runtime, model, chunk_cameras(0.0), steps=4, options=options)
    with pytest.raises(ValueError, match="ran 2 denoising steps and its last was served"):
        run_chunk(runtime, model, chunk_cameras(0.0), steps=2, options=options)


def test_with_gradients_enabled_the_model_always_runs():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    run_chunk(runtime, model, chunk_cameras(0.0))
    runtime.begin_chunk(1, chunk_cameras(0.0))
    with torch.enable_grad():
        for i in range(4):
            runtime.step("model", KEY, LATENT, lambda i=i: model(LATENT, i))
    assert runtime.end_chunk().values["cache"] == "off" and model.calls == 8


def test_reset_forgets_entries_and_stats_but_keeps_the_capacity():
    runtime, model = DenoiseRuntime(CacheOptions(capacity=3)), Model()
    run_chunk(runtime, model, chunk_cameras(0.0))
    runtime.reset()
    assert len(runtime.cache) == 0 and runtime.history == [] and runtime.cache.capacity == 3
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0))
    assert stats.values["cache"] == "miss"


def test_disabled_cache_or_new_place_never_hits():
    runtime, model = DenoiseRuntime(CacheOptions()), Model()
    run_chunk(runtime, model, chunk_cameras(0.0))
    _, stats = run_chunk(runtime, model, chunk_cameras(0.0), options=CacheOptions(enabled=False))
    assert stats.values["cache"] == "off" and stats.values["steps_reused"] == 0
    _, stats = run_chunk(runtime, model, chunk_cameras(4.0))
    assert stats.values["cache"] == "miss" and model.calls == 12


def cameras_at(*xs: float) -> torch.Tensor:
    """One camera per frame at (x, 0, 0), looking down +z: frames at different places."""
    eye = torch.tensor([[x, 0.0, 0.0] for x in xs])
    return look_at(eye, eye + torch.tensor([0.0, 0.0, 5.0]))


def per_frame_chunk(runtime, chunk, poses, values, sigmas=(1.0, 0.5, 0.0), latent=LATENT):
    """A 2-step chunk whose model output holds ``values[f] + step`` in frame ``f`` (frame axis 2 of
    ``latent``) under the schedule ``sigmas`` (per frame: ``(steps + 1, F)``); returns the outputs
    the runtime gave back, and its stats."""
    runtime.begin_chunk(chunk, poses, sigmas)
    outs = []
    for step in range(2):
        fresh = torch.stack([torch.full((1, 4, 3, 3), v + step) for v in values], 2)
        with torch.no_grad():
            outs.append(runtime.step("model", KEY, latent, lambda f=fresh: f))
    return outs, runtime.end_chunk().values


def test_a_retraced_path_hits_frame_by_frame_in_any_order():
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
    per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0])
    outs, stats = per_frame_chunk(runtime, 1, cameras_at(2.0, 0.0), [30.0, 40.0])  # walking back
    assert stats["cache"] == "hit" and stats["steps_reused"] == 1
    assert outs[0][0, 0, :, 0, 0].tolist() == [20.0, 10.0]  # each frame from its own place
    assert outs[1][0, 0, :, 0, 0].tolist() == [31.0, 41.0]  # the last step computes


def test_a_crossing_path_assembles_frames_from_several_past_chunks_and_a_new_place_misses():
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
    per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0])
    per_frame_chunk(runtime, 1, cameras_at(4.0, 6.0), [30.0, 40.0])
    outs, stats = per_frame_chunk(runtime, 2, cameras_at(6.0, 0.0), [50.0, 60.0])
    assert stats["cache"] == "hit" and outs[0][0, 0, :, 0, 0].tolist() == [40.0, 10.0]
    _, stats = per_frame_chunk(runtime, 3, cameras_at(0.0, 9.0), [70.0, 80.0])  # one frame somewhere new
    assert stats["cache"] == "miss" and stats["cache_near_misses"] == 1  # a partial revisit computes in full
    _, stats = per_frame_chunk(runtime, 4, cameras_at(20.0, 30.0), [90.0, 99.0])  # nowhere seen
    assert stats["cache"] == "miss" and stats["cache_near_misses"] == 0


STAGGERED = [[1.0, 0.5], [0.5, 0.25], [0.0, 0.0]]  # diffusion forcing: frame 1 is ahead of frame 0


def test_per_frame_schedules_serve_a_frame_only_from_a_past_frame_on_the_same_schedule():
    """Walking back reverses the frames: each place was generated by the other frame position, on the
    other column of a staggered schedule, so nothing may be served; with both columns equal the
    same walk hits, frame by frame."""
    for sigmas, expected in ((STAGGERED, "miss"), ([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]], "hit")):
        runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
        per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0], sigmas)
        outs, stats = per_frame_chunk(runtime, 1, cameras_at(2.0, 0.0), [30.0, 40.0], sigmas)
        assert stats["cache"] == expected
        assert outs[0][0, 0, :, 0, 0].tolist() == ([20.0, 10.0] if expected == "hit" else [30.0, 40.0])
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
    per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0], STAGGERED)
    _, stats = per_frame_chunk(runtime, 1, cameras_at(0.0, 2.0), [30.0, 40.0], STAGGERED)  # same order
    assert stats["cache"] == "hit"


@pytest.mark.parametrize("option", ["revisit_threshold", "near_threshold"])
def test_a_threshold_of_zero_never_matches_a_place_or_a_schedule_column_that_shares_nothing(option):
    """A frame scores 0 against a past frame far away or on another schedule column: never a match,
    even where the threshold accepts any score."""
    extra = {"revisit_threshold": 0.0} if option == "revisit_threshold" else {"near_threshold": 0.0, "near_reuse_steps": 1}
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw", **extra))
    per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0], STAGGERED)
    outs, stats = per_frame_chunk(runtime, 1, cameras_at(700.0, 900.0), [30.0, 40.0], STAGGERED)
    assert stats["cache"] == "miss" and outs[0][0, 0, :, 0, 0].tolist() == [30.0, 40.0]
    outs, stats = per_frame_chunk(runtime, 2, cameras_at(2.0, 0.0), [50.0, 60.0], STAGGERED)  # other columns
    assert stats["cache"] == "miss" and outs[0][0, 0, :, 0, 0].tolist() == [50.0, 60.0]
    cache = DenoiseCache(capacity=4)
    filled(cache, chunk_cameras(0.0))
    assert cache.lookup(chunk_cameras(300.0), STAMP, steps=2, threshold=0.0) is None  # whole-chunk matching


def test_a_per_frame_schedule_with_a_frame_clean_at_an_early_step_serves_only_the_steps_before():
    """Under ``"x0"`` a frame at noise level 0 has nothing to convert by: the steps from there on
    compute (no error, on a miss or a hit)."""
    early_clean = [[0.5, 1.0], [0.0, 0.66], [0.0, 0.33], [0.0, 0.0]]  # 3 steps: frame 0 clean from step 1
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=2))
    assert per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0], early_clean)[1]["cache"] == "miss"
    _, stats = per_frame_chunk(runtime, 1, cameras_at(0.0, 2.0), [30.0, 40.0], early_clean)
    assert stats["cache"] == "hit" and stats["steps_reused"] == 1 and stats["steps_computed"] == 1


def test_per_frame_noise_levels_convert_the_stored_clean_prediction_frame_by_frame():
    """``"x0"`` under per-frame sigmas: stored ``x0 = x - sigma_f * v`` and served
    ``v = (x - x0) / sigma_f``, each frame at its own level."""
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1))
    latent = torch.stack([torch.full((1, 4, 3, 3), 8.0), torch.full((1, 4, 3, 3), 6.0)], 2)
    per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0], STAGGERED, latent)
    # stored x0 = x - sigma * v: frame 0: 8 - 1.0 * 10 = -2; frame 1: 6 - 0.5 * 20 = -4
    outs, stats = per_frame_chunk(runtime, 1, cameras_at(0.0, 2.0), [30.0, 40.0], STAGGERED, latent)
    assert stats["cache"] == "hit"
    assert outs[0][0, 0, :, 0, 0].tolist() == [10.0, 20.0]  # (8 - -2) / 1.0 and (6 - -4) / 0.5


def test_the_last_axis_of_a_token_latent_is_its_channels_never_its_frames():
    assert frame_axis((1, 18, 2), 2) is None  # 2 frames of 9 tokens, 2 channels
    assert frame_axis((1, 2, 9), 2) == 1 and frame_axis((1, 4, 2, 3, 3), 2) == 2


def test_per_frame_sigmas_that_do_not_fit_the_chunk_are_refused_naming_them():
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1))
    with pytest.raises(ValueError, match=r"\(steps \+ 1, 2\)"):
        runtime.begin_chunk(0, cameras_at(0.0, 2.0), [[1.0, 0.5, 0.2], [0.0, 0.0, 0.0]])
    runtime.begin_chunk(0, cameras_at(0.0, 2.0), STAGGERED)
    square = torch.zeros(1, 2, 2, 3, 3)  # two axes of 2 entries: which one holds the frames is unknown
    with torch.no_grad(), pytest.raises(ValueError, match="exactly one axis of 2"):
        runtime.step("model", KEY, square, lambda: square)


def test_blend_serves_the_score_weighted_average_of_every_matching_past_frame():
    """Two past visits of the same place (values 10 and 30): ``"best"`` serves the first (oldest on a
    tie), ``"blend"`` their average; a place seen once is served as it was, in both."""
    served = {}
    for serve in ("best", "blend"):
        runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw", serve=serve))
        per_frame_chunk(runtime, 0, cameras_at(0.0, 2.0), [10.0, 20.0])
        per_frame_chunk(runtime, 1, cameras_at(0.0, 4.0), [30.0, 40.0])
        outs, stats = per_frame_chunk(runtime, 2, cameras_at(0.0, 2.0), [50.0, 60.0])
        assert stats["cache"] == "hit"
        served[serve] = outs[0][0, 0, :, 0, 0].tolist()
    assert served == {"best": [10.0, 20.0], "blend": [20.0, 20.0]}


def test_blend_on_a_hit_averages_only_frames_matching_at_the_revisit_threshold_whatever_near_revisits_do():
    """A past frame scoring between the near and the revisit threshold (6 degrees off) never enters
    a full hit's blend: turning near revisits on leaves a hit's output unchanged."""
    served = []
    for near_steps in (0, 1):
        options = CacheOptions(reuse_steps=1, stored="raw", serve="blend", near_reuse_steps=near_steps)
        runtime = DenoiseRuntime(options)
        per_frame_chunk(runtime, 0, yawed(0.0, 20.0), [10.0, 20.0])
        per_frame_chunk(runtime, 1, yawed(90.0, 120.0), [0.0, 0.0])
        per_frame_chunk(runtime, 2, yawed(6.0, 300.0), [30.0, 40.0])  # frame 0 near chunk 0's frame 0: stored
        per_frame_chunk(runtime, 3, yawed(200.0, 220.0), [0.0, 0.0])
        outs, stats = per_frame_chunk(runtime, 4, yawed(0.0, 20.0), [50.0, 60.0])  # an exact return
        assert stats["cache"] == "hit"
        served.append(outs[0][0, 0, :, 0, 0].tolist())
    assert served == [[10.0, 20.0], [10.0, 20.0]]


def test_auto_reuse_measures_its_first_revisits_and_then_serves_the_steps_that_stayed_close():
    """``reuse_steps="auto"``: the first two revisits compute every step and compare each early
    step's fresh output with the one the cache holds; step 0 repeats exactly, step 1 differs (about
    6 dB), so from then on one step is served; the last step always computes."""
    runtime = DenoiseRuntime(CacheOptions(reuse_steps="auto", stored="raw", reuse_target_db=30.0))
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]

    def chunk(index):
        runtime.begin_chunk(index, chunk_cameras(0.0), sigmas)
        for step in range(4):
            value = 1.0 + step + (0.5 * index if step == 1 else 0.0)  # step 1 drifts from chunk to chunk
            with torch.no_grad():
                runtime.step("model", KEY, LATENT, lambda v=value: torch.full(LATENT.shape, v))
        return runtime.end_chunk().values

    first = chunk(0)
    assert first["cache"] == "miss" and first["reuse_auto"]["chosen"] == "calibrating"
    for index in (1, 2):
        stats = chunk(index)
        assert stats["cache"] == "calibration" and stats["steps_reused"] == 0 and stats["steps_computed"] == 4
    assert stats["reuse_auto"]["chosen"] == 1 and stats["reuse_auto"]["worst_db"][0] == 100.0
    assert stats["reuse_auto"]["worst_db"][1] < 30.0
    served = chunk(3)
    assert served["cache"] == "hit" and served["steps_reused"] == 1 and served["steps_computed"] == 3


@pytest.mark.parametrize("target_db, chosen", [(0.0, 3), (30.0, 1), (100.5, 0)])
def test_auto_reuse_serves_fewer_steps_as_the_target_rises(target_db, chosen):
    """Step 0 repeats exactly (100 dB, the cap), step 1 drifts (about 6-10 dB), step 2 a little less:
    a target of 0 dB serves every early step, 30 dB only step 0, above the cap none."""
    runtime = DenoiseRuntime(CacheOptions(reuse_steps="auto", stored="raw", reuse_target_db=target_db))
    for index in range(3):
        runtime.begin_chunk(index, chunk_cameras(0.0), [1.0, 0.75, 0.5, 0.25, 0.0])
        for step in range(4):
            value = 1.0 + step + (0.5 * index if step in (1, 2) else 0.0)
            with torch.no_grad():
                runtime.step("model", KEY, LATENT, lambda v=value: torch.full(LATENT.shape, v))
        stats = runtime.end_chunk().values
    assert stats["reuse_auto"]["chosen"] == chosen


def test_a_path_that_never_comes_back_never_hits():
    """The explore trajectory's chunks, frame by frame: every chunk is new ground."""
    from li_compile.worlds import trajectories

    poses = trajectories.make("explore", 32).poses.float()
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
    for chunk in range(16):
        _, stats = per_frame_chunk(runtime, chunk, poses[2 * chunk:2 * chunk + 2], [float(chunk), float(chunk)])
        assert stats["cache"] == "miss"


def test_an_output_not_shaped_like_the_latent_is_refused_naming_both_shapes():
    runtime = DenoiseRuntime(CacheOptions(reuse_steps=1, stored="raw"))
    runtime.begin_chunk(0, cameras_at(0.0, 2.0), [1.0, 0.5, 0.0])
    with torch.no_grad(), pytest.raises(ValueError, match=r"noisy latent \(1, 4, 2, 3, 3\).*returned \(1, 2, 2, 3, 3\)"):
        runtime.step("model", KEY, LATENT, lambda: torch.zeros(1, 2, 2, 3, 3))


def yawed(*degrees: float) -> torch.Tensor:
    """One camera per frame at the origin, turned ``degrees`` about the vertical axis from +z. Turned
    2 degrees from another it matches it at about 0.93, 4 degrees at 0.88, 10 degrees at 0.73."""
    radians = torch.tensor(degrees) * torch.pi / 180
    target = torch.stack([5 * radians.sin(), torch.zeros_like(radians), 5 * radians.cos()], -1)
    return look_at(torch.zeros(len(degrees), 3), target)


def test_a_near_revisit_serves_only_its_first_near_reuse_steps_and_stores_nothing():
    options = CacheOptions(reuse_steps=2, stored="raw", near_threshold=0.8, near_reuse_steps=1)
    runtime, model = DenoiseRuntime(options), Model()
    first, _ = run_chunk(runtime, model, yawed(0.0, 20.0), options=options)
    outs, stats = run_chunk(runtime, model, yawed(4.0, 20.0), options=options)  # one frame turned: 0.88
    assert stats.values["cache"] == "near hit" and stats.values["cache_near_hits"] == 1
    assert stats.values["cache_hits"] == 0 and stats.values["steps_reused"] == 1
    assert torch.equal(outs[0], first[0])  # step 0 served from the first chunk
    assert model.calls == 4 + 3  # steps 1, 2 and 3 computed
    assert len(runtime.cache) == 1  # what a near hit computed is not kept as a revisit source
    outs, stats = run_chunk(runtime, model, yawed(2.0, 20.0), options=options)  # 0.93: a revisit
    assert stats.values["cache"] == "hit" and stats.values["steps_reused"] == 2


@pytest.mark.parametrize("near", [dict(), dict(near_threshold=0.9, near_reuse_steps=1)], ids=["default", "threshold"])
def test_near_revisits_by_default_or_below_the_near_threshold_compute_in_full(near):
    options = CacheOptions(reuse_steps=2, stored="raw", **near)
    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(0.0, 0.0), options=options)
    _, stats = run_chunk(runtime, model, yawed(4.0, 0.0), options=options)
    assert stats.values["cache"] == "miss" and stats.values["steps_reused"] == 0 and model.calls == 8
    assert stats.values["cache_near_misses"] == 1 and stats.values["cache_near_hits"] == 0


def test_a_near_match_that_only_continues_the_path_from_the_chunk_before_is_a_miss():
    """A camera turning on from where the last chunk ended near-matches that chunk's last frame with
    every frame (``explore``'s 2-frame chunks: 0.93 and 0.86). That is the path going on, not a
    return: it computes in full. The same near match with another chunk in between comes back to
    that frame: a near hit; so is a chunk whose frames match other frames of the chunk before."""
    options = CacheOptions(reuse_steps=2, stored="raw", near_threshold=0.8, near_reuse_steps=1)
    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(-4.0, 0.0), options=options, chunk=0)
    _, stats = run_chunk(runtime, model, yawed(5.0, 6.0), options=options, chunk=1)  # both best: chunk 0's 0 degrees
    assert stats.values["cache"] == "miss" and stats.values["cache_near_misses"] == 1 and model.calls == 8

    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(-4.0, 0.0), options=options, chunk=0)
    run_chunk(runtime, model, yawed(90.0, 95.0), options=options, chunk=1)  # elsewhere
    _, stats = run_chunk(runtime, model, yawed(5.0, 6.0), options=options, chunk=2)  # back to chunk 0's end
    assert stats.values["cache"] == "near hit" and stats.values["steps_reused"] == 1

    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(-4.0, 0.0), options=options, chunk=0)
    _, stats = run_chunk(runtime, model, yawed(-8.0, 5.0), options=options, chunk=1)  # best: chunk 0's first, then last
    assert stats.values["cache"] == "near hit"


@pytest.mark.parametrize("numbers", [(0, 2), (5, 3), (1, 1)])
def test_the_chunk_just_before_is_the_one_generated_last_whatever_its_number(numbers):
    options = CacheOptions(reuse_steps=2, stored="raw", near_threshold=0.8, near_reuse_steps=1)
    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(-4.0, 0.0), options=options, chunk=numbers[0])
    _, stats = run_chunk(runtime, model, yawed(5.0, 6.0), options=options, chunk=numbers[1])
    assert stats.values["cache"] == "miss"


def test_a_path_going_on_from_a_served_chunk_is_a_miss_though_that_chunk_was_not_stored():
    options = CacheOptions(reuse_steps=2, stored="raw", near_threshold=0.8, near_reuse_steps=1)
    runtime, model = DenoiseRuntime(options), Model()
    kinds = [run_chunk(runtime, model, poses, options=options, chunk=c)[1].values["cache"]
             for c, poses in enumerate((yawed(-4.0, 0.0), yawed(90.0, 95.0), yawed(-4.0, 0.0), yawed(5.0, 6.0)))]
    assert kinds == ["miss", "miss", "hit", "miss"]


def test_a_path_going_on_is_a_miss_when_chunks_are_matched_whole_too():
    """A latent with no single frame axis (two axes of the frame count) is matched chunk by chunk."""
    options = CacheOptions(reuse_steps=2, stored="raw", near_threshold=0.8, near_reuse_steps=1)
    latent = torch.zeros(1, 4, 2, 2, 3)
    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(-4.0, 0.0), options=options, x=latent)
    _, stats = run_chunk(runtime, model, yawed(2.0, 4.0), options=options, x=latent, chunk=1)
    assert stats.values["cache"] == "miss"
    run_chunk(runtime, model, yawed(90.0, 95.0), options=options, x=latent, chunk=2)  # elsewhere
    _, stats = run_chunk(runtime, model, yawed(-8.0, -4.0), options=options, x=latent, chunk=3)  # chunk 0, 4 degrees off
    assert stats.values["cache"] == "near hit"


def test_a_near_revisit_never_serves_more_steps_than_a_revisit():
    options = CacheOptions(reuse_steps=1, stored="raw", near_threshold=0.8, near_reuse_steps=3)
    runtime, model = DenoiseRuntime(options), Model()
    run_chunk(runtime, model, yawed(0.0, 0.0), options=options)
    run_chunk(runtime, model, yawed(90.0, 95.0), options=options, chunk=1)  # elsewhere: the next is a return
    _, stats = run_chunk(runtime, model, yawed(4.0, 4.0), options=options, chunk=2)
    assert stats.values["cache"] == "near hit" and stats.values["steps_reused"] == 1


def test_a_whole_chunk_lookup_scores_a_near_hit_below_the_threshold_and_leaves_the_entry_as_stored():
    cache = DenoiseCache(capacity=4)
    entry = filled(cache, yawed(0.0, 0.0))
    near = cache.lookup(yawed(4.0, 4.0), STAMP, steps=2, threshold=0.9, near_threshold=0.8)
    assert near is not entry and near.outputs is entry.outputs and 0.8 <= near.score < 0.9 and entry.score == 1.0
    assert cache.lookup(yawed(4.0, 4.0), STAMP, steps=2, threshold=0.9) is None
    assert cache.lookup(yawed(10.0, 10.0), STAMP, steps=2, threshold=0.9, near_threshold=0.8) is None
    assert (cache.stats.hits, cache.stats.near_hits, cache.stats.misses) == (0, 1, 2)
    with pytest.raises(ValueError, match="near_threshold must be in"):
        cache.lookup(yawed(0.0, 0.0), STAMP, steps=2, threshold=0.8, near_threshold=0.9)


def test_sigmas_may_be_0d_tensors_or_numpy_values_and_a_single_level_is_refused():
    """``list(spec.sigmas())`` (0-d tensors) is a schedule like the floats; a 0-d tensor, a number
    or a string is not, and the error says what is expected."""
    import numpy

    from li_compile.denoise_runtime import check_sigmas

    levels = [1.0, 0.5, 0.0]
    assert check_sigmas(list(torch.tensor(levels)), 2) == levels
    assert check_sigmas(numpy.array(levels), 2) == levels
    assert check_sigmas([torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])], 2) == [(1.0, 1.0), (0.0, 0.0)]
    for bad in (torch.tensor(0.5), 0.5, "1.0", {1.0: 0, 0.0: 1}, {1.0, 0.0}, (s for s in levels)):
        with pytest.raises(ValueError, match="steps \\+ 1 noise levels"):
            check_sigmas(bad, 2)
    for bad in (["1.0", "0.0"], [1.0, None], [True, False]):
        with pytest.raises(ValueError, match="sigmas must be numbers"):
            check_sigmas(bad, 2)
    with pytest.raises(ValueError, match="all numbers or all per-frame rows"):
        check_sigmas([1.0, [0.5, 0.5], 0.0], 2)
