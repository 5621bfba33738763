"""Camera poses and lenses: validation errors that name the problem, conversions, rigid helpers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.poses import (
    bounds_from_fov,
    bounds_from_intrinsics,
    camera_centers,
    invert_poses,
    look_at,
    make_poses,
    random_poses,
    relative_pose,
    rotation_about_axis,
    validate_bounds,
    validate_intrinsics,
    validate_poses,
    view_directions,
)

FP32 = 1e-5
seeds = st.integers(0, 2**31 - 1)


def _poses(seed: int, n: int = 4, scale: float = 3.0) -> torch.Tensor:
    return random_poses(n, scale, torch.Generator().manual_seed(seed))


def _bad_pose(fix):
    poses = torch.eye(4).repeat(3, 1, 1)
    fix(poses[1])
    return poses


# --- validate_poses ---------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seeds)
def test_valid_poses_pass_and_come_back_float32(seed):
    poses = _poses(seed).double()
    out = validate_poses(poses)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, poses.float())


def test_empty_and_unbatched_poses_are_valid():
    assert validate_poses(torch.eye(4)).shape == (4, 4)
    assert validate_poses(torch.empty(0, 4, 4)).shape == (0, 4, 4)


@pytest.mark.parametrize(
    "poses, words",
    [
        (torch.eye(4)[:3], ["(..., 4, 4)", "(3, 4)"]),
        (torch.eye(3).expand(2, 3, 3), ["(..., 4, 4)", "(2, 3, 3)"]),
        (_bad_pose(lambda p: p.__setitem__((0, 3), float("nan"))), ["poses[1]", "NaN or inf"]),
        (_bad_pose(lambda p: p.__setitem__((2, 3), float("inf"))), ["poses[1]", "NaN or inf"]),
        (_bad_pose(lambda p: p.__setitem__((3, 0), 0.5)), ["poses[1]", "bottom row", "[0, 0, 0, 1]"]),
        (_bad_pose(lambda p: p[:3, :3].mul_(1.1)), ["poses[1]", "not orthonormal", "1e-04"]),
        (_bad_pose(lambda p: p.__setitem__((0, 1), 0.2)), ["poses[1]", "not orthonormal"]),
        (_bad_pose(lambda p: p.__setitem__((0, 0), -1.0)), ["poses[1]", "determinant -1", "expected 1"]),
        (torch.eye(4, dtype=torch.complex64), ["real", "complex64"]),
    ],
)
def test_bad_poses_raise_naming_the_camera_and_the_expectation(poses, words):
    with pytest.raises(ValueError) as err:
        validate_poses(poses)
    for word in words:
        assert word in str(err.value)


def test_pose_errors_use_the_given_name_and_count_other_bad_cameras():
    poses = torch.eye(4).repeat(2, 3, 1, 1)
    poses[0, 2, 0, 0] = poses[1, 1, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"bank\[0, 2\] \(and 1 more\)"):
        validate_poses(poses, name="bank")
    with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
        validate_poses(torch.eye(4).tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_poses_in_a_half_type_are_checked_within_its_rounding(dtype):
    """A valid camera rounded to fp16 or bf16 is accepted, returned as the nearest rigid float32 pose
    (which float32's own tolerance then accepts: later checks see no rounding); scaled axes are not."""
    poses = _poses(3)
    rigid = validate_poses(poses.to(dtype))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(rigid, poses.to(dtype).float(), rtol=0, atol=8 * eps)
    torch.testing.assert_close(validate_poses(rigid), rigid)
    scaled = poses.clone()
    scaled[0, :3, :3] *= 1.2
    with pytest.raises(ValueError, match="not orthonormal"):
        validate_poses(scaled.to(dtype))


def test_orthonormality_tolerance_is_adjustable():
    poses = _bad_pose(lambda p: p[:3, :3].mul_(1 + 1e-3))
    validate_poses(poses, atol=1e-2)
    with pytest.raises(ValueError):
        validate_poses(poses)


# --- intrinsics, field of view and bounds -----------------------------------------------------

K = torch.tensor([[500.0, 0.0, 320.0], [0.0, 400.0, 200.0], [0.0, 0.0, 1.0]])


def test_intrinsics_give_image_plane_bounds_from_the_principal_point():
    bounds = bounds_from_intrinsics(K.expand(2, 3, 3), image_size=(480, 640))
    expected = torch.tensor([-320 / 500, 320 / 500, -200 / 400, 280 / 400])
    torch.testing.assert_close(bounds, expected.expand(2, 4))


def test_centred_intrinsics_match_the_field_of_view():
    fov_y, height, width = 50.0, 360, 640
    focal = height / 2 / math.tan(math.radians(fov_y) / 2)
    k = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(bounds_from_intrinsics(k, (height, width)), bounds_from_fov(fov_y, width / height))


def test_fov_bounds_are_batched_and_symmetric():
    bounds = bounds_from_fov(torch.tensor([60.0, 90.0]), aspect=2.0)
    torch.testing.assert_close(bounds[1], torch.tensor([-2.0, 2.0, -1.0, 1.0]))
    torch.testing.assert_close(bounds[:, 0], -bounds[:, 1])


def _with(k, row, col, value):
    k = k.clone()
    k[row, col] = value
    return k


@pytest.mark.parametrize(
    "intrinsics, words",
    [
        (K[:2], ["(..., 3, 3)", "(2, 3)"]),
        (_with(K, 0, 0, 0.0), ["focal lengths must be > 0", "0.0"]),
        (_with(K, 1, 1, -4.0), ["focal lengths must be > 0", "-4.0"]),
        (_with(K, 0, 1, 3.0), ["no skew"]),
        (_with(K, 2, 2, 2.0), ["[0, 0, 1]"]),
        (_with(K, 0, 2, float("nan")), ["NaN or inf"]),
    ],
)
def test_bad_intrinsics_raise_naming_the_problem(intrinsics, words):
    with pytest.raises(ValueError) as err:
        validate_intrinsics(intrinsics)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "fov, aspect, words",
    [(0.0, 1.0, ["fov_y_deg", "(0, 180)"]), (180.0, 1.0, ["(0, 180)"]), (float("nan"), 1.0, ["fov_y_deg"]),
     (60.0, 0.0, ["aspect", "> 0"]), (torch.tensor([60.0, 200.0]), 1.0, ["fov_y_deg[1]"])],
)
def test_bad_field_of_view_raises_naming_the_value(fov, aspect, words):
    with pytest.raises(ValueError) as err:
        bounds_from_fov(fov, aspect)
    for word in words:
        assert word in str(err.value)


