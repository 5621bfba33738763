"""Camera poses and lenses: validation, conversion and batched geometry helpers.

Conventions (OpenCV), used by every function in ``li_compile.controller``:

- A **pose** is a 4x4 camera-to-world matrix ``[[R, t], [0, 0, 0, 1]]``: ``R``'s columns are the
  camera's x (right), y (down) and z (forward, the view direction) axes in world coordinates, ``t``
  is the camera centre. Poses are batched as ``(..., 4, 4)``.
- A **lens** is described by its image-plane **bounds** ``(..., 4) = (x_min, x_max, y_min, y_max)``:
  the image rectangle on the plane ``z = 1`` in camera coordinates (x right, y down). Build them
  from a field of view with ``bounds_from_fov`` or from pixel intrinsics with
  ``bounds_from_intrinsics``; off-centre principal points give asymmetric bounds.

Everything is computed in float32. Validation raises ``ValueError`` naming the bad camera and the
expected value; the geometry helpers do not validate (call ``validate_poses`` once when a pose
enters the controller, not on every use).
"""

from __future__ import annotations

from typing import Sequence

import torch

ORTHONORMAL_ATOL = 1e-4  # max |R^T R - I|, |det R - 1| and |bottom row - [0, 0, 0, 1]| accepted
HALF_ROUNDING = 8  # poses in fp16/bf16: that many of the type's epsilons (its rounding of each entry)
INTRINSICS_ATOL = 1e-6  # max |entry| accepted where a pinhole matrix has zeros (skew, row 3)


def _first_bad(bad: torch.Tensor, name: str) -> str:
    """``name[i, j]`` for the first True entry of ``bad`` (batch shape), plus how many others."""
    if bad.ndim == 0:
        return name
    where = torch.nonzero(bad)
    first = ", ".join(str(i) for i in where[0].tolist())
    more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
    return f"{name}[{first}]{more}"


