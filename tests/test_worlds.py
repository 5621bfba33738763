"""Specifications of the reference worlds: trajectories, the generation loop, the two tiny DiTs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from li_compile.controller.poses import camera_centers, validate_poses, view_directions
from li_compile.controller.similarity import frustum_overlap
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.base import X0_MIN_SIGMA, Context
from li_compile.worlds.layers import CameraRope, RayEmbedder, apply_camera_rope, camera_features, patchify, unpatchify
from training.scenes import camera_rays
from li_compile.worlds.pipeline import ContextSelection, DensePolicy, gather_context, generate, warm_up
from li_compile.worlds.sampling import euler_step, renoise_step, sigma_schedule

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
# every world and form the generic specifications below hold for: (module, build's keyword arguments)
FORMS = {"hy_worldplay": (hy_worldplay, {}), "matrix_game3": (matrix_game3, {}),
         "matrix_game3_cached": (matrix_game3, {"form": "cached"})}
CHUNKS = 6


@pytest.fixture(scope="module", params=sorted(FORMS))
def world(request):
    module, kwargs = FORMS[request.param]
    return module.build("tiny", seed=0, **kwargs)


def _trajectory(world, name="random_walk_with_returns", chunks=CHUNKS):
    return trajectories.make(name, chunks * world.spec.chunk_frames, seed=1)


def _revisits(poses: torch.Tensor, atol: float = 1e-4) -> list[tuple[int, int]]:
    """Pairs (earlier i, later j), j > i + 1, of cameras with the same centre and view direction."""
    centers, dirs = camera_centers(poses), view_directions(poses)
    close = ((centers[:, None] - centers[None]).norm(dim=-1) < atol) & ((dirs[:, None] - dirs[None]).norm(dim=-1) < atol)
    return [(i, j) for j in range(len(poses)) for i in range(j - 1) if close[j, i]]


# --- trajectories -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(trajectories.REVISITING))
@pytest.mark.parametrize("seed", [0, 3])
def test_every_revisiting_trajectory_is_valid_seeded_and_really_revisits(name, seed):
    traj = trajectories.make(name, 32, seed)
    assert traj.poses.shape == (32, 4, 4) and traj.poses.dtype == torch.float32
    validate_poses(traj.poses)
    torch.testing.assert_close(traj.poses, trajectories.make(name, 32, seed).poses, rtol=0, atol=0)
    pairs = _revisits(traj.poses)
    assert pairs, f"{name} never comes back to an earlier camera"
    i, j = pairs[0]
    assert frustum_overlap(traj.poses[j], traj.poses[i : i + 1]).item() > 0.99


def test_trajectories_explore_before_they_return():
    traj = trajectories.make("out_and_back", 32)
    far_point = camera_centers(traj.poses).norm(dim=-1).max().item()
    assert far_point > 10 * trajectories.STEP  # goes far enough that early memory stops being visible
    assert frustum_overlap(traj.poses[15], traj.poses[:1]).item() < 0.5


def test_unknown_trajectory_and_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="trajectory must be one of"):
        trajectories.make("zigzag", 8)
    with pytest.raises(ValueError, match="frames must be an int >= 2"):
        trajectories.make("loop", 1)


def test_actions_follow_the_motion():
    out_back = trajectories.make("out_and_back", 20).actions()
    forward, back, left, right, yaw, pitch = out_back.unbind(-1)
    assert out_back.shape == (20, trajectories.ACTION_DIM)
    assert torch.all(out_back[0] == 0)
    assert forward[1:10].all() and not back[1:10].any()  # walking out
    assert back[12:].all() and not forward[12:].any()  # retreating, facing the same way
    assert not (left.any() or right.any())
    loop = trajectories.make("loop", 12, seed=0)
    turn = torch.sign(loop.actions()[1:, 4])
    assert (turn == turn[0]).all() and turn[0] != 0  # a circle turns one way, every frame
    orbit = trajectories.make("orbit", 12, seed=0).actions()
    assert (orbit[1:, 2] + orbit[1:, 3] == 1).all()  # circling a point is strafing sideways


# --- sampler, tokens ----------------------------------------------------------------------------


def test_sigma_schedule_runs_from_noise_to_clean_and_shifts_towards_noise():
    plain, shifted = sigma_schedule(4), sigma_schedule(4, shift=7.0)
    assert plain[0] == 1 and plain[-1] == 0 and torch.all(plain[1:] < plain[:-1])
    assert torch.all(shifted[1:-1] > plain[1:-1])
    with pytest.raises(ValueError, match="steps"):
        sigma_schedule(0)


def test_samplers_reach_the_clean_latent_with_the_exact_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    sigmas = sigma_schedule(3, shift=5.0)
    x = noise
    for s in range(3):  # a straight path: the exact velocity is constant
        x = euler_step(x, noise - x0, sigmas[s], sigmas[s + 1])
    torch.testing.assert_close(x, x0)
    x_half = 0.5 * x0 + 0.5 * noise
    torch.testing.assert_close(renoise_step(x_half, noise - x0, torch.tensor(0.5), torch.tensor(0.0), noise), x0)


def test_patchify_round_trips():
    x = torch.randn(2, 3, 4, 8, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 3 * 4 * 3, 16)
    torch.testing.assert_close(unpatchify(tokens, 3, 4, 8, 6, 2), x, rtol=0, atol=0)


def test_ray_embedding_gives_each_latent_pixel_the_renderers_ray_in_pluecker_coordinates():
    """Directions are the renderer's rays of the camera seen from the reference camera, moments are
    origin x direction, and a camera slid along one pixel's ray keeps that pixel's coordinates."""
    poses = trajectories.make("random_walk_with_returns", 6, seed=2).poses
    embedder = RayEmbedder(60.0, 4, 6, 2, 8)
    rays = embedder.plucker(camera_features(poses[0], poses)[None])[0]  # (T, 24, 6)
    origins, dirs = camera_rays(torch.linalg.solve(poses[0], poses), 60.0, (4, 6), 1)  # seen from camera 0
    torch.testing.assert_close(rays[..., :3], dirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rays[..., 3:], torch.linalg.cross(origins, dirs, dim=-1), rtol=1e-5, atol=1e-5)
    slid = poses[3].clone()
    slid[:3, 3] += 0.7 * (poses[3][:3, :3] @ embedder.local_dirs[5])  # along pixel 5's ray
    moved = embedder.plucker(camera_features(poses[0], torch.stack([poses[3], slid]))[None])[0]
    torch.testing.assert_close(moved[1, 5], moved[0, 5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[1, 4], moved[0, 4], atol=1e-3)  # other pixels' rays did move
    camera = camera_features(poses[0], poses)[None]
    assert embedder(camera).shape == (1, 6 * 2 * 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs: the rays stay float32
        torch.testing.assert_close(embedder.plucker(camera)[0], rays, rtol=0, atol=0)


def test_ray_worlds_are_validated_and_hy_only():
    with pytest.raises(ValueError, match="ray_fov_deg must be None or in"):
        dataclasses.replace(hy_worldplay.PRESETS["tiny"], ray_fov_deg=180.0)
    with pytest.raises(ValueError, match="ray_fov_deg=60.0 is supported by hy_worldplay worlds only"):
        matrix_game3.build(dataclasses.replace(matrix_game3.PRESETS["tiny"], ray_fov_deg=60.0))


def _camera_attention(rope: CameraRope, camera, q, k, v):
    to_query, to_key, to_out = rope(camera)
    out = torch.nn.functional.scaled_dot_product_attention(
        apply_camera_rope(q, to_query), apply_camera_rope(k, to_key), apply_camera_rope(v, to_key))
    return apply_camera_rope(out, to_out)


def test_camera_rope_attention_sees_relative_poses_only():
    """PRoPE: moving every camera by one rigid motion changes neither scores nor outputs; moving one
    frame's camera does."""
    poses = trajectories.make("random_walk_with_returns", 5, seed=3).poses
    motion = trajectories.make("orbit", 7, seed=4).poses[6]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5 * 6, 8, generator=gen) for _ in range(3))
    rope = CameraRope(2.0)  # float32 arithmetic, hence the tolerance

    def attend(p):  # the cameras as given, not made relative to one of them first
        return _camera_attention(rope, p[..., :3, :4].flatten(-2)[None], q, k, v)

    reference = attend(poses)
    torch.testing.assert_close(attend(motion @ poses), reference, rtol=1e-5, atol=1e-5)
    one_moved = poses.clone()
    one_moved[2] = motion @ poses[2]
    assert not torch.allclose(attend(one_moved), reference, atol=1e-3)


