"""Pose similarity: frustum overlap against analytic volumes, the proxy's invariants, revisits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.poses import look_at, make_poses, random_poses, rotation_about_axis
from li_compile.controller.similarity import (
    DEFAULT_FAR,
    DEFAULT_NEAR,
    KEEP_THRESHOLD,
    MEASURES,
    REVISIT_THRESHOLD,
    default_bounds,
    find_revisit,
    frustum_overlap,
    frustum_samples,
    pose_proxy,
    similarity,
)

seeds = st.integers(0, 2**31 - 1)
SAMPLES = 16 * 16 * 16
FRUSTUM_ATOL = 4 / SAMPLES  # a few sample points may cross a frustum face under float32 rounding
PROXY_ATOL = 1e-5
ATOL = {"frustum": FRUSTUM_ATOL, "proxy": PROXY_ATOL}
measures = pytest.mark.parametrize("measure", sorted(MEASURES))


def _poses(seed: int, n: int, scale: float = 0.3 * DEFAULT_FAR) -> torch.Tensor:
    return random_poses(n, scale, torch.Generator().manual_seed(seed))


def _moved(translation, yaw: float = 0.0) -> torch.Tensor:
    """One camera (1, 4, 4) at ``translation`` in the identity camera's frame, turned by ``yaw`` degrees."""
    rot = rotation_about_axis(torch.tensor([0.0, 1.0, 0.0]), torch.tensor(math.radians(yaw)))
    return make_poses(rot, torch.tensor(translation, dtype=torch.float32))[None]


# --- the reference: frustum overlap -----------------------------------------------------------


def test_frustum_samples_fill_the_frustum_with_equal_volumes():
    bounds = default_bounds()
    points = frustum_samples(bounds)
    assert points.shape == (SAMPLES, 3)
    torch.testing.assert_close(frustum_samples(bounds), points)  # fixed, seeded
    z = points[:, 2]
    assert (z >= DEFAULT_NEAR).all() and (z <= DEFAULT_FAR).all()
    u, v = points[:, 0] / z, points[:, 1] / z
    assert (u >= bounds[0]).all() and (u <= bounds[1]).all() and (v >= bounds[2]).all() and (v <= bounds[3]).all()
    # depth CDF of a uniform point in a frustum: (z^3 - near^3) / (far^3 - near^3)
    for depth in (2.0, 5.0, 8.0):
        expected = (depth**3 - DEFAULT_NEAR**3) / (DEFAULT_FAR**3 - DEFAULT_NEAR**3)
        assert abs((z <= depth).float().mean().item() - expected) <= 1 / 16 + 1e-6


@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0, 5.0, 9.0])
@pytest.mark.parametrize("ahead", [True, False])
def test_frustum_overlap_matches_the_analytic_volume_for_a_step_along_the_view(shift, ahead):
    # The past camera `shift` ahead of (or behind) the current one: the current frustum's slice at
    # depth z keeps ((z - s) / z)^2 of its area (ahead) or stops at the past far plane (behind).
    near, far = DEFAULT_NEAR, DEFAULT_FAR
    total = far**3 - near**3
    if ahead:
        expected = max(far - shift, near) ** 3 - near**3 if shift < far - near else 0.0
    else:
        expected = max(far - shift, near) ** 3 - near**3
    score = frustum_overlap(torch.eye(4), _moved([0.0, 0.0, shift if ahead else -shift]))
    assert score.item() == pytest.approx(expected / total, abs=0.01)


@pytest.mark.parametrize("shift", [0.5, 3.0, 8.0])
def test_frustum_overlap_matches_numeric_integration_for_a_sideways_step(shift):
    bounds = default_bounds().double()
    width = (bounds[1] - bounds[0]).item()
    z = torch.linspace(DEFAULT_NEAR, DEFAULT_FAR, 100_001, dtype=torch.float64)
    kept = (1 - shift / (z * width)).clamp(0, 1)  # part of the slice still inside the shifted frustum
    expected = torch.trapezoid(z**2 * kept, z) / torch.trapezoid(z**2, z)
    score = frustum_overlap(torch.eye(4), _moved([shift, 0.0, 0.0]))
    assert score.item() == pytest.approx(expected.item(), abs=0.01)