def _as_float_tensor(value: torch.Tensor, name: str, trailing: tuple[int, ...]) -> torch.Tensor:
    """Check type, trailing shape and finiteness; return float32."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim < len(trailing) or tuple(value.shape[value.ndim - len(trailing):]) != trailing:
        expected = "(..., " + ", ".join(map(str, trailing)) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
    value = value.float()
    bad = ~torch.isfinite(value).flatten(value.ndim - len(trailing)).all(-1)
    if bad.any():
        raise ValueError(f"{_first_bad(bad, name)} contains NaN or inf")
    return value


def validate_poses(poses: torch.Tensor, name: str = "poses", atol: float = ORTHONORMAL_ATOL) -> torch.Tensor:
    """Check camera-to-world poses and return them as float32.

    ``poses: (..., 4, 4)``. Raises ``ValueError`` naming the first bad camera for: a wrong shape, NaN
    or inf, a bottom row other than ``[0, 0, 0, 1]``, a rotation block that is not orthonormal
    (``max |R^T R - I| > atol``) or that is a reflection (``det R = -1``; OpenCV cameras are
    right-handed: x right, y down, z forward). Poses given in a half type are checked within
    ``HALF_ROUNDING`` of its machine epsilon instead, where that is looser than ``atol``, and returned
    as the nearest rigid poses (the rotation's polar factor, the bottom row exact).
    """
    half = isinstance(poses, torch.Tensor) and poses.dtype in (torch.float16, torch.bfloat16)
    if half:
        atol = max(atol, HALF_ROUNDING * torch.finfo(poses.dtype).eps)
    poses = _as_float_tensor(poses, name, (4, 4))
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=poses.device)
    bottom_err = (poses[..., 3, :] - bottom).abs().amax(-1)
    bad = bottom_err > atol
    if bad.any():
        first = poses[..., 3, :][bad][0].tolist()
        raise ValueError(f"{_first_bad(bad, name)} bottom row must be [0, 0, 0, 1], got {first}")
    rot = poses[..., :3, :3]
    eye = torch.eye(3, device=poses.device)
    ortho_err = (rot.transpose(-1, -2) @ rot - eye).abs().amax((-2, -1))
    bad = ortho_err > atol
    if bad.any():
        err = ortho_err[bad][0].item()
        raise ValueError(
            f"{_first_bad(bad, name)} rotation is not orthonormal: max |R^T R - I| = {err:.2e}, "
            f"expected <= {atol:.0e} (scaled or sheared camera axes?)"
        )
    det = torch.linalg.det(rot)
    bad = (det - 1.0).abs() > atol
    if bad.any():
        raise ValueError(
            f"{_first_bad(bad, name)} rotation has determinant {det[bad][0].item():.4f}, expected 1 "
            "(a reflection: OpenCV cameras are right-handed, x right, y down, z forward)"
        )
    if half:  # the nearest rigid pose to the rounded one: later checks hold it to float32's tolerance
        u, _, vh = torch.linalg.svd(rot)
        poses = poses.clone()
        poses[..., :3, :3] = u @ vh
        poses[..., 3, :] = bottom
    return poses


def validate_intrinsics(intrinsics: torch.Tensor, name: str = "intrinsics") -> torch.Tensor:
    """Check pinhole intrinsics ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` and return float32.

    ``intrinsics: (..., 3, 3)`` in pixels. Raises ``ValueError`` for a wrong shape, NaN or inf,
    ``fx <= 0`` or ``fy <= 0``, a non-zero skew or lower-left entry, or a last row other than
    ``[0, 0, 1]`` (the frustum bounds assume an upright rectangular image).
    """
    k = _as_float_tensor(intrinsics, name, (3, 3))
    focal = torch.stack([k[..., 0, 0], k[..., 1, 1]], -1)
    bad = (focal <= 0).any(-1)
    if bad.any():
        raise ValueError(f"{_first_bad(bad, name)} focal lengths must be > 0, got (fx, fy) = {focal[bad][0].tolist()}")
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], device=k.device)
    zeros_and_one = torch.where(expected == 1.0, torch.zeros_like(k), k)  # entries that must be 0 ...
    zeros_and_one[..., 2, 2] = k[..., 2, 2] - 1.0  # ... and K[2, 2] that must be 1
    bad = zeros_and_one.abs().amax((-2, -1)) > INTRINSICS_ATOL
    if bad.any():
        raise ValueError(
            f"{_first_bad(bad, name)} must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (no skew), "
            f"got {k[bad][0].tolist()}"
        )
    return k


def bounds_from_intrinsics(intrinsics: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Image-plane bounds of a pinhole camera: ``(..., 3, 3)`` pixels -> ``(..., 4)``.

    ``image_size = (height, width)`` in the same pixels as ``K``. Returns
    ``(x_min, x_max, y_min, y_max) = (-cx / fx, (W - cx) / fx, -cy / fy, (H - cy) / fy)``.
    """
    k = validate_intrinsics(intrinsics)
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (height, width) of positive ints, got {tuple(image_size)!r}")
    height, width = image_size
    fx, fy, cx, cy = k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]
    return torch.stack([-cx / fx, (width - cx) / fx, -cy / fy, (height - cy) / fy], -1)


def bounds_from_fov(fov_y_deg: float | torch.Tensor, aspect: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Image-plane bounds of a centred camera from its vertical field of view: ``(...)`` -> ``(..., 4)``.

    ``fov_y_deg`` in degrees, in (0, 180); ``aspect = width / height`` > 0. Returns
    ``(-a tan(fov/2), a tan(fov/2), -tan(fov/2), tan(fov/2))`` with ``a = aspect``.
    """
    fov = torch.as_tensor(fov_y_deg, dtype=torch.float32)
    aspect = torch.as_tensor(aspect, dtype=torch.float32, device=fov.device)
    bad = ~(torch.isfinite(fov) & (fov > 0) & (fov < 180))
    if bad.any():
        raise ValueError(f"{_first_bad(bad, 'fov_y_deg')} must be in (0, 180) degrees, got {fov[bad][0].item()}")
    bad = ~(torch.isfinite(aspect) & (aspect > 0))
    if bad.any():
        raise ValueError(f"{_first_bad(bad, 'aspect')} (width / height) must be > 0, got {aspect[bad][0].item()}")
    half_y = torch.tan(torch.deg2rad(fov) / 2)
    half_x = half_y * aspect
    return torch.stack(torch.broadcast_tensors(-half_x, half_x, -half_y, half_y), -1)


def validate_bounds(bounds: torch.Tensor, name: str = "bounds") -> torch.Tensor:
    """Check image-plane bounds ``(..., 4) = (x_min, x_max, y_min, y_max)``; return float32.

    Raises ``ValueError`` for a wrong shape, NaN or inf, or an empty rectangle (min >= max).
    """
    bounds = _as_float_tensor(bounds, name, (4,))
    bad = (bounds[..., 0] >= bounds[..., 1]) | (bounds[..., 2] >= bounds[..., 3])
    if bad.any():
        raise ValueError(
            f"{_first_bad(bad, name)} must satisfy x_min < x_max and y_min < y_max, got {bounds[bad][0].tolist()}"
        )
    return bounds


def camera_centers(poses: torch.Tensor) -> torch.Tensor:
    """World-space camera centres: ``(..., 4, 4)`` -> ``(..., 3)``."""
    return poses[..., :3, 3]


def view_directions(poses: torch.Tensor) -> torch.Tensor:
    """World-space unit view directions (the camera's +z axis): ``(..., 4, 4)`` -> ``(..., 3)``."""
    return poses[..., :3, 2]


def invert_poses(poses: torch.Tensor) -> torch.Tensor:
    """Rigid inverse (world-to-camera) of camera-to-world poses: ``(..., 4, 4)`` -> ``(..., 4, 4)``.

    Uses ``[R^T, -R^T t]`` rather than a general matrix inverse: exact for rigid poses and cheaper.
    ``R^T t`` is a sum of products, not a matmul, so under autocast (inside a model) it stays in
    the poses' dtype.
    """
    rot_t = poses[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t * poses[..., None, :3, 3]).sum(-1, keepdim=True)
    top = torch.cat([rot_t, trans], -1)
    return torch.cat([top, poses[..., 3:4, :]], -2)


def relative_pose(reference: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """``poses`` expressed in the camera frame of ``reference``: ``inverse(reference) @ poses``.

    Shapes broadcast: ``reference: (..., 4, 4)``, ``poses: (..., 4, 4)``. The result maps points
    in the cameras of ``poses`` to the camera coordinates of ``reference``.
    """
    return invert_poses(reference) @ poses


def look_at(
    eye: torch.Tensor, target: torch.Tensor, up: Sequence[float] | torch.Tensor = (0.0, -1.0, 0.0)
) -> torch.Tensor:
    """Camera-to-world poses of cameras at ``eye`` looking at ``target``: ``(..., 3)`` -> ``(..., 4, 4)``.

    ``up`` is the world direction that appears upward in the image (the camera's -y axis); the
    default ``(0, -1, 0)`` suits a world that itself uses OpenCV axes (y down). Raises
    ``ValueError`` where ``eye == target`` or the view direction is parallel to ``up``.
    """
    eye, target = torch.broadcast_tensors(eye.float(), target.float())
    up = torch.as_tensor(up, dtype=torch.float32, device=eye.device).expand_as(eye)
    forward = target - eye
    right = torch.linalg.cross(forward, up)
    bad = (forward.norm(dim=-1) < 1e-12) | (right.norm(dim=-1) <= 1e-6 * forward.norm(dim=-1) * up.norm(dim=-1))
    if bad.any():
        raise ValueError(
            f"{_first_bad(bad, 'look_at')}: eye must differ from target and the view must not be "
            f"parallel to up={up.reshape(-1, 3)[0].tolist()}"
        )
    z = forward / forward.norm(dim=-1, keepdim=True)
    x = right / right.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    top = torch.stack([x, y, z, eye], -1)  # (..., 3, 4): columns are the axes and the centre
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=eye.device).expand(*eye.shape[:-1], 1, 4)
    return torch.cat([top, bottom], -2)


def rotation_about_axis(axis: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from axis-angle (Rodrigues): ``(..., 3)``, ``(...)`` -> ``(..., 3, 3)``."""
    axis = axis.float() / axis.float().norm(dim=-1, keepdim=True)
    angle = torch.as_tensor(angle_rad, dtype=torch.float32, device=axis.device)[..., None, None]
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis.shape[:-1], 3, 3)
    eye = torch.eye(3, device=axis.device)
    return eye + torch.sin(angle) * skew + (1 - torch.cos(angle)) * (skew @ skew)


def make_poses(rotations: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Camera-to-world poses from rotations and centres: ``(..., 3, 3)``, ``(..., 3)`` -> ``(..., 4, 4)``."""
    rotations, centers = rotations.float(), centers.float()
    batch = torch.broadcast_shapes(rotations.shape[:-2], centers.shape[:-1])
    top = torch.cat([rotations.expand(*batch, 3, 3), centers.expand(*batch, 3)[..., None]], -1)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=top.device).expand(*batch, 1, 4)
    return torch.cat([top, bottom], -2)


def random_poses(n: int, translation_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random camera-to-world poses ``(n, 4, 4)`` (CPU) for tests and benchmarks.

    Rotation about a uniformly random axis by an angle uniform in [0, pi); centre normal with
    standard deviation ``translation_scale``. Seed through ``generator`` for repeatable draws.
    """
    axis = torch.randn(n, 3, generator=generator)
    angle = torch.rand(n, generator=generator) * torch.pi
    centers = torch.randn(n, 3, generator=generator) * translation_scale
    return make_poses(rotation_about_axis(axis, angle), centers)
