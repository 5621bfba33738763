"""How much of what the current camera sees did a past camera see? Batched pose similarity.

Two measures score the current camera against a bank of past cameras, ``(4, 4)`` and ``(N, 4, 4)``
camera-to-world poses (OpenCV axes, see ``poses.py``) -> ``(N,)`` scores in [0, 1]:

- ``frustum_overlap``: the reference. The fraction of the volume of the current view frustum,
  truncated at depths ``[near, far]``, that also lies inside the past camera's frustum. Estimated
  from a fixed set of sample points (a jittered, seeded stratified grid of rays x depths, spaced
  so that each point stands for an equal volume). With one lens for all cameras, as here, both
  frustums have the same volume, so the measure is symmetric up to sampling error.
- ``pose_proxy``: a closed form in a few 3x3 operations per past camera: each frustum becomes the
  Gaussian with its mean and covariance, and the Bhattacharyya distance between the two Gaussians
  is mapped to [0, 1] by a curve fitted to ``frustum_overlap``. Exactly symmetric; it sees view
  direction, position and field of view at once (cameras converging on one spot included), but
  not roll of a square image, and it smooths the hard frustum edges.

``far`` is the scene scale: how deep a camera's view counts, in world units. ``similarity``
dispatches on the measure's name (``options.context.similarity``); ``find_revisit`` picks the past
camera a denoising cache may reuse.

The functions check shapes only; validate poses once, when they enter the bank, with
``poses.validate_poses``. ``pose_proxy`` never waits on the device; ``frustum_overlap`` copies its
fixed sample set (drawn on the CPU, so every device scores alike) to the device on each call.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from li_compile.controller.poses import bounds_from_fov, camera_centers, relative_pose
from li_compile.options import CacheOptions, ContextOptions

DEFAULT_NEAR = 0.1  # world units
DEFAULT_FAR = 10.0  # world units: the scene scale
DEFAULT_FOV_Y_DEG = 60.0
DEFAULT_ASPECT = 16 / 9
SAMPLE_RAYS = 16  # per image axis: SAMPLE_RAYS ** 2 rays
SAMPLE_DEPTHS = 16  # per ray
SAMPLE_SEED = 0
# Keep a memory frame whose score is at least this; at 0.1 the proxy agrees with frustum overlap on 98.5% of
# keep decisions at this threshold (benchmarks/similarity_agreement.py). Defaults live in options.py.
KEEP_THRESHOLD = ContextOptions().keep_threshold
PROXY_RANGE = 1.5  # sqrt(Bhattacharyya distance) at which pose_proxy reaches 0 (fitted, see pose_proxy)
REVISIT_THRESHOLD = CacheOptions().revisit_threshold  # score needed to call a chunk a revisit
REVISIT_MAX_DISTANCE = 0.05  # ... and camera centres at most this fraction of `far` apart


def default_bounds(device: torch.device | str | None = None) -> torch.Tensor:
    """Image-plane bounds ``(4,)`` of the default lens: 60 degrees vertical FOV, 16:9."""
    return bounds_from_fov(DEFAULT_FOV_Y_DEG, DEFAULT_ASPECT).to(device)


def _check(
    current: torch.Tensor, bank: torch.Tensor, bounds: torch.Tensor | None, near: float, far: float
) -> torch.Tensor:
    """Shape, device and depth-range checks shared by the measures; returns the lens bounds ``(4,)``."""
    if bank.ndim != 3 or bank.shape[1:] != (4, 4):
        raise ValueError(f"bank must be (N, 4, 4), got {tuple(bank.shape)}")
    if current.shape not in ((4, 4), bank.shape):
        raise ValueError(f"current pose must be (4, 4), or {tuple(bank.shape)} paired with the bank, "
                         f"got {tuple(current.shape)}")
    if bank.device != current.device:
        raise ValueError(f"bank is on {bank.device}, expected the current pose's device {current.device}")
    if not 0 < near < far < math.inf:
        raise ValueError(f"need 0 < near < far < inf, got near={near}, far={far}")
    if bounds is None:
        return default_bounds(current.device)
    if bounds.shape != (4,):
        raise ValueError(f"bounds must be (4,) = (x_min, x_max, y_min, y_max), got {tuple(bounds.shape)}")
    return bounds.to(current.device, torch.float32)


def frustum_samples(
    bounds: torch.Tensor,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
    rays: int = SAMPLE_RAYS,
    depths: int = SAMPLE_DEPTHS,
    seed: int = SAMPLE_SEED,
) -> torch.Tensor:
    """Camera-space points filling a truncated frustum with equal volume each: ``(rays**2 * depths, 3)``.

    Stratified: one point per cell of a ``rays x rays`` grid over the image rectangle ``bounds``
    and ``depths`` depth slices of equal volume (depth CDF ``∝ z^3``), jittered inside its cell by
    a generator seeded with ``seed``, so the set is the same on every call and device.
    """
    unit = _unit_samples(rays, depths, seed).to(bounds.device)
    x_min, x_max, y_min, y_max = bounds.float().unbind()
    near3, far3 = near**3, far**3
    z = (near3 + unit[..., 2] * (far3 - near3)) ** (1 / 3)
    x = (x_min + unit[..., 0] * (x_max - x_min)) * z
    y = (y_min + unit[..., 1] * (y_max - y_min)) * z
    return torch.stack([x, y, z], -1).reshape(-1, 3)


@functools.lru_cache(maxsize=8)
def _unit_samples(rays: int, depths: int, seed: int) -> torch.Tensor:
    """The stratified, jittered points of ``frustum_samples`` in the unit cube, ``(rays, rays, depths,
    3)``, drawn on the CPU by a generator seeded with ``seed``. A constant of its arguments, drawn
    once (never written to: callers build new tensors from it)."""
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(rays, rays, depths, 3, generator=gen)
    cell = torch.stack(
        torch.meshgrid(torch.arange(rays), torch.arange(rays), torch.arange(depths), indexing="ij"), -1
    ).float()
    return (cell + jitter) / torch.tensor([rays, rays, depths])  # uniform in [0, 1)^3


def frustum_overlap(
    current: torch.Tensor,
    bank: torch.Tensor,
    bounds: torch.Tensor | None = None,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
    rays: int = SAMPLE_RAYS,
    depths: int = SAMPLE_DEPTHS,
) -> torch.Tensor:
    """Fraction of the current frustum's volume inside each past frustum: ``(4, 4)``, ``(N, 4, 4)`` -> ``(N,)``
    (``current`` may also be ``(N, 4, 4)``, one camera per past camera: pairs scored in one batch).

    ``bounds: (4,)`` is the lens shared by all cameras (default: ``default_bounds()``); frustums
    are truncated at depths ``[near, far]``. Cost: ``N * rays**2 * depths`` point tests. Equal
    poses give 1; with the default 4096 stratified samples the estimate stays within 0.005 of the
    exact volume ratio for steps along the view axis (tests check 0.01 against closed forms).
    """
    bounds = _check(current, bank, bounds, near, far)
    points = frustum_samples(bounds, near, far, rays, depths)  # (S, 3) in the current camera
    to_past = relative_pose(bank.float(), current.float())  # (N, 4, 4): current camera -> past camera
    p = points @ to_past[:, :3, :3].transpose(-1, -2) + to_past[:, None, :3, 3]  # (N, S, 3)
    return in_frustum(p, bounds, near, far).float().mean(-1)


def in_frustum(points: torch.Tensor, bounds: torch.Tensor, near: float, far: float, margin: float = 0.0) -> torch.Tensor:
    """Which camera-space points lie inside the truncated frustum: ``(..., 3)`` -> ``(...)`` bool.

    ``bounds: (4,)`` is the lens, ``[near, far]`` the depth range. ``margin >= 0`` widens the
    frustum: each image side moves out by ``margin`` times the image's width (height), the far
    plane back by ``margin * far`` and the near plane in by ``margin * near`` (a tolerance for
    tile-level tests, where a point stands for a cell of rays and depths)."""
    z = points[..., 2]
    u = points[..., 0] / z.clamp_min(near)
    v = points[..., 1] / z.clamp_min(near)
    x_min, x_max, y_min, y_max = bounds.unbind()
    dx, dy = margin * (x_max - x_min), margin * (y_max - y_min)
    return (
        (z >= near * (1 - min(margin, 1.0))) & (z <= far * (1 + margin))
        & (u >= x_min - dx) & (u <= x_max + dx) & (v >= y_min - dy) & (v <= y_max + dy)
    )


def frustum_moments(bounds: torch.Tensor, near: float, far: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(3,)`` and covariance ``(3, 3)`` of a point uniform in the truncated frustum, camera frame.

    Closed form: depth has density ``∝ z^2`` on ``[near, far]``; given ``z``, ``(x/z, y/z)`` is
    uniform on the image rectangle ``bounds``. Float64.
    """
    x_min, x_max, y_min, y_max = bounds.double().unbind()

    def depth_moment(k: int) -> float:  # E[z^k]
        return 3 * (far ** (k + 3) - near ** (k + 3)) / ((k + 3) * (far**3 - near**3))

    cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
    sxx = (x_min**2 + x_min * x_max + x_max**2) / 3  # E[(x/z)^2]
    syy = (y_min**2 + y_min * y_max + y_max**2) / 3
    one = torch.ones_like(cx)
    mean = depth_moment(1) * torch.stack([cx, cy, one])
    second = depth_moment(2) * torch.stack(
        [torch.stack([sxx, cx * cy, cx]), torch.stack([cx * cy, syy, cy]), torch.stack([cx, cy, one])]
    )
    return mean, second - torch.outer(mean, mean)