@settings(max_examples=10, deadline=None)
@given(seeds)
def test_frustum_overlap_is_nearly_symmetric_for_a_shared_lens(seed):
    a, b = _poses(seed, 2).unbind()
    ab, ba = frustum_overlap(a, b[None]), frustum_overlap(b, a[None])
    assert (ab - ba).abs().item() <= 0.03


# --- properties both measures share -----------------------------------------------------------


@measures
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_scores_are_in_unit_interval_and_one_for_the_same_camera(measure, seed):
    bank = _poses(seed, 16)
    scores = similarity(bank[3], bank, measure)
    assert scores.shape == (16,) and scores.dtype == torch.float32
    assert (scores >= 0).all() and (scores <= 1).all()
    assert scores[3].item() == pytest.approx(1.0, abs=ATOL[measure])


@measures
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_scores_are_invariant_to_a_rigid_transform_of_the_world(measure, seed):
    poses = _poses(seed, 9)
    world = random_poses(1, DEFAULT_FAR, torch.Generator().manual_seed(seed + 1))[0]
    before = similarity(poses[0], poses[1:], measure)
    after = similarity(world @ poses[0], world @ poses[1:], measure)
    torch.testing.assert_close(after, before, atol=ATOL[measure], rtol=0)


@settings(max_examples=10, deadline=None)
@given(seeds)
def test_proxy_is_exactly_symmetric(seed):
    a, b = _poses(seed, 2).unbind()
    torch.testing.assert_close(pose_proxy(a, b[None]), pose_proxy(b, a[None]), atol=PROXY_ATOL, rtol=0)


@measures
def test_looking_the_other_way_from_the_same_place_is_dropped(measure):
    for yaw in (180.0, 150.0, 210.0):
        assert similarity(torch.eye(4), _moved([0.0, 0.0, 0.0], yaw), measure).item() < KEEP_THRESHOLD


@measures
def test_a_camera_far_away_looking_elsewhere_scores_about_zero(measure):
    away = _moved([3 * DEFAULT_FAR, 0.0, -DEFAULT_FAR], yaw=90.0)
    assert similarity(torch.eye(4), away, measure).item() <= 1e-3


@measures
def test_scores_fall_as_the_camera_turns_away(measure):
    turns = torch.cat([_moved([0.0, 0.0, 0.0], yaw) for yaw in (0, 10, 30, 60, 90, 120)])
    scores = similarity(torch.eye(4), turns, measure)
    assert (scores[1:] <= scores[:-1]).all()
    assert scores[0].item() == pytest.approx(1.0, abs=ATOL[measure]) and scores[-1].item() < KEEP_THRESHOLD


def test_proxy_agrees_with_frustum_overlap_on_keep_decisions():
    gen = torch.Generator().manual_seed(0)
    current = random_poses(1, DEFAULT_FAR, gen)[0]
    bank = current @ random_poses(256, 0.3 * DEFAULT_FAR, gen)
    reference, proxy = frustum_overlap(current, bank), pose_proxy(current, bank)
    agreement = ((reference >= KEEP_THRESHOLD) == (proxy >= KEEP_THRESHOLD)).float().mean().item()
    assert agreement >= 0.9
    assert (reference - proxy).abs().mean().item() <= 0.1


def test_proxy_tracks_frustum_overlap_for_cameras_orbiting_one_spot():
    # Converging views share content although their directions differ: the proxy must see both.
    radius, angle = 0.5 * DEFAULT_FAR, torch.deg2rad(torch.tensor([0.0, 15.0, 30.0, 45.0, 60.0]))
    eye = torch.stack([radius * torch.sin(angle), torch.zeros(5), radius * (1 - torch.cos(angle))], -1)
    bank = look_at(eye, torch.tensor([0.0, 0.0, radius]).expand(5, 3))
    torch.testing.assert_close(pose_proxy(torch.eye(4), bank), frustum_overlap(torch.eye(4), bank), atol=0.1, rtol=0)


# --- revisits -----------------------------------------------------------------------------------