def test_bad_image_size_and_bounds_raise():
    with pytest.raises(ValueError, match="image_size must be"):
        bounds_from_intrinsics(K, (480,))
    with pytest.raises(ValueError, match=r"x_min < x_max"):
        validate_bounds(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        validate_bounds(torch.zeros(3))


# --- geometry helpers -------------------------------------------------------------------------


def test_look_at_uses_opencv_axes():
    pose = look_at(torch.zeros(3), torch.tensor([0.0, 0.0, 5.0]))  # world with OpenCV axes, up = -y
    torch.testing.assert_close(pose, torch.eye(4))


@settings(max_examples=20, deadline=None)
@given(seeds)
def test_look_at_points_the_view_direction_at_the_target(seed):
    gen = torch.Generator().manual_seed(seed)
    eye, target = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    poses = validate_poses(look_at(eye, target, up=(0.0, 1.0, 0.0)))
    torch.testing.assert_close(camera_centers(poses), eye)
    expected = (target - eye) / (target - eye).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(view_directions(poses), expected, atol=FP32, rtol=FP32)
    assert (poses[:, 1, 1] <= FP32).all()  # the image's down axis points against world up


def test_look_at_rejects_degenerate_views():
    with pytest.raises(ValueError, match="parallel to up"):
        look_at(torch.zeros(3), torch.tensor([0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="eye must differ from target"):
        look_at(torch.ones(2, 3), torch.ones(2, 3))


@settings(max_examples=20, deadline=None)
@given(seeds)
def test_rigid_inverse_matches_the_matrix_inverse(seed):
    poses = _poses(seed)
    torch.testing.assert_close(invert_poses(poses), torch.linalg.inv(poses), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(poses @ invert_poses(poses), torch.eye(4).expand(4, 4, 4), atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(seeds)
def test_relative_pose_recovers_the_second_camera(seed):
    a, b = _poses(seed).unbind()[:2]
    rel = relative_pose(a, b)
    torch.testing.assert_close(a @ rel, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(relative_pose(a, a), torch.eye(4), atol=1e-5, rtol=0)


def test_rotation_about_axis_turns_by_the_angle():
    rot = rotation_about_axis(torch.tensor([0.0, 1.0, 0.0]), torch.tensor(math.pi / 2))
    torch.testing.assert_close(rot @ torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), atol=FP32, rtol=0)
    pose = make_poses(rot, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(view_directions(pose), torch.tensor([1.0, 0.0, 0.0]), atol=FP32, rtol=0)
    torch.testing.assert_close(camera_centers(pose), torch.tensor([1.0, 2.0, 3.0]))