def test_camera_rope_hands_a_value_over_as_seen_from_the_query_camera():
    """A query at camera ``C_i`` attending to its only key, at camera ``C_j``, gets that key's value
    as ``C_i^-1 C_j v`` on every 4-vector (translations in ``unit`` lengths): ``v`` itself when the
    cameras are the same. The matrices stay float32 under autocast."""
    poses = trajectories.make("random_walk_with_returns", 4, seed=5).poses
    rope = CameraRope(2.0)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1, 8, generator=gen) for _ in range(3))  # one token: attention is one-hot

    def handed_over(i, j):
        cam_i, cam_j = (camera_features(poses[0], poses[n])[None, None] for n in (i, j))
        to_query, _, to_out = rope(cam_i)
        _, to_key, _ = rope(cam_j)
        out = torch.nn.functional.scaled_dot_product_attention(
            apply_camera_rope(q, to_query), apply_camera_rope(k, to_key), apply_camera_rope(v, to_key))
        return apply_camera_rope(out, to_out)

    def scaled(pose):  # camera-to-reference with translations in units of 2.0
        pose = torch.linalg.solve(poses[0], pose).clone()
        pose[:3, 3] /= 2.0
        return pose

    torch.testing.assert_close(handed_over(3, 3), v, rtol=1e-5, atol=1e-5)
    relative = torch.linalg.inv(scaled(poses[1])) @ scaled(poses[3])
    expected = (v.reshape(1, 2, 1, 2, 4) @ relative.T).reshape(v.shape)
    torch.testing.assert_close(handed_over(1, 3), expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for matrices in rope(camera_features(poses[0], poses)[None].bfloat16()):
            assert matrices.dtype == torch.float32


def test_camera_rope_worlds_are_validated_and_hy_only():
    for bad in (0.0, float("inf")):
        with pytest.raises(ValueError, match="prope_unit must be None or a finite number > 0"):
            dataclasses.replace(hy_worldplay.PRESETS["tiny"], prope_unit=bad)
    with pytest.raises(ValueError, match="prope_unit=2.0 is supported by hy_worldplay worlds only"):
        matrix_game3.build(dataclasses.replace(matrix_game3.PRESETS["tiny"], prope_unit=2.0))
    assert dataclasses.replace(hy_worldplay.PRESETS["tiny"], prope_unit=2.0).camera_rope_dims == 16


# --- context policy and gathering ----------------------------------------------------------------


def test_dense_policy_takes_the_window_and_the_most_similar_older_frames():
    traj = trajectories.make("out_and_back", 30)
    policy = DensePolicy(window=3, memory=2)
    poses = traj.poses[:24]  # frames 16.. retreat over frames 14..: frame 24 looks like frame 6
    selection = policy.select(12, poses, traj.poses[24:26], torch.zeros(24, 1, 1, 1))
    assert selection.recent == [21, 22, 23]
    assert len(selection.memory) == 2 and all(f < 21 for f in selection.memory)
    assert 6 in selection.memory or 5 in selection.memory
    early = policy.select(1, traj.poses[:2], traj.poses[2:4], torch.zeros(2, 1, 1, 1))
    assert early == ContextSelection(memory=[], recent=[0, 1])


def test_gather_context_right_aligns_frames_and_masks_padding():
    latents = torch.arange(5.0)[:, None, None, None].expand(5, 2, 1, 1)
    poses = trajectories.make("loop", 5).poses
    context = gather_context(latents, poses, ContextSelection(memory=[1], recent=[3, 4]), capacity=5)
    assert isinstance(context, Context) and context.capacity == 5
    assert context.valid.tolist() == [[False, False, True, True, True]]
    assert context.latents[0, :, 0, 0, 0].tolist() == [0, 0, 1, 3, 4]
    assert context.frame_index.tolist() == [[0, 0, 1, 3, 4]]
    torch.testing.assert_close(context.poses[0, 2], poses[1])


def test_gather_context_drops_the_mask_of_a_full_context_only_when_asked():
    latents, poses = torch.zeros(3, 2, 1, 1), trajectories.make("loop", 3).poses
    full, partial = ContextSelection(memory=[0], recent=[1, 2]), ContextSelection(memory=[], recent=[1, 2])
    assert gather_context(latents, poses, full, 3, mask_full=False).valid is None
    assert gather_context(latents, poses, full, 3).valid.tolist() == [[True, True, True]]
    assert gather_context(latents, poses, partial, 3, mask_full=False).valid.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    "selection, match",
    [
        (ContextSelection(memory=[1], recent=[1]), "repeats"),
        (ContextSelection(memory=[], recent=[7]), "outside"),
        (ContextSelection(memory=[0, 1], recent=[2, 3]), "capacity"),
    ],
)
def test_gather_context_rejects_bad_selections(selection, match):
    with pytest.raises(ValueError, match=match):
        gather_context(torch.zeros(5, 1, 1, 1), torch.eye(4).expand(5, 4, 4), selection, capacity=3)