def _loop(frames: int, radius: float = 3.0) -> torch.Tensor:
    """A camera walking once around a circle in the y = 0 plane, looking where it goes: (frames, 4, 4)."""
    angle = torch.arange(frames) * (2 * math.pi / frames)
    eye = torch.stack([radius * torch.sin(angle), torch.zeros(frames), radius * torch.cos(angle)], -1)
    ahead = torch.stack([torch.cos(angle), torch.zeros(frames), -torch.sin(angle)], -1)
    return look_at(eye, eye + ahead)


@measures
def test_after_a_loop_the_first_visit_scores_high_and_is_found_as_a_revisit(measure):
    bank = _loop(24)
    back_home = _loop(240)[1]  # a little past the start
    scores = similarity(back_home, bank, measure)
    assert scores[0].item() >= REVISIT_THRESHOLD
    assert scores[1].item() >= KEEP_THRESHOLD and scores[-1].item() >= KEEP_THRESHOLD
    assert scores[12].item() < KEEP_THRESHOLD  # the far side of the loop, looking back
    revisit = find_revisit(back_home, bank, measure=measure)
    assert revisit.index.item() == 0 and bool(revisit.hit)
    assert revisit.score.item() == pytest.approx(scores[0].item())


def test_revisit_needs_a_high_score_and_a_nearby_camera():
    behind = _moved([0.0, 0.0, -0.06 * DEFAULT_FAR])  # same view, 6% of the scene scale back
    revisit = find_revisit(torch.eye(4), behind, threshold=0.5)
    assert revisit.index.item() == -1 and not revisit.hit  # too far for the default 5%
    revisit = find_revisit(torch.eye(4), behind, threshold=0.5, max_distance=0.1)
    assert revisit.index.item() == 0 and bool(revisit.hit)
    turned = _moved([0.0, 0.0, 0.0], yaw=40.0)
    revisit = find_revisit(torch.eye(4), turned)
    assert revisit.index.item() == 0 and not revisit.hit and 0 < revisit.score.item() < REVISIT_THRESHOLD


def test_revisit_prefers_the_best_score_then_the_earliest_camera():
    bank = torch.cat([_moved([0.0, 0.0, 0.0], 30.0), torch.eye(4)[None], torch.eye(4)[None]])
    assert find_revisit(torch.eye(4), bank).index.item() == 1


def test_an_empty_bank_gives_no_scores_and_no_revisit():
    empty = torch.empty(0, 4, 4)
    for measure in MEASURES:
        assert similarity(torch.eye(4), empty, measure).shape == (0,)
    revisit = find_revisit(torch.eye(4), empty)
    assert revisit.index.item() == -1 and revisit.score.item() == 0 and not revisit.hit


# --- errors and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"current": torch.eye(4)[:3]}, ["current pose must be (4, 4)", "paired with the bank", "(3, 4)"]),
        ({"bank": torch.eye(4)}, ["bank must be (N, 4, 4)", "(4, 4)"]),
        ({"near": 2.0, "far": 1.0}, ["0 < near < far", "near=2.0"]),
        ({"bounds": torch.ones(2, 4)}, ["bounds must be (4,)", "(2, 4)"]),
        ({"measure": "cosine"}, ["one of ['frustum', 'proxy']", "'cosine'"]),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, words):
    args = {"current": torch.eye(4), "bank": torch.eye(4)[None], **kwargs}
    with pytest.raises(ValueError) as err:
        similarity(**args)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ValueError, match="threshold must be in"):
        find_revisit(torch.eye(4), torch.eye(4)[None], threshold=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@measures
def test_cuda_scores_match_cpu(measure):
    bank = _poses(0, 32)
    cpu = similarity(bank[0], bank, measure)
    cuda = similarity(bank[0].cuda(), bank.cuda(), measure)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=ATOL[measure], rtol=0)


@measures
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_paired_cameras_score_as_each_pair_alone(measure, seed):
    current, bank = _poses(seed, 5), _poses(seed + 1, 5)
    paired = similarity(current, bank, measure)
    alone = torch.cat([similarity(c, b[None], measure) for c, b in zip(current, bank)])
    torch.testing.assert_close(paired, alone, rtol=0, atol=1e-6)
