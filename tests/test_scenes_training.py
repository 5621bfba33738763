"""Specifications of the trained world's pieces: pixel codec, training clips, training loop, fidelity."""

from dataclasses import replace

import pytest
import torch

from li_compile.controller.similarity import MEASURES, similarity
from training import data as training_data, recipe as training
from li_compile.worlds.fidelity import prefix_hook
from training.fidelity import evaluate, held_out_cases, revisit_frames
from li_compile.worlds.report_tools import frame_psnr
from li_compile.worlds.hy_worldplay import build
from li_compile.worlds.pipeline import DensePolicy, chunk_noise, gather_context, generate
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trained import IMAGE_SIZE, TRAINED_SPEC, load_trained
from training.recipe import (
    TrainConfig, averaged_weights, export_weights, flow_matching_loss, new_world, roll_out, train,
)
from training.data import Rollouts, dense_context_slots, make_pool, pairwise_similarity, sample_batch
from li_compile.worlds.trajectories import Trajectory, make

# the trained preset's shapes at 16x16 pixels and one small block: same code, fast on CPU
TINY = replace(TRAINED_SPEC, name="trained/test", latent_h=4, latent_w=4, depth=1, heads=2, head_dim=16)
IMAGE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool waits that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    return make_pool(2, 12, TINY, seed=0, device="cpu", image_size=IMAGE)


def test_pixel_codec_round_trips_frames_exactly():
    codec = PixelPatchCodec(4)
    frames = torch.rand(2, 5, 3, 16, 8)
    latents = codec.encode(frames)
    assert latents.shape == (2, 5, 48, 4, 2)
    torch.testing.assert_close(codec.decode(latents), frames, atol=1e-6, rtol=0)


def test_pixel_codec_refuses_frames_not_divisible_by_the_stride():
    with pytest.raises(ValueError, match="divisible by 4"):
        PixelPatchCodec(4).encode(torch.rand(3, 10, 8))


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_pairwise_similarity_equals_the_measure_of_each_pair(measure):
    poses = make("random_walk_with_returns", 10, seed=3).poses
    batched = pairwise_similarity(poses[None], measure)[0]
    for i in (0, 4, 9):
        torch.testing.assert_close(batched[i], similarity(poses[i], poses, measure), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["out_and_back", "random_walk_with_returns"])
def test_training_context_is_what_dense_policy_feeds_the_generation_loop(name):
    poses = make(name, 24, seed=1).poses
    policy = DensePolicy(window=4, memory=4)
    slots = dense_context_slots(poses[None], chunk_frames=4, window=4, memory=4)[0]
    for c in range(1, 6):
        chosen = policy.select(c, poses[:4 * c], poses[4 * c:4 * c + 4], torch.empty(0))
        ours = [f for f in slots[c].tolist() if f >= 0]
        assert ours[len(ours) - len(chosen.recent):] == chosen.recent
        # memory: same count and same scores (exact revisits tie, so indices may differ)
        theirs_mem, ours_mem = chosen.memory, ours[:len(ours) - len(chosen.recent)]
        assert len(ours_mem) == len(theirs_mem)
        score = torch.stack([similarity(p, poses[:4 * c], policy.measure) for p in poses[4 * c:4 * c + 4]]).amax(0)
        torch.testing.assert_close(score[ours_mem].sort().values, score[theirs_mem].sort().values, atol=1e-6, rtol=0)