# --- the worlds -----------------------------------------------------------------------------------


def test_full_presets_follow_upstream_sizes():
    hy, mg = hy_worldplay.PRESETS["full"], matrix_game3.PRESETS["full"]
    assert (hy.depth, hy.dim, hy.heads, hy.head_dim, hy.latent_channels, hy.patch) == (54, 2048, 16, 128, 32, 1)
    assert (hy.chunk_frames, hy.context_frames, hy.tokens_per_frame, hy.dtype) == (4, 20, 1560, torch.bfloat16)
    assert (mg.depth, mg.dim, mg.heads, mg.head_dim, mg.latent_channels, mg.patch) == (30, 3072, 24, 128, 48, 2)
    assert (mg.chunk_frames, mg.context_frames, mg.tokens_per_frame, mg.steps) == (10, 9, 880, 3)


def test_layouts_describe_the_attention_sequence(world):
    layout = world.layout()
    spec = world.spec
    assert layout.context_frames == spec.context_frames and layout.chunk_frames == spec.chunk_frames
    assert layout.tokens_per_frame == spec.tokens_per_frame
    assert layout.queries == ("chunk" if isinstance(world, matrix_game3.MatrixGame3) else "all")
    assert world.layout(capacity=2).context_frames == 2


def test_matrix_game_forms_agree_where_the_context_is_all_padding_and_differ_where_it_attends_to_the_chunk():
    """The same DiT in upstream's full-sequence form and in the KV-cache form: with no valid context
    frame the chunk attends to itself alone in both, so they agree; with context frames they differ,
    as the full form's context also attends to the noisy chunk. An unknown form is refused."""
    cached, full = (matrix_game3.build("tiny", seed=0, form=form) for form in ("cached", "full"))
    spec = cached.spec
    traj = _trajectory(cached, chunks=2)
    f = spec.chunk_frames
    x = torch.randn(1, f, *spec.latent_shape, generator=torch.Generator().manual_seed(0))
    for selection, agree in ((ContextSelection([], []), True), (ContextSelection([], [f - 1]), False)):
        context = gather_context(torch.randn(f, *spec.latent_shape), traj.poses[:f], selection, spec.context_frames)
        outs = [w.model(x, torch.tensor(0.6), **w.inputs(context, traj.poses[f:2 * f], traj.actions()[f:2 * f], f))
                for w in (cached, full)]
        if agree:
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        else:
            assert (outs[1] - outs[0]).abs().max() > 1e-4  # (2e-3 here; rounding is below 1e-6)
    with pytest.raises(ValueError, match=r"form must be one of \['full', 'cached'\] or None, got 'kv'"):
        matrix_game3.build("tiny", form="kv")
    assert isinstance(matrix_game3.build("tiny", form=None), matrix_game3.MatrixGame3Full)  # None: the default