def _det(m: torch.Tensor) -> torch.Tensor:
    """Determinants of ``(..., 3, 3)`` matrices: the triple product of their columns."""
    return (m[..., 0] * torch.linalg.cross(m[..., 1], m[..., 2])).sum(-1)


def _adjugate_apply(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``adj(m) @ v`` and ``det(m)`` for ``(..., 3, 3)`` matrices and ``(..., 3)`` vectors."""
    c0, c1, c2 = m[..., 0], m[..., 1], m[..., 2]
    rows = torch.stack([torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)], -2)
    return (rows @ v[..., None])[..., 0], (c0 * rows[..., 0, :]).sum(-1)


def pose_proxy(
    current: torch.Tensor,
    bank: torch.Tensor,
    bounds: torch.Tensor | None = None,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> torch.Tensor:
    """Cheap closed-form stand-in for ``frustum_overlap``: ``(4, 4)``, ``(N, 4, 4)`` -> ``(N,)`` in [0, 1]
    (``current`` may also be ``(N, 4, 4)``, paired with the bank).

    Each frustum is replaced by the Gaussian with its mean and covariance (``frustum_moments``),
    placed by its pose; the score is ``(1 - sqrt(D) / PROXY_RANGE)^2`` clipped at 0, with ``D``
    the Bhattacharyya distance of the two Gaussians. ``D`` grows with the offset between where the
    cameras look relative to the frustum's spread, and with how differently the frustums are
    oriented, so it sees view direction, position and field of view at once, including two
    cameras converging on one spot. The outer map is fitted to ``frustum_overlap`` by
    ``benchmarks/similarity_agreement.py``. Cost: a few 3x3 operations per past camera. Exactly
    symmetric; equal poses give 1 (to ~1e-6); a camera looking the other way gives 0.

    The 3x3 algebra runs in float64 (``sqrt(D)`` magnifies float32 rounding near ``D = 0``) and
    in closed form, elementwise: no solver launches and no device sync on CUDA.
    """
    bounds = _check(current, bank, bounds, near, far)
    mean, cov = frustum_moments(bounds, near, far)
    rel = relative_pose(current.double(), bank.double())  # past cameras in the current camera's frame
    rot, trans = rel[:, :3, :3], rel[:, :3, 3]
    past_mean = rot @ mean + trans  # (N, 3)
    past_cov = rot @ cov @ rot.transpose(-1, -2)  # (N, 3, 3)
    avg_cov = (cov + past_cov) / 2
    offset = past_mean - mean
    adjugate_times_offset, avg_det = _adjugate_apply(avg_cov, offset)
    mahalanobis = (offset * adjugate_times_offset).sum(-1) / avg_det
    spread = torch.log(avg_det) - (torch.log(_det(cov)) + torch.log(_det(past_cov))) / 2
    distance = (mahalanobis / 8 + spread / 2).clamp_min(0)
    return ((1 - distance.sqrt() / PROXY_RANGE).clamp_min(0) ** 2).float()


MEASURES = {"frustum": frustum_overlap, "proxy": pose_proxy}


def similarity(
    current: torch.Tensor,
    bank: torch.Tensor,
    measure: str = ContextOptions().similarity,
    bounds: torch.Tensor | None = None,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> torch.Tensor:
    """Score ``bank: (N, 4, 4)`` against ``current: (4, 4)`` (or ``(N, 4, 4)``, pair by pair) with the
    measure named ``measure``: ``(N,)``."""
    if measure not in MEASURES:
        raise ValueError(f"similarity measure must be one of {sorted(MEASURES)}, got {measure!r}")
    return MEASURES[measure](current, bank, bounds=bounds, near=near, far=far)


class Revisit(NamedTuple):
    """The best-matching past camera: ``index`` (long, -1 when the bank is empty), its ``score``
    and ``hit`` (bool: a revisit the denoising cache may reuse). 0-d tensors: no device sync."""

    index: torch.Tensor
    score: torch.Tensor
    hit: torch.Tensor


def find_revisit(
    current: torch.Tensor,
    bank: torch.Tensor,
    threshold: float = REVISIT_THRESHOLD,
    max_distance: float = REVISIT_MAX_DISTANCE,
    measure: str = "frustum",
    bounds: torch.Tensor | None = None,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> Revisit:
    """Best past camera for reusing denoising work: ``(4, 4)``, ``(N, 4, 4)`` -> ``Revisit``.

    Among past cameras whose centre is within ``max_distance * far`` of the current one (close
    enough that parallax of nearby content stays small), the highest ``measure`` score; a hit when
    that score is ``>= threshold``. Ties go to the earliest camera.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"revisit threshold must be in [0, 1], got {threshold}")
    if not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0 (a fraction of far), got {max_distance}")
    scores = similarity(current, bank, measure, bounds, near, far)
    if bank.shape[0] == 0:
        return Revisit(
            torch.tensor(-1, device=current.device), torch.tensor(0.0, device=current.device),
            torch.tensor(False, device=current.device),
        )
    distance = (camera_centers(bank.float()) - camera_centers(current.float())).norm(dim=-1)
    eligible = torch.where(distance <= max_distance * far, scores, torch.full_like(scores, -1.0))
    index = eligible.argmax()  # the first of equal maxima
    best = eligible[index]
    found = best >= 0
    return Revisit(torch.where(found, index, -1), best.clamp_min(0), found & (best >= threshold))