def test_teacher_forced_batch_matches_the_inputs_the_generation_loop_builds(pool, monkeypatch):
    monkeypatch.setattr(training_data, "CONTEXT_NOISE", 0.0)
    monkeypatch.setattr(training_data, "MEMORY_DROPOUT", 0.0)
    codec, world = PixelPatchCodec(4), build(TINY)
    batch = sample_batch(pool, 6, TINY, codec, torch.Generator().manual_seed(0))
    assert batch["target"].shape == (6, 4, 48, 4, 4) and batch["context"].shape == (6, 8, 48, 4, 4)
    # rebuild example 0 the way pipeline.generate does, from the clip it came from
    for clip in range(len(pool)):
        for c in range(1, pool.slots.shape[1]):
            frames = pool.frames[clip, 4 * c:4 * c + 4].float() / 255
            if not torch.equal(codec.encode(frames), batch["target"][0]):
                continue
            history = codec.encode(pool.frames[clip, :4 * c].float() / 255)
            selection = DensePolicy(4, 4).select(c, pool.poses[clip, :4 * c], pool.poses[clip, 4 * c:4 * c + 4], history)
            context = gather_context(history, pool.poses[clip, :4 * c], selection, TINY.context_frames)
            inputs = world.inputs(context, pool.poses[clip, 4 * c:4 * c + 4], pool.actions[clip, 4 * c:4 * c + 4], 4 * c)
            torch.testing.assert_close(batch["context_valid"][0], inputs["context_valid"][0])
            torch.testing.assert_close(batch["camera"][0], inputs["camera"][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch["actions"][0], inputs["actions"][0])
            if selection.memory == [f for f in pool.slots[clip, c, :4].tolist() if f >= 0]:
                torch.testing.assert_close(batch["context"][0], inputs["context"][0])
            return
    pytest.fail("the batch's first target is no chunk of the pool")


def test_memory_dropout_removes_only_memory_slots(pool, monkeypatch):
    monkeypatch.setattr(training_data, "MEMORY_DROPOUT", 1.0)
    batch = sample_batch(pool, 4, TINY, PixelPatchCodec(4), torch.Generator().manual_seed(1))
    assert not batch["context_valid"][:, :4].any() and batch["context_valid"][:, 4:].all()
    assert (batch["context"][:, :4] == 0).all()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_a_revisit_example_remembers_the_chunk_itself_at_its_own_cameras(pool, monkeypatch, fraction):
    """``revisit_fraction=1``: every memory slot holds a frame of the chunk, seen from the chunk's
    camera (the recent window is untouched); 0: the memory ``DensePolicy`` picked."""
    monkeypatch.setattr(training_data, "CONTEXT_NOISE", 0.0)
    monkeypatch.setattr(training_data, "MEMORY_DROPOUT", 0.0)
    plain = sample_batch(pool, 6, TINY, PixelPatchCodec(4), torch.Generator().manual_seed(8))
    batch = sample_batch(pool, 6, TINY, PixelPatchCodec(4), torch.Generator().manual_seed(8), revisit_fraction=fraction)
    revisit = fraction == 1.0
    assert torch.equal(batch["context"][:, :4], batch["target"]) == revisit
    assert torch.equal(batch["camera"][:, :4], batch["camera"][:, 8:]) == revisit
    assert torch.equal(batch["target"], plain["target"])  # the same chunks ...
    assert torch.equal(batch["context"][:, 4:], plain["context"][:, 4:])  # ... and the same recent window
    assert torch.equal(batch["context"][:, :4], plain["context"][:, :4]) != revisit
    with pytest.raises(ValueError, match="revisit_fraction must be in"):
        TrainConfig(revisit_fraction=-0.1)


def test_roll_out_generates_what_the_generation_loop_does(pool):
    """Self-forcing's context: each clip rolled out in a batch equals ``generate`` along the clip's
    cameras from its true first chunk with the same noise (fp32)."""
    codec, world, seed = PixelPatchCodec(4), build(TINY, seed=3), 7
    clips = torch.tensor([1, 0])
    rolled = roll_out(world, pool, clips, codec, lambda c: chunk_noise(world, c, seed).expand(-1, 2, -1, -1, -1, -1))
    for row, clip in enumerate(clips.tolist()):
        truth = pool.frames[clip].float() / 255
        hook = prefix_hook(world, codec.encode(truth[:4]), seed)
        loop = generate(world, Trajectory("pool", pool.poses[clip]), step_hook=hook, seed=seed, decode=False)
        torch.testing.assert_close(rolled.latents[row], loop.latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rolled.latents[:, 4:], codec.encode(pool.frames[clips, 4:].float() / 255))


def test_a_self_forced_batch_reads_its_context_from_the_rollouts(pool, monkeypatch):
    monkeypatch.setattr(training_data, "CONTEXT_NOISE", 0.0)
    monkeypatch.setattr(training_data, "MEMORY_DROPOUT", 0.0)
    codec = PixelPatchCodec(4)
    rollouts = Rollouts(torch.tensor([1]), torch.randn(1, 12, *TINY.latent_shape))
    batch = sample_batch(pool, 6, TINY, codec, torch.Generator().manual_seed(6), rollouts)
    truth = codec.encode(pool.frames[1].float() / 255)
    for i in range(6):
        chunk = next(c for c in (1, 2) if torch.equal(batch["target"][i], truth[4 * c:4 * c + 4]))
        slots = pool.slots[1, chunk]
        expected = rollouts.latents[0, slots.clamp_min(0)] * (slots >= 0)[:, None, None, None]
        torch.testing.assert_close(batch["context"][i], expected, atol=0, rtol=0)


def test_a_second_stage_starts_from_its_init_weights_and_trains_on_rollouts(pool, tmp_path):
    """``init`` loads the weights (with lr 0 they stay: the average is them); a self-forced run
    (``rollout_fraction``) takes its steps; a fraction outside [0, 1] is refused."""
    start = build(TINY, seed=4)
    export_weights(start.model.state_dict(), tmp_path / "start.pt")
    config = TrainConfig(steps=2, batch=4, sigma_groups=2, lr=0.0, clips=2, clip_frames=12,
                         init=str(tmp_path / "start.pt"), rollout_fraction=0.5, rollout_clips=2, rollout_every=1)
    state = train(config, "cpu", pool=pool, spec=TINY)
    assert state.step == 2 and all(torch.isfinite(torch.tensor(state.losses)))
    saved = torch.load(tmp_path / "start.pt", weights_only=True)
    for k, v in averaged_weights(state, config.ema).items():
        torch.testing.assert_close(v, saved[k].float(), atol=1e-6, rtol=1e-3)
    with pytest.raises(ValueError, match="rollout_fraction must be in"):
        TrainConfig(rollout_fraction=1.5)


@pytest.mark.parametrize("output", ["x0", "velocity"])
def test_untrained_world_predicts_zero_so_the_loss_is_the_power_of_its_target(pool, output):
    """The zeroed output layer predicts 0: a clean chunk of 0 (x0 world, loss = power of the clean
    chunk) or a velocity of 0 (velocity world, loss = power of ``noise - x0``)."""
    spec = replace(TINY, output=output)
    world = new_world("cpu", spec)
    batch = sample_batch(pool, 4, spec, PixelPatchCodec(4), torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    loss = flow_matching_loss(world, batch, 0.5, gen)
    noise = torch.randn(batch["target"].shape, generator=torch.Generator().manual_seed(3))
    target = batch["target"] if output == "x0" else noise - batch["target"]
    torch.testing.assert_close(loss, target.pow(2).mean())


def test_qk_gain_scales_the_attention_logits_a_fresh_world_starts_with(pool):
    """The QK RMSNorm weights start at ``qk_gain``, so every self-attention logit is ``gain^2``
    times the gain-1 world's (same seed): sharper attention from the first step."""
    batch = sample_batch(pool, 2, TINY, PixelPatchCodec(4), torch.Generator().manual_seed(2))
    logits = {}
    for gain in (1.0, 1.5):
        world = new_world("cpu", TINY, qk_gain=gain)
        block = world.model.blocks[0]
        seen = []
        block.q_norm.register_forward_hook(lambda m, i, o: seen.append(o))
        block.k_norm.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            flow_matching_loss(world, batch, 0.5, torch.Generator().manual_seed(3))
        logits[gain] = seen[0] @ seen[1].transpose(-1, -2)
    torch.testing.assert_close(logits[1.5], 1.5**2 * logits[1.0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="qk_gain must be > 0"):
        new_world("cpu", TINY, qk_gain=0.0)


def test_training_lowers_the_loss_on_a_fixed_batch(pool):
    config = TrainConfig(steps=30, batch=8, sigma_groups=2, lr=3e-3, warmup=2, clips=2, clip_frames=12)
    batch = sample_batch(pool, 8, TINY, PixelPatchCodec(4), torch.Generator().manual_seed(4))

    def loss(world):
        with torch.no_grad():
            return flow_matching_loss(world, batch, 0.5, torch.Generator().manual_seed(5)).item()

    assert loss(train(config, "cpu", pool=pool, spec=TINY).world) < 0.8 * loss(new_world("cpu", TINY))


def test_resumed_constant_lr_run_equals_the_uninterrupted_run(pool, tmp_path):
    config = TrainConfig(steps=6, batch=4, sigma_groups=2, warmup=1, final_lr_fraction=1.0, clips=2,
                         clip_frames=12, checkpoint_every=3)
    whole = train(config, "cpu", pool=pool, spec=TINY)
    ckpt = tmp_path / "ckpt.pt"
    train(replace(config, steps=3), "cpu", ckpt, pool=pool, spec=TINY)
    resumed = train(config, "cpu", ckpt, pool=pool, spec=TINY)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    for k in whole.ema:
        torch.testing.assert_close(resumed.ema[k], whole.ema[k])


def test_compiled_training_takes_the_steps_eager_training_takes(pool):
    config = TrainConfig(steps=2, batch=4, sigma_groups=2, warmup=1, clips=2, clip_frames=12)
    eager = train(config, "cpu", pool=pool, spec=TINY)
    compiled = train(replace(config, compile=True), "cpu", pool=pool, spec=TINY)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    for k, v in eager.world.model.state_dict().items():  # same keys: the weights export as eager ones do
        torch.testing.assert_close(compiled.world.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_averaged_weights_of_a_constant_model_are_that_model(pool):
    config = TrainConfig(steps=3, batch=2, sigma_groups=1, lr=0.0, clips=2, clip_frames=12, ema=0.999)
    state = train(config, "cpu", pool=pool, spec=TINY)
    for k, v in averaged_weights(state, config.ema).items():
        torch.testing.assert_close(v, state.world.model.state_dict()[k])


def test_averaged_weights_take_buffers_as_the_model_holds_them(pool):
    """A setting kept as a buffer (PRoPE's unit) is not averaged: it comes out bit for bit."""
    spec = replace(TINY, prope_unit=3.7)
    config = TrainConfig(steps=2, batch=2, sigma_groups=1, clips=2, clip_frames=12)
    state = train(config, "cpu", pool=pool, spec=spec)
    averaged = averaged_weights(state, config.ema)
    assert torch.equal(averaged["prope.unit"], state.world.model.prope.unit)


@pytest.mark.parametrize("budget_s, expected", [(1e6, 12), (1e-6, 4)])
def test_a_time_budget_sets_the_schedule_length_from_the_measured_speed(pool, monkeypatch, budget_s, expected):
    monkeypatch.setattr(training, "SPEED_WARMUP_STEPS", 2)
    monkeypatch.setattr(training, "SPEED_PROBE_STEPS", 4)
    config = TrainConfig(steps=12, batch=2, sigma_groups=1, clips=2, clip_frames=12)
    state = train(config, "cpu", time_budget_s=budget_s, pool=pool, spec=TINY)
    assert state.total_steps == expected and state.step == expected


@pytest.mark.parametrize("chunks", [1, 2])
def test_prefix_hook_makes_the_first_chunks_the_given_frames(chunks):
    world = build(TINY)
    prefix = torch.randn(4 * chunks, *TINY.latent_shape)
    trajectory = make("loop", 12, seed=0)
    plain = generate(world, trajectory, seed=5, decode=False)
    result = generate(world, trajectory, step_hook=prefix_hook(world, prefix, seed=5), seed=5, decode=False)
    torch.testing.assert_close(result.latents[:4 * chunks], prefix, atol=1e-5, rtol=0)
    assert not torch.allclose(result.latents[4 * chunks:], plain.latents[4 * chunks:])  # generated from that history
    with pytest.raises(ValueError, match="latents of whole chunks"):
        prefix_hook(world, prefix[:3], seed=5)


def test_revisit_frames_are_the_returning_half_of_out_and_back():
    poses = make("out_and_back", 32, seed=0).poses
    flags = revisit_frames(poses, chunk_frames=4, window=4)
    assert not flags[:17].any()  # going out, and the first steps back are still in the window
    assert flags[24:].all()


def test_frame_psnr_averages_the_psnr_of_each_frame():
    truth = torch.zeros(2, 3, 8, 8)
    pred = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])  # 20 dB and 40 dB
    assert frame_psnr(pred, truth) == pytest.approx(30.0, abs=1e-4)


@pytest.mark.parametrize("heads, depth, rays, prope_unit", [(2, 1, True, None), (3, 2, False, 3.7)])
def test_load_trained_reads_the_sizes_and_camera_rays_from_the_weights(tmp_path, heads, depth, rays, prope_unit):
    spec = replace(TINY, heads=heads, depth=depth, ray_fov_deg=60.0 if rays else None, prope_unit=prope_unit)
    world = new_world("cpu", spec)
    export_weights(world.model.state_dict(), tmp_path / "w.pt")
    loaded = load_trained("cpu", tmp_path / "w.pt", TINY)
    # the unit comes back as the float32 the model held (not rounded to float16 with the weights)
    assert loaded.spec == replace(spec, prope_unit=None if prope_unit is None else float(torch.tensor(prope_unit)))
    assert (loaded.model.rays is not None) == rays
    assert (loaded.model.prope is not None) == (prope_unit is not None)


def test_shipped_weights_bring_back_revisited_places_from_memory_and_beat_repeating_the_last_frame():
    world, codec = load_trained(), PixelPatchCodec(4)
    case = held_out_cases(24, 1, IMAGE_SIZE, names=("loop",))
    scores = evaluate(world, codec, case)
    result = scores["mean"]
    assert result["psnr_revisit_memory"] > result["psnr_revisit_no_memory"] + 0.5
    assert result["psnr_video_revisit_memory"] > result["psnr_video_revisit_no_memory"] + 0.5
    # a world that has stopped predicting (weights, camera encoding or sampler broken) falls to
    # repeat-last's score or below; the shipped weights sit 2-4 dB above it (trained_world.md)
    assert result["psnr_dense"] > result["psnr_repeat_last"] + 1.0
    assert result["psnr_video_dense"] > result["psnr_video_repeat_last"] + 1.0
    # the loop's period is 16 frames: frame 19 is the last given frame 3 again, which repeat-last gets
    # exactly (PSNR_CAP_DB in the per-frame mean, a zero error in the video PSNR)
    assert scores["cases"][0]["repeat_last_exact_frames"] == 1
    assert result["psnr_video_repeat_last"] < result["psnr_repeat_last"] - 1.0


def test_the_trained_preset_is_the_shipped_world_and_decodes_pixels_with_its_codec():
    """``build("trained")`` (what ``--preset trained`` runs) is ``load_trained()``: same weights, and
    generated latents decode with the pixel codec, not the random stand-in decoder."""
    world, shipped = build("trained"), load_trained()
    assert world.spec == TRAINED_SPEC
    for (name, a), b in zip(world.model.state_dict().items(), shipped.model.state_dict().values()):
        assert torch.equal(a, b), name
    frames = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    codec = PixelPatchCodec(4)
    assert torch.allclose(world.decode(codec.encode(frames)), frames, atol=1e-6)