def test_build_is_seeded_and_rejects_unknown_presets():
    a, b = hy_worldplay.build("tiny", seed=3), hy_worldplay.build("tiny", seed=3)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="preset must be one of"):
        matrix_game3.build("huge")


def test_an_x0_world_returns_the_velocity_of_its_clean_prediction():
    """With ``output="x0"`` the network's last layer is the clean chunk: one Euler step from any
    noise level lands on it, and the forward returns ``(x - x0) / sigma`` (sigma clamped)."""
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], output="x0")
    world = hy_worldplay.build(spec, seed=0)
    traj = _trajectory(world, chunks=2)
    f = spec.chunk_frames
    context = gather_context(torch.randn(f, *spec.latent_shape), traj.poses[:f], ContextSelection([], [f - 1]),
                             spec.context_frames)
    inputs = world.inputs(context, traj.poses[f:2 * f], traj.actions()[f:2 * f], f)
    x = torch.randn(1, spec.chunk_frames, *spec.latent_shape)
    velocity = world.model(x, torch.tensor(1.0), **inputs)
    with torch.no_grad():  # the same network read as a velocity predictor gives its raw output
        raw = hy_worldplay.HYWorldPlayDiT(dataclasses.replace(spec, output="velocity"))
        raw.load_state_dict(world.model.state_dict())
    clean = raw(x, torch.tensor(1.0), **inputs)
    torch.testing.assert_close(euler_step(x, velocity, 1.0, 0.0), clean, rtol=1e-5, atol=1e-5)
    tiny = world.model(x, torch.tensor(1e-4), **inputs)  # sigma below X0_MIN_SIGMA is clamped
    torch.testing.assert_close(tiny, (x - raw(x, torch.tensor(1e-4), **inputs)) / X0_MIN_SIGMA, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="WorldSpec.output must be one of"):
        dataclasses.replace(spec, output="epsilon")
    with pytest.raises(ValueError, match="supported by hy_worldplay worlds only"):
        matrix_game3.build(dataclasses.replace(matrix_game3.PRESETS["tiny"], output="x0"))


