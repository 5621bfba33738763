"""Procedural 3D rooms rendered by batched torch ray casting: ground truth for trained worlds.

A **scene** is a walled square room (OpenCV world axes, y down: the floor is the plane
``y = FLOOR_Y`` below cameras at ``y = 0``) holding axis-aligned boxes and vertical cylindrical
pillars, each with its own two colours and surface pattern (checker, stripes, dots, bricks, grid),
under a sky with a sun and azimuth-dependent clouds. Everything is drawn from one integer seed,
so a seed names a scene on every device.

``render(scene, poses)`` casts one ray per (sub)pixel through every camera (camera-to-world
``(..., 4, 4)``, OpenCV axes as in ``li_compile.controller.poses``), intersects it analytically with
the floor plane, the walls, every box (slab test) and every pillar (quadratic in x-z, plus its top
cap), and shades the nearest hit (pattern colour, Lambert light, distance fog). Supersampling
averages ``ss x ss`` rays per pixel. It runs unchanged on CPU and CUDA and renders thousands of
64x64 frames per second on a GPU, fast enough to draw training clips on the fly.

Scenes batch: ``make_scenes(seeds)`` stacks several (same object counts), and ``render`` takes
poses ``(S, F, 4, 4)`` for ``S`` scenes, ``F`` frames each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from li_compile.worlds.layers import camera_rays, frame_size

FLOOR_Y = 1.2  # floor plane (world y, pointing down) below cameras at y = 0
WALL_TOP_Y = -2.0  # walls rise from the floor to this height; the sky shows above them
ROOM_HALF = 10.0  # the room spans [-ROOM_HALF, ROOM_HALF] in x and z
CLEAR_RADIUS = 2.0  # default: no object within this distance (x-z) of the origin, where cameras start
NUM_BOXES = 12
NUM_PILLARS = 8
NUM_PATTERNS = 5  # checker, stripes, dots, bricks, grid
FOG_DISTANCE = 30.0  # e-folding distance of the fog that blends far surfaces into the haze colour
AMBIENT = 0.45  # light reaching surfaces facing away from the sun
SUN_DIRECTION = (0.35, -0.8, 0.45)  # direction towards the sun (world, y down: mostly up)
PLACEMENT_TRIES = 64  # candidate positions drawn per object
OBJECT_GAP = 0.3  # metres kept free between objects
WALL_GAP = 0.2  # metres kept free between objects and walls
PARKED_RADIUS = 0.05  # size of an object that found no free place (parked in a corner)
MAX_RAYS_PER_PASS = 1 << 20  # rays traced at once; bounds the (rays x objects) temporaries
_NO_HIT = float("inf")
_EPS = 1e-6


@dataclass(frozen=True)
class Scene:
    """A batch of ``S`` procedural rooms (all tensors on one device, float32 unless noted).

    Materials are indexed ``0`` floor, ``1..4`` walls (x-, x+, z-, z+), ``5..5+N-1`` boxes,
    then ``M`` pillars. Shapes: ``box_min, box_max: (S, N, 3)``; ``pillar_xz: (S, M, 2)``,
    ``pillar_radius, pillar_top: (S, M)``; ``color_a, color_b: (S, K, 3)`` in [0, 1],
    ``pattern: (S, K)`` int64 in ``[0, NUM_PATTERNS)``, ``pattern_scale: (S, K)`` cells per metre,
    with ``K = 5 + N + M``; ``sky: (S, 2, 3)`` horizon and zenith colours; ``cloud_phase: (S, 3)``.
    """

    box_min: torch.Tensor
    box_max: torch.Tensor
    pillar_xz: torch.Tensor
    pillar_radius: torch.Tensor
    pillar_top: torch.Tensor
    color_a: torch.Tensor
    color_b: torch.Tensor
    pattern: torch.Tensor
    pattern_scale: torch.Tensor
    sky: torch.Tensor
    cloud_phase: torch.Tensor

    @property
    def num_scenes(self) -> int:
        return self.box_min.shape[0]

    def to(self, device: torch.device | str) -> "Scene":
        """The same scenes with every tensor on ``device``."""
        return Scene(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: int | slice) -> "Scene":
        """Scene(s) ``index`` of the batch, keeping the batch dimension."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return Scene(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _palette(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` saturated random colours ``(n, 3)`` from random hues (HSV with s, v in a bright range)."""
    hue = torch.rand(n, generator=generator)
    sat = 0.45 + 0.5 * torch.rand(n, generator=generator)
    val = 0.55 + 0.45 * torch.rand(n, generator=generator)
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    return val[:, None] * (1 - sat[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


def _place_objects(count: int, radius_range: tuple[float, float], clear: torch.Tensor, clearance: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x-z centres ``(count, 2)`` and radii ``(count,)`` away from ``clear (P, 2)`` and the walls.

    Rejection sampling over ``PLACEMENT_TRIES`` candidates drawn up front per object keeps the draw
    deterministic per seed; an object none of whose candidates fits is parked in a corner, tiny.
    The checks run on Python floats: a few hundred tiny comparisons, cheaper than tensor calls.
    """
    lo, hi = radius_range
    draws = torch.rand(count, PLACEMENT_TRIES, 3, generator=generator).tolist()
    path = clear.tolist()
    centres: list[tuple[float, float]] = []
    radii: list[float] = []
    for k in range(count):
        centre, radius = (ROOM_HALF - WALL_GAP, ROOM_HALF - WALL_GAP), PARKED_RADIUS
        for u, a, b in draws[k]:
            r = lo + (hi - lo) * u
            half = ROOM_HALF - r - WALL_GAP
            x, z = (2 * a - 1) * half, (2 * b - 1) * half
            if all((x - px) ** 2 + (z - pz) ** 2 > (r + clearance) ** 2 for px, pz in path) and all(
                (x - cx) ** 2 + (z - cz) ** 2 > (r + cr + OBJECT_GAP) ** 2 for (cx, cz), cr in zip(centres, radii)
            ):
                centre, radius = (x, z), r
                break
        centres.append(centre)
        radii.append(radius)
    return torch.tensor(centres), torch.tensor(radii)


def make_scene(seed: int, clear_points: torch.Tensor | None = None, clearance: float = 0.6,
               num_boxes: int = NUM_BOXES, num_pillars: int = NUM_PILLARS) -> Scene:
    """One procedural room (a ``Scene`` with ``S = 1``), fully determined by ``seed``.

    Objects keep ``clearance`` metres (x-z) from every camera centre in ``clear_points (P, 3)``
    (pass a trajectory's centres so the camera never enters an object); by default they keep
    ``CLEAR_RADIUS`` from the origin. Built on CPU; move with ``scene.to(device)``.
    """
    if num_boxes < 0 or num_pillars < 0:
        raise ValueError(f"object counts must be >= 0, got num_boxes={num_boxes}, num_pillars={num_pillars}")
    if clear_points is None:
        clear_xz, clearance = torch.zeros(1, 2), CLEAR_RADIUS
    else:
        if clear_points.ndim != 2 or clear_points.shape[-1] != 3:
            raise ValueError(f"clear_points must be (P, 3), got {tuple(clear_points.shape)}")
        clear_xz = clear_points[:, [0, 2]].float().cpu()
    g = torch.Generator().manual_seed(int(seed))
    num_objects = num_boxes + num_pillars
    centres, radii = _place_objects(num_objects, (0.35, 1.0), clear_xz, clearance, g)
    box_c, box_r = centres[:num_boxes], radii[:num_boxes]
    box_aspect = 0.6 + 0.8 * torch.rand(num_boxes, 2, generator=g)  # x, z half-extents around r
    box_half = box_r[:, None] * box_aspect / box_aspect.amax(-1, keepdim=True)
    box_height = 0.5 + 2.0 * torch.rand(num_boxes, generator=g)
    box_min = torch.stack([box_c[:, 0] - box_half[:, 0], FLOOR_Y - box_height, box_c[:, 1] - box_half[:, 1]], -1)
    box_max = torch.stack([box_c[:, 0] + box_half[:, 0], torch.full_like(box_height, FLOOR_Y),
                           box_c[:, 1] + box_half[:, 1]], -1)
    pillar_radius = 0.5 * radii[num_boxes:]
    pillar_top = FLOOR_Y - 1.5 - 2.0 * torch.rand(num_pillars, generator=g)
    num_materials = 5 + num_objects
    color_a, color_b = _palette(num_materials, g), _palette(num_materials, g) * 0.55
    pattern = torch.randint(0, NUM_PATTERNS, (num_materials,), generator=g)
    pattern_scale = 0.8 + 1.6 * torch.rand(num_materials, generator=g)
    sky = torch.stack([torch.tensor([0.85, 0.88, 0.92]), 0.35 + 0.4 * _palette(1, g)[0]])
    cloud_phase = torch.rand(3, generator=g) * 2 * torch.pi
    return Scene(box_min[None], box_max[None], centres[None, num_boxes:], pillar_radius[None], pillar_top[None],
                 color_a[None], color_b[None], pattern[None], pattern_scale[None], sky[None], cloud_phase[None])


def make_scenes(seeds: Sequence[int], clear_points: Sequence[torch.Tensor] | None = None, **kwargs) -> Scene:
    """A batch of ``len(seeds)`` rooms, scene ``i`` equal to
    ``make_scene(seeds[i], clear_points=clear_points[i], **kwargs)`` (no ``clear_points``: defaults)."""
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty")
    if clear_points is not None and len(clear_points) != len(seeds):
        raise ValueError(f"clear_points must hold one path per seed ({len(seeds)}), got {len(clear_points)}")
    paths = [None] * len(seeds) if clear_points is None else clear_points
    scenes = [make_scene(s, clear_points=path, **kwargs) for s, path in zip(seeds, paths)]
    return Scene(**{f.name: torch.cat([getattr(s, f.name) for s in scenes]) for f in fields(Scene)})


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` with components near zero nudged away from it (rays parallel to a slab)."""
    return 1.0 / torch.where(d.abs() < _EPS, torch.full_like(d, _EPS), d)


def _hit_room(o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest floor or wall hit of rays ``(S, R, 3)``: distance ``(S, R)``, material, normal ``(S, R, 3)``.

    Rays that leave the room above the walls get distance ``inf`` (sky).
    """
    inv = _safe_inverse(d)
    t_floor = torch.where(d[..., 1] > _EPS, (FLOOR_Y - o[..., 1]) * inv[..., 1], torch.full_like(o[..., 0], _NO_HIT))
    t_x = (torch.sign(d[..., 0]) * ROOM_HALF - o[..., 0]) * inv[..., 0]
    t_z = (torch.sign(d[..., 2]) * ROOM_HALF - o[..., 2]) * inv[..., 2]
    x_first = t_x < t_z
    t_wall = torch.where(x_first, t_x, t_z)
    wall_y = o[..., 1] + t_wall * d[..., 1]
    t_wall = torch.where(wall_y >= WALL_TOP_Y, t_wall, torch.full_like(t_wall, _NO_HIT))
    wall_mat = torch.where(x_first, 1 + (d[..., 0] > 0).long(), 3 + (d[..., 2] > 0).long())
    wall_normal = torch.zeros_like(d)
    wall_normal[..., 0] = torch.where(x_first, -torch.sign(d[..., 0]), torch.zeros_like(t_x))
    wall_normal[..., 2] = torch.where(x_first, torch.zeros_like(t_z), -torch.sign(d[..., 2]))
    floor_normal = torch.zeros_like(d)
    floor_normal[..., 1] = -1.0
    floor_first = t_floor < t_wall
    t = torch.where(floor_first, t_floor, t_wall)
    mat = torch.where(floor_first, torch.zeros_like(wall_mat), wall_mat)
    normal = torch.where(floor_first[..., None], floor_normal, wall_normal)
    return t, mat, normal


def _hit_boxes(o: torch.Tensor, d: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor):
    """Nearest box hit (slab test): rays ``(S, R, 3)``, boxes ``(S, N, 3)`` -> distance, box index, normal."""
    if box_min.shape[1] == 0:
        return torch.full_like(o[..., 0], _NO_HIT), torch.zeros_like(o[..., 0], dtype=torch.long), torch.zeros_like(o)
    inv = _safe_inverse(d)[:, :, None]  # (S, R, 1, 3)
    t1 = (box_min[:, None] - o[:, :, None]) * inv
    t2 = (box_max[:, None] - o[:, :, None]) * inv
    t_near_axes = torch.minimum(t1, t2)  # (S, R, N, 3)
    t_near, axis = t_near_axes.max(-1)
    t_far = torch.maximum(t1, t2).amin(-1)
    hit = (t_near <= t_far) & (t_near > 0)
    t_near = torch.where(hit, t_near, torch.full_like(t_near, _NO_HIT))
    t, index = t_near.min(-1)  # (S, R)
    hit_axis = axis.gather(-1, index[..., None])[..., 0]
    normal = torch.nn.functional.one_hot(hit_axis, 3).float() * -torch.sign(d)
    return t, index, normal


def _hit_pillars(o: torch.Tensor, d: torch.Tensor, xz: torch.Tensor, radius: torch.Tensor, top: torch.Tensor):
    """Nearest pillar hit (cylinder side or top cap): rays ``(S, R, 3)``, pillars ``(S, M)`` -> distance, index, normal."""
    if xz.shape[1] == 0:
        return torch.full_like(o[..., 0], _NO_HIT), torch.zeros_like(o[..., 0], dtype=torch.long), torch.zeros_like(o)
    oc = o[:, :, None, [0, 2]] - xz[:, None]  # (S, R, M, 2)
    dxz = d[:, :, None, [0, 2]]
    a = (dxz * dxz).sum(-1).clamp_min(_EPS)
    b = (oc * dxz).sum(-1)
    c = (oc * oc).sum(-1) - radius[:, None] ** 2
    disc = b * b - a * c
    t_side = (-b - disc.clamp_min(0).sqrt()) / a
    y_side = o[:, :, None, 1] + t_side * d[:, :, None, 1]
    side_ok = (disc > 0) & (t_side > 0) & (y_side >= top[:, None]) & (y_side <= FLOOR_Y)
    t_cap = (top[:, None] - o[:, :, None, 1]) * _safe_inverse(d[..., 1])[:, :, None]
    cap_xz = oc + t_cap[..., None] * dxz
    cap_ok = (t_cap > 0) & ((cap_xz * cap_xz).sum(-1) <= radius[:, None] ** 2)
    t_all = torch.where(side_ok, t_side, torch.full_like(t_side, _NO_HIT))
    use_cap = cap_ok & (t_cap < t_all)
    t_all = torch.where(use_cap, t_cap, t_all)
    t, index = t_all.min(-1)
    cap = use_cap.gather(-1, index[..., None])[..., 0]
    hit_xz = o[..., [0, 2]] + t.clamp_max(1e6)[..., None] * d[..., [0, 2]]
    centre = xz.gather(1, index[..., None].expand(*index.shape, 2))
    radial = (hit_xz - centre) / radius.gather(1, index).clamp_min(_EPS)[..., None]
    side_normal = torch.stack([radial[..., 0], torch.zeros_like(t), radial[..., 1]], -1)
    cap_normal = torch.zeros_like(side_normal)
    cap_normal[..., 1] = -1.0
    return t, index, torch.where(cap[..., None], cap_normal, side_normal)


def _pattern_mask(uv: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Pattern value in [0, 1] at surface coordinates ``uv (..., 2)`` (cells) for pattern ids ``(...)``."""
    cell = torch.floor(uv)
    frac = uv - cell
    checker = (cell.sum(-1) % 2).abs()
    stripes = (cell[..., 0] % 2).abs()
    dots = ((frac - 0.5).norm(dim=-1) < 0.3).float()
    brick_u = uv[..., 0] + 0.5 * (cell[..., 1] % 2)
    bricks = (((brick_u - torch.floor(brick_u)) < 0.08) | (frac[..., 1] < 0.12)).float()
    grid = ((frac < 0.1).any(-1)).float()
    masks = torch.stack([checker, stripes, dots, bricks, grid], -1)
    return masks.gather(-1, pattern[..., None])[..., 0]


def _surface_uv(point: torch.Tensor, normal: torch.Tensor, mat: torch.Tensor, num_boxes: int,
                pillar_xz: torch.Tensor) -> torch.Tensor:
    """Surface coordinates (metres) of hit points: the two world axes along the surface; arc length on pillars."""
    axis = normal.abs().argmax(-1)
    u = torch.where(axis == 0, point[..., 2], point[..., 0])
    v = torch.where(axis == 1, point[..., 2], point[..., 1])
    pillar = mat - 5 - num_boxes
    on_side = (pillar >= 0) & (axis != 1)
    if pillar_xz.shape[1] > 0:
        centre = pillar_xz.gather(1, pillar.clamp(0, pillar_xz.shape[1] - 1)[..., None].expand(*pillar.shape, 2))
        rel = point[..., [0, 2]] - centre
        u = torch.where(on_side, torch.atan2(rel[..., 1], rel[..., 0]) * 0.5 * 4 / torch.pi, u)
    return torch.stack([u, v], -1)


def _sky(scene: Scene, d: torch.Tensor) -> torch.Tensor:
    """Sky colour ``(S, R, 3)`` for directions ``(S, R, 3)``: horizon-to-zenith gradient, clouds, sun."""
    up = (-d[..., 1]).clamp(0, 1)
    base = scene.sky[:, None, 0] * (1 - up[..., None]) + scene.sky[:, None, 1] * up[..., None]
    azimuth = torch.atan2(d[..., 2], d[..., 0])
    phase = scene.cloud_phase[:, None]
    clouds = (torch.sin(3 * azimuth + phase[..., 0]) * torch.sin(5 * azimuth + 7 * up + phase[..., 1])
              + 0.5 * torch.sin(11 * azimuth - 9 * up + phase[..., 2])).clamp(0, 1) * (1 - up) * 0.6
    sun_dir = torch.tensor(SUN_DIRECTION, device=d.device)
    sun = ((d * (sun_dir / sun_dir.norm())).sum(-1) > 0.995).float()
    return (base + clouds[..., None] * (1 - base) + sun[..., None]).clamp(0, 1)


def _trace(scene: Scene, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Shaded colours ``(S, R, 3)`` of rays ``(S, R, 3)``."""
    num_boxes = scene.box_min.shape[1]
    t, mat, normal = _hit_room(o, d)
    t_box, i_box, n_box = _hit_boxes(o, d, scene.box_min, scene.box_max)
    t_pil, i_pil, n_pil = _hit_pillars(o, d, scene.pillar_xz, scene.pillar_radius, scene.pillar_top)
    for t_obj, mat_obj, n_obj in ((t_box, 5 + i_box, n_box), (t_pil, 5 + num_boxes + i_pil, n_pil)):
        closer = t_obj < t
        t = torch.where(closer, t_obj, t)
        mat = torch.where(closer, mat_obj, mat)
        normal = torch.where(closer[..., None], n_obj, normal)
    hit = torch.isfinite(t)
    t_safe = torch.where(hit, t, torch.zeros_like(t))
    point = o + t_safe[..., None] * d
    uv = _surface_uv(point, normal, mat, num_boxes, scene.pillar_xz)
    scale = scene.pattern_scale.gather(1, mat)
    mask = _pattern_mask(uv * scale[..., None], scene.pattern.gather(1, mat))[..., None]
    gather3 = mat[..., None].expand(*mat.shape, 3)
    albedo = scene.color_a.gather(1, gather3) * (1 - mask) + scene.color_b.gather(1, gather3) * mask
    sun_dir = torch.tensor(SUN_DIRECTION, device=d.device)
    light = AMBIENT + (1 - AMBIENT) * (normal * (sun_dir / sun_dir.norm())).sum(-1).clamp_min(0)
    haze = scene.sky[:, None, 0]
    fog = torch.exp(-t_safe / FOG_DISTANCE)[..., None]
    surface = (albedo * light[..., None]) * fog + haze * (1 - fog)
    return torch.where(hit[..., None], surface, _sky(scene, d))


def render(scene: Scene, poses: torch.Tensor, fov_y_deg: float = 60.0, size: int | Sequence[int] = 64,
           supersample: int = 2) -> torch.Tensor:
    """RGB frames of ``scene`` seen by cameras ``poses``; values in [0, 1], float32.

    ``poses``: ``(4, 4)``, ``(F, 4, 4)`` (one scene) or ``(S, F, 4, 4)`` (one trajectory per scene),
    camera-to-world, OpenCV axes. ``size``: an int (square) or ``(H, W)``; the vertical field of
    view is ``fov_y_deg``. Returns ``(3, H, W)``, ``(F, 3, H, W)`` or ``(S, F, 3, H, W)`` on the
    poses' device (the scene is moved there). ``supersample`` rays per pixel side are averaged
    (anti-aliasing).
    """
    if poses.shape[-2:] != (4, 4) or poses.ndim not in (2, 3, 4):
        raise ValueError(f"poses must be (4, 4), (F, 4, 4) or (S, F, 4, 4), got {tuple(poses.shape)}")
    height, width = frame_size(size)
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    lead = poses.shape[:-2]
    batched = poses.float().reshape(-1, 4, 4) if poses.ndim < 4 else poses.float()
    batched = batched[None] if poses.ndim < 4 else batched  # (S, F, 4, 4)
    if batched.shape[0] != scene.num_scenes:
        raise ValueError(f"poses are for {batched.shape[0]} scene(s) but the scene batch has {scene.num_scenes}")
    scene = scene.to(poses.device)
    num_scenes, frames = batched.shape[:2]
    o, d = camera_rays(batched, fov_y_deg, size, supersample)  # (S, F, R, 3)
    o, d = o.reshape(num_scenes, -1, 3), d.reshape(num_scenes, -1, 3)
    per_pass = max(1, MAX_RAYS_PER_PASS // max(1, num_scenes))
    colour = torch.cat([_trace(scene, o[:, i:i + per_pass], d[:, i:i + per_pass])
                        for i in range(0, o.shape[1], per_pass)], 1)
    img = colour.reshape(num_scenes * frames, height * supersample, width * supersample, 3).permute(0, 3, 1, 2)
    img = torch.nn.functional.avg_pool2d(img, supersample) if supersample > 1 else img
    return img.reshape(*lead, 3, height, width)