def test_generation_is_deterministic_and_finite(world):
    traj = _trajectory(world, chunks=4)
    first, second = generate(world, traj, chunks=4), generate(world, traj, chunks=4)
    assert first.latents.shape == (4 * world.spec.chunk_frames, *world.spec.latent_shape)
    assert torch.isfinite(first.latents).all()
    torch.testing.assert_close(first.latents, second.latents, rtol=0, atol=0)
    assert first.frames.shape[:2] == (4 * world.spec.chunk_frames, 3) and 0 <= first.frames.min() <= first.frames.max() <= 1
    assert len(first.chunk_times) == 4 and len(first.selections) == 4


def test_padded_context_slots_never_reach_the_chunk(world):
    traj = _trajectory(world, chunks=3)
    history = torch.randn(4, *world.spec.latent_shape)
    selection = ContextSelection(memory=[0], recent=[3])
    context = gather_context(history, traj.poses[:4], selection, world.spec.context_frames)
    x = torch.randn(1, world.spec.chunk_frames, *world.spec.latent_shape)
    chunk_poses, actions = traj.poses[4:6], traj.actions()[4:6]
    out = world.model(x, torch.tensor(0.7), **world.inputs(context, chunk_poses, actions, 4))
    context.latents[0, 0] = 100.0  # a padding slot
    context.poses[0, 0] = traj.poses[1]
    perturbed = world.model(x, torch.tensor(0.7), **world.inputs(context, chunk_poses, actions, 4))
    torch.testing.assert_close(out, perturbed, rtol=0, atol=0)
    context.latents[0, -1] += 1.0  # a real context frame does matter
    assert not torch.allclose(out, world.model(x, torch.tensor(0.7), **world.inputs(context, chunk_poses, actions, 4)))


def test_step_hook_replaces_each_model_call(world):
    traj = _trajectory(world, chunks=2)
    calls = []

    def hook(chunk, step, model_call):
        calls.append((chunk, step))
        out = model_call()
        return torch.zeros_like(out) if chunk == 1 else out

    hooked = generate(world, traj, chunks=2, step_hook=hook)
    plain = generate(world, traj, chunks=2)
    steps = world.spec.steps
    assert calls == [(c, s) for c in range(2) for s in range(steps)]
    torch.testing.assert_close(hooked.latents[hooked.chunk(0)], plain.latents[plain.chunk(0)], rtol=0, atol=0)
    assert not torch.allclose(hooked.latents[hooked.chunk(1)], plain.latents[plain.chunk(1)])


def test_a_policy_may_shrink_the_context_capacity(world):
    class Compact:
        def select(self, chunk, poses, chunk_poses, latents):
            n = poses.shape[0]
            return ContextSelection(memory=[], recent=list(range(max(0, n - 1), n)), capacity=1)

    compact = generate(world, _trajectory(world, chunks=3), Compact(), chunks=3)
    assert all(s.capacity == 1 for s in compact.selections) and torch.isfinite(compact.latents).all()


def test_compiled_tiny_world_matches_eager_along_a_trajectory(world):
    traj = _trajectory(world)
    eager = generate(world, traj)
    compiled = world.compile(
        lambda m: torch.compile(m, backend="light_interaction", options={"inner": "eager"}, fullgraph=True)
    )
    torch.testing.assert_close(generate(compiled, traj).latents, eager.latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ray_fov_deg, prope_unit", [(None, None), (60.0, None), (None, 2.0)])
def test_inductor_compiled_hy_world_matches_eager(ray_fov_deg, prope_unit):
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], ray_fov_deg=ray_fov_deg, prope_unit=prope_unit)
    world = hy_worldplay.build(spec, seed=1)
    traj = trajectories.make("loop", 3 * world.spec.chunk_frames)
    eager = generate(world, traj)
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction"))
    torch.testing.assert_close(generate(compiled, traj).latents, eager.latents, rtol=1e-4, atol=1e-5)


def test_dense_policy_keeps_shapes_static_so_the_model_compiles_once(world):
    counter = CompileCounterWithBackend("eager")
    compiled = world.compile(lambda m: torch.compile(m, backend=counter))
    after_first_chunk = []

    def hook(chunk, step, model_call):
        out = model_call()
        if (chunk, step) == (0, 0):
            after_first_chunk.append(counter.frame_count)
        return out

    generate(compiled, _trajectory(world), step_hook=hook)
    assert counter.frame_count == len(world.compiled_modules())  # the denoiser (and the KV-cache encoder)
    assert after_first_chunk == [counter.frame_count]  # nothing compiled after the first step


def test_warm_up_compiles_every_capacity_before_the_trajectory_runs(world):
    counter = CompileCounterWithBackend("eager")
    compiled = world.compile(lambda m: torch.compile(m, backend=counter, dynamic=False))
    full = world.spec.context_frames
    warm_up(compiled, (2, full))
    warmed = counter.frame_count
    assert warmed == 2 * len(world.compiled_modules())  # one static graph per capacity (slots are fixed-size)

    class Alternating:  # a policy switching between two capacities, like a controller's buckets
        def select(self, chunk, poses, chunk_poses, latents):
            n = poses.shape[0]
            capacity = 2 if chunk % 2 else full
            return ContextSelection(memory=[], recent=list(range(max(0, n - 2), n)), capacity=capacity)

    generate(compiled, _trajectory(world, chunks=4), Alternating(), chunks=4, decode=False)
    assert counter.frame_count == warmed


def test_an_unmasked_full_context_generates_what_the_masked_one_does(world):
    """``mask_full=False`` (the dense baseline's): same frames, the model called without a mask
    once the context is full, and its extra graph compiled by the warm-up, not during the run."""
    traj = _trajectory(world)
    masked = generate(world, traj, decode=False)
    counter = CompileCounterWithBackend("eager")
    compiled = world.compile(lambda m: torch.compile(m, backend=counter, dynamic=False))
    warm_up(compiled, (world.spec.context_frames,), mask_full=False)
    warmed = counter.frame_count
    assert warmed == 2 * len(world.compiled_modules())  # masked and unmasked graphs
    masks = []

    def hook(chunk, step, model_call):
        masks.append(model_call.keywords["context_valid"] is None)
        return model_call()

    with torch.compiler.set_stance("fail_on_recompile"):
        unmasked = generate(compiled, traj, step_hook=hook, decode=False, mask_full=False)
    assert counter.frame_count == warmed
    full = [len(s.frames) == world.spec.context_frames for s in unmasked.selections]
    assert masks == [f for f in full for _ in range(world.spec.steps)] and any(full) and not all(full)
    torch.testing.assert_close(unmasked.latents, masked.latents, rtol=1e-5, atol=1e-5)
