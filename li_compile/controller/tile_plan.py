"""Tile-level block-sparse attention plans from the cameras, made once per chunk.

With the video tokens in 3D tile order (``li_compile.tiled_sequence``), one attention block is one
compact space-time tile, and which key tiles a query tile needs follows from the cameras. Per query
tile of the chunk the plan visits, in this order of priority:

1. ``OWN``: every tile of its own chunk;
2. ``SINK``: the prefix and suffix tokens (text, registers, attention sinks);
3. ``RECENT``: in every recent context frame, the tiles within ``recent_radius`` tiles of where the
   query tile's content was. That place is geometry, not a guess: the ray through the query tile's
   centre, at depths across ``depth_range``, is carried through the relative pose into the recent
   camera and projected; the window covers the projected segment (for a static camera, the tile
   itself). Later recent frames rank first;
4. ``MEMORY``: in every memory frame, the tiles whose ray cone (the tile's rays, truncated at
   ``depth_range``) the chunk's cameras see: the share of the cone (its rays' depths, in log depth)
   inside any chunk camera's frustum, widened by ``visibility_margin`` (as ``similarity.in_frustum``
   widens it), must exceed ``min_visibility``. The frame-level ``frustum_overlap`` applied to one tile's cone; ranked by it.

Context query tiles (``queries="all"``, HY-WorldPlay's full sequence) follow ``context_queries``:
``"dense"`` (every key that holds a frame: exact, costs nothing in accuracy), ``"camera"`` (their own
frames' tiles, the whole chunk, the sinks, and the context tiles their own cameras need, by the
chunk rows' rules 3 and 4 with the query tile's frames in place of the chunk's) or ``"frame_local"``
(their own frames' tiles and the sinks). Prefix/suffix queries see every key. Padding slots
(``roles`` entry ``"pad"``) are never visited: blocks that mix padding with frames are partial,
under ``key_keep``; padding query tiles see only the sinks.

The plan is written IN PLACE into a fixed-capacity ``BlockLayout`` (``empty_tile_plan``), so shapes
never change from chunk to chunk. A query block holding more candidate key blocks than the capacity
keeps the highest priorities (own chunk > sink > recent window > memory by visibility) and drops the
rest, counted in the returned ``PlanStats``. Own chunk, sinks and dense context rows are mandatory:
``required_capacity`` says how many blocks they take, and ``empty_tile_plan`` refuses less.

Once per chunk (see ``write_tile_plan``)::

    layout = empty_tile_plan(tiled, capacity=required_capacity(tiled, params) + extra)   # at warm-up
    stats = write_tile_plan(layout, tiled, roles, context_poses, chunk_poses, bounds, params)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from li_compile.controller.poses import relative_pose, validate_bounds, validate_poses
from li_compile.controller.similarity import DEFAULT_FAR
from li_compile.kernels.block_layout import INDEX_DTYPE, BlockLayout, cdiv, to_bcsr
from li_compile.options import CONTEXT_QUERY_RULES
from li_compile.tiled_sequence import TiledSequence

ROLES = ("pad", "memory", "recent")
# Priority classes: class c spans [c, c + 1); a higher class is always kept before a lower one.
OWN, SINK, RECENT, MEMORY = 4.0, 3.0, 2.0, 1.0
NEVER = float("-inf")
CONE_RAYS = 4  # a tile's ray cone is sampled on a CONE_RAYS x CONE_RAYS grid of rays, each clipped exactly
_IN_FRONT = 1e-6  # a reprojected point counts when its depth in the recent camera exceeds this


@dataclass(frozen=True)
class TilePlanParams:
    """How wide a tile plan looks (the knobs calibration widens).

    ``recent_radius``: tiles (rows and columns) around the reprojected location in recent frames;
    ``depth_range``: ``(near, far)`` world units where scene content is assumed, for reprojection
    and ray cones; ``depth_samples``: depths along each query tile's ray; ``visibility_margin``:
    chunk frustums widen by this fraction of the image per side (and of ``far`` in depth);
    ``min_visibility``: a memory tile is visited when more than this fraction of its cone is seen;
    ``context_queries``: the rule for context query tiles, one of ``CONTEXT_QUERY_RULES``."""

    recent_radius: int = 1
    depth_range: tuple[float, float] = (0.5, DEFAULT_FAR)
    depth_samples: int = 4
    visibility_margin: float = 0.1
    min_visibility: float = 0.0
    context_queries: str = "dense"

    def __post_init__(self) -> None:
        if isinstance(self.recent_radius, bool) or not isinstance(self.recent_radius, int) or self.recent_radius < 0:
            raise ValueError(f"recent_radius must be an int >= 0 (tiles), got {self.recent_radius!r}")
        if (len(self.depth_range) != 2 or not all(_real(d) for d in self.depth_range)
                or not 0 < self.depth_range[0] < self.depth_range[1] < math.inf):
            raise ValueError(f"depth_range must be (near, far) with 0 < near < far < inf, got {self.depth_range!r}")
        if isinstance(self.depth_samples, bool) or not isinstance(self.depth_samples, int) or self.depth_samples < 1:
            raise ValueError(f"depth_samples must be an int >= 1, got {self.depth_samples!r}")
        if not _real(self.visibility_margin) or not 0 <= self.visibility_margin < math.inf:
            raise ValueError(f"visibility_margin must be >= 0 (a fraction of the image), got {self.visibility_margin!r}")
        if not _real(self.min_visibility) or not 0 <= self.min_visibility < 1:
            raise ValueError(f"min_visibility must be in [0, 1), got {self.min_visibility!r}")
        if self.context_queries not in CONTEXT_QUERY_RULES:
            raise ValueError(f"context_queries must be one of {CONTEXT_QUERY_RULES}, got {self.context_queries!r}")


def _real(value: object) -> bool:
    """Whether ``value`` is a real number (int or float, not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PlanStats(NamedTuple):
    """What one ``write_tile_plan`` wrote: ``density`` (visited block pairs over all pairs, mean over
    batch and heads), ``visited`` (block pairs), ``dropped`` (candidates cut by the capacity, per class)."""

    density: float
    visited: int
    dropped: dict[str, int]


# -- geometry -----------------------------------------------------------------------------------


def _tile_image_boxes(tiled: TiledSequence, bounds: torch.Tensor) -> torch.Tensor:
    """(nh * nw, 4): the image-plane rectangle ``(x0, x1, y0, y1)`` of each tile column (h, w)."""
    order = tiled.key_order
    _, nh, nw = order.tiles
    boxes = order.tile_boxes[: nh * nw, 1:].float()  # (hw, 2 axes (h, w), [start, stop))
    x_min, x_max, y_min, y_max = bounds.unbind()
    x = x_min + boxes[:, 1] / order.grid_w * (x_max - x_min)
    y = y_min + boxes[:, 0] / order.grid_h * (y_max - y_min)
    return torch.stack([x[:, 0], x[:, 1], y[:, 0], y[:, 1]], -1)


def _frames_of_t(tiled: TiledSequence, frames: int) -> torch.Tensor:
    """(ceil(frames / tt), frames) bool: which of ``frames`` frames each time-tile holds."""
    tt = tiled.tile[0]
    return torch.arange(frames)[None, :] // tt == torch.arange(cdiv(frames, tt))[:, None]


def recent_window(
    tiled: TiledSequence, chunk_poses: torch.Tensor, recent_poses: torch.Tensor, bounds: torch.Tensor,
    params: TilePlanParams,
) -> torch.Tensor:
    """Which tiles of each recent frame each chunk query tile visits: ``(chunk tiles, R, nh * nw)`` bool.

    ``chunk_poses: (F, 4, 4)``, ``recent_poses: (R, 4, 4)`` camera-to-world, ``bounds: (4,)``. For each
    query tile (time-tile major, then rows, columns), the centre ray of its (h, w) column, at
    ``depth_samples`` depths spaced geometrically over ``depth_range``, is carried from each of its
    frames' cameras into each recent camera and projected to tile coordinates. The tiles within
    ``recent_radius`` of the box of each projected point, and of each pair of consecutive points (a
    segment of the epipolar line), are visited. A segment that crosses behind the recent camera
    keeps its part in front: the half-line from its point in front out to the image's edge (the
    tiles within ``recent_radius`` of it, found by clipping it against each tile)."""
    boxes = _tile_image_boxes(tiled, bounds)
    near, far = params.depth_range
    depths = torch.logspace(math.log10(near), math.log10(far), params.depth_samples).clamp(near, far)
    centre = torch.stack([(boxes[:, 0] + boxes[:, 1]) / 2, (boxes[:, 2] + boxes[:, 3]) / 2, torch.ones(len(boxes))], -1)
    points = centre[:, None, :] * depths[None, :, None]  # (hw, n, 3) in the chunk camera
    to_recent = relative_pose(recent_poses[:, None], chunk_poses[None])  # (R, F, 4, 4)
    p = torch.einsum("rfij,hnj->rfhni", to_recent[..., :3, :3], points) + to_recent[:, :, None, None, :3, 3]
    z = p[..., 2]
    valid = z > _IN_FRONT
    x_min, x_max, y_min, y_max = bounds.unbind()
    order = tiled.key_order
    per_row = order.grid_h / tiled.tile[1] / (y_max - y_min)  # tile rows per unit of image y, and columns per x
    per_col = order.grid_w / tiled.tile[2] / (x_max - x_min)
    col = (p[..., 0] / z.clamp_min(_IN_FRONT) - x_min) * per_col
    row = (p[..., 1] / z.clamp_min(_IN_FRONT) - y_min) * per_row
    exact = torch.stack([row, col], -1)  # (R, F, hw, n, 2) tile coordinates (may lie off the grid)
    at = exact.floor()
    lo = torch.cat([at, torch.minimum(at[..., 1:, :], at[..., :-1, :])], -2)  # points, then consecutive pairs
    hi = torch.cat([at, torch.maximum(at[..., 1:, :], at[..., :-1, :])], -2)
    ok = torch.cat([valid, valid[..., 1:] & valid[..., :-1]], -1)  # (R, F, hw, boxes)
    _, nh, nw = order.tiles
    key = torch.stack(torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij"), -1).reshape(-1, 2).float()
    r = params.recent_radius
    inside = ((key >= lo[..., None, :] - r) & (key <= hi[..., None, :] + r)).all(-1)  # (R, F, hw, boxes, hw_k)
    per_frame = (inside & ok[..., None]).any(-2)  # (R, F, hw_q, hw_k)
    per_frame |= _behind_crossings(p, exact, valid, torch.tensor([per_row, per_col]), key, r)
    frames_of_t = _frames_of_t(tiled, chunk_poses.shape[0])  # (chunk t-tiles, F)
    per_tile = (per_frame[:, None] & frames_of_t[None, :, :, None, None]).any(2)  # (R, T, hw_q, hw_k)
    return per_tile.permute(1, 2, 0, 3).reshape(-1, recent_poses.shape[0], nh * nw)


def _behind_crossings(p: torch.Tensor, exact: torch.Tensor, valid: torch.Tensor, per_unit: torch.Tensor,
                      key: torch.Tensor, radius: int) -> torch.Tensor:
    """The key tiles (``key: (hw_k, 2)``, row and column) within ``radius`` of the in-front part of
    each consecutive pair of reprojected points (``p: (..., n, 3)`` in the recent camera, ``exact``
    their ``(..., n, 2)`` tile coordinates) whose other point is behind the camera: ``(..., hw_k)``.

    That part's image is a half-line: from the point in front, away along the image direction of
    where the segment crosses the camera's plane (as depth falls to 0 the projection runs off to
    infinity that way; a segment through the camera's centre projects to its point alone). It is
    clipped against every tile's box, widened by ``radius`` (Liang-Barsky), out to a length that
    leaves the grid. Only the crossing pairs are clipped (most chunks have none)."""
    lead = valid.shape[:-1]
    out = torch.zeros(math.prod(lead), key.shape[0], dtype=torch.int32)
    straddle = (valid[..., 1:] ^ valid[..., :-1]).reshape(-1, valid.shape[-1] - 1)  # (pairs' owners, n - 1)
    owner, pair = straddle.nonzero(as_tuple=True)
    if owner.numel() == 0:
        return out.bool().reshape(*lead, key.shape[0])
    p, exact, valid = p.reshape(-1, *p.shape[-2:]), exact.reshape(-1, *exact.shape[-2:]), valid.reshape(-1, valid.shape[-1])
    first_in_front = valid[owner, pair][:, None]  # (K, 1): the pair's first point is the one in front
    start = torch.where(first_in_front, exact[owner, pair], exact[owner, pair + 1])
    front = torch.where(first_in_front, p[owner, pair], p[owner, pair + 1])
    back = torch.where(first_in_front, p[owner, pair + 1], p[owner, pair])
    share = (front[..., 2:] / (front[..., 2:] - back[..., 2:])).nan_to_num(0.0)  # of the way from front to back
    crossing = front[..., :2] + (back[..., :2] - front[..., :2]) * share  # image-plane point at depth 0
    direction = torch.stack([crossing[..., 1], crossing[..., 0]], -1) * per_unit  # (row, col), tile units
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    reach = start.norm(dim=-1, keepdim=True) + key.norm(dim=-1).max() + 2 * radius + 2
    step = (direction * reach)[:, None, :]  # (K, 1, 2)
    origin = start[:, None, :]
    lo, hi = key - radius, key + radius + 1  # (hw_k, 2) each tile's box, widened
    moving = step.abs() > 1e-9
    safe = torch.where(moving, step, torch.ones_like(step))
    t_lo, t_hi = (lo - origin) / safe, (hi - origin) / safe
    enter = torch.where(moving, torch.minimum(t_lo, t_hi), torch.full_like(t_lo, -math.inf))
    leave = torch.where(moving, torch.maximum(t_lo, t_hi), torch.full_like(t_hi, math.inf))
    still_inside = (moving | ((origin >= lo) & (origin <= hi))).all(-1)
    enter = enter.amax(-1).clamp_min(0.0)
    leave = leave.amin(-1).clamp_max(1.0)
    hit = still_inside & (enter <= leave)  # (K, hw_k)
    out.index_put_((owner,), hit.int(), accumulate=True)
    return (out > 0).reshape(*lead, key.shape[0])


def memory_visibility(
    tiled: TiledSequence, memory_poses: torch.Tensor, chunk_poses: torch.Tensor, bounds: torch.Tensor,
    params: TilePlanParams,
) -> torch.Tensor:
    """How much of each memory tile's ray cone the chunk's cameras see: ``(M, nh * nw)`` in [0, 1].

    ``memory_poses: (M, 4, 4)``, ``chunk_poses: (F, 4, 4)``, ``bounds: (4,)``. The cone of tile
    (h, w) is its image rectangle's rays truncated at ``depth_range``, sampled at ``CONE_RAYS**2``
    ray-cell centres, each ray's visible depths measured exactly in log depth (not equal volumes as
    in ``similarity.frustum_samples``: what a key tile holds is a surface at some depth, and a near
    surface matters as much as a far one); the score is the largest share of the cone inside one
    chunk camera's frustum, widened by ``visibility_margin`` (``cone_seen``)."""
    return cone_seen(tiled, memory_poses, chunk_poses, bounds, params).amax(1)


def cone_seen(
    tiled: TiledSequence, memory_poses: torch.Tensor, cameras: torch.Tensor, bounds: torch.Tensor,
    params: TilePlanParams,
) -> torch.Tensor:
    """``memory_visibility`` per camera: ``(M, F, nh * nw)``, the share of each memory tile's ray cone
    inside each of ``cameras (F, 4, 4)``'s frustums (widened by ``visibility_margin``), exact along
    each ray: the ray's depths ``s`` in ``depth_range`` (the memory camera's) inside the frustum, found
    by clipping the ray against its planes (``_ray_share_inside``) and measured in log depth, so near
    and far surfaces count alike. Sampled depths missed a tile seen only between two samples."""
    near, far = params.depth_range
    cell = (torch.arange(CONE_RAYS) + 0.5) / CONE_RAYS  # ray grid over the tile's rectangle, cell centres
    fu, fv = torch.meshgrid(cell, cell, indexing="ij")
    boxes = _tile_image_boxes(tiled, bounds)  # (hw, 4)
    u = boxes[:, :1] + (boxes[:, 1:2] - boxes[:, :1]) * fu.reshape(1, -1)  # (hw, rays)
    v = boxes[:, 2:3] + (boxes[:, 3:4] - boxes[:, 2:3]) * fv.reshape(1, -1)
    rays = torch.stack([u, v, torch.ones_like(u)], -1)  # (hw, rays, 3): the point at depth s is s * ray
    to_camera = relative_pose(cameras[None], memory_poses[:, None])  # (M, F, 4, 4)
    a = torch.einsum("mfij,hrj->mfhri", to_camera[..., :3, :3], rays)  # p(s) = s * a + t, camera frame
    t = to_camera[:, :, None, None, :3, 3].expand_as(a)
    return _ray_share_inside(a, t, bounds, near, far, params.visibility_margin).mean(-1)  # (M, F, hw)


def _ray_share_inside(a: torch.Tensor, t: torch.Tensor, bounds: torch.Tensor, near: float, far: float,
                      margin: float) -> torch.Tensor:
    """The share, in log depth, of the depths ``s`` in ``[near, far]`` where ``s * a + t`` (camera
    frame, ``(..., 3)``) lies inside ``similarity.in_frustum``'s frustum widened by ``margin``: ``(...)``.
    That region is two convex pieces, each met by the ray in one interval: the cone ``x / z`` within the
    widened image for ``z`` in ``[near, far (1 + margin)]``, and the box ``x / near`` within it for
    ``z`` in ``[near (1 - margin), near]`` (``in_frustum`` divides by ``max(z, near)``)."""
    x_min, x_max, y_min, y_max = bounds.to(a.dtype).unbind()
    dx, dy = margin * (x_max - x_min), margin * (y_max - y_min)
    left, right, bottom, top = x_min - dx, x_max + dx, y_min - dy, y_max + dy
    z_near, z_far = near * (1 - min(margin, 1.0)), far * (1 + margin)
    (ax, ay, az), (tx, ty, tz) = a.unbind(-1), t.unbind(-1)
    # each piece's half-spaces c0 + c1 * s >= 0: its depth slab, then x and y within the image times z or near
    cone = [(tz - near, az), (z_far - tz, -az), (tx - left * tz, ax - left * az), (right * tz - tx, right * az - ax),
            (ty - bottom * tz, ay - bottom * az), (top * tz - ty, top * az - ay)]
    box = [(tz - z_near, az), (near - tz, -az), (tx - left * near, ax), (right * near - tx, -ax),
           (ty - bottom * near, ay), (top * near - ty, -ay)]
    inside = torch.zeros_like(az)
    for planes in (cone, box):  # they meet only where z = near
        lo, hi = torch.full_like(az, near), torch.full_like(az, far)
        for c0, c1 in planes:
            bound = -c0 / torch.where(c1 == 0, torch.ones_like(c1), c1)
            lo = torch.where(c1 > 0, torch.maximum(lo, bound), lo)
            hi = torch.where(c1 < 0, torch.minimum(hi, bound), hi)
            hi = torch.where((c1 == 0) & (c0 < 0), lo, hi)  # parallel to the plane, outside it: empty
        inside += hi.clamp_min(lo).log() - lo.log()  # an empty interval (hi <= lo, maybe hi < 0): 0
    return inside / math.log(far / near)


# -- priorities ---------------------------------------------------------------------------------


def _check_roles(tiled: TiledSequence, roles: Sequence[str]) -> list[str]:
    roles = list(roles)
    context = tiled.sequence.context_frames
    if len(roles) != context:
        raise ValueError(f"roles must name one of {ROLES} for each of the {context} context frames, got {len(roles)}")
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise ValueError(f"roles[{i}] must be one of {ROLES}, got {role!r}")
    return roles


def tile_priorities(
    tiled: TiledSequence,
    roles: Sequence[str],
    context_poses: torch.Tensor,
    chunk_poses: torch.Tensor,
    bounds: torch.Tensor,
    params: TilePlanParams = TilePlanParams(),
) -> torch.Tensor:
    """The tile-level plan before the capacity cut: ``(Tq + 1, Tk + 1)`` float32, the priority of query
    tile ``i`` visiting key tile ``j`` (``NEVER`` = -inf: not visited); the last row and column are
    the prefix/suffix tokens. Tiles are numbered as in ``tiled.query_order`` / ``tiled.key_order``.

    ``roles``: ``"pad"``, ``"memory"`` or ``"recent"`` per context frame (``context_frames`` of them,
    in sequence order); ``context_poses: (context_frames, 4, 4)`` and ``chunk_poses: (chunk_frames,
    4, 4)`` camera-to-world (padding slots' poses are ignored); ``bounds: (4,)`` the lens
    (``poses.bounds_from_fov(fov_y_deg, aspect)``). Rules and classes in the module docstring."""
    s = tiled.sequence
    roles = _check_roles(tiled, roles)
    if context_poses.shape != (s.context_frames, 4, 4):
        raise ValueError(f"context_poses must be ({s.context_frames}, 4, 4), got {tuple(context_poses.shape)}")
    if chunk_poses.shape != (s.chunk_frames, 4, 4):
        raise ValueError(f"chunk_poses must be ({s.chunk_frames}, 4, 4), got {tuple(chunk_poses.shape)}")
    real = [i for i, role in enumerate(roles) if role != "pad"]
    context_poses = context_poses.detach().cpu().float()
    validate_poses(context_poses[real], "context_poses (frames that are not padding)")
    chunk_poses = validate_poses(chunk_poses.detach().cpu(), "chunk_poses")
    bounds = validate_bounds(bounds.detach().cpu())

    _, nh, nw = tiled.key_order.tiles
    hw = nh * nw
    key_tiles = math.prod(tiled.key_order.tiles)
    query_tiles = math.prod(tiled.query_order.tiles)
    context_tiles = tiled.context_tiles
    frames_of_t = _frames_of_t(tiled, s.context_frames)  # (context t-tiles, context frames)

    def of_role(*wanted: str) -> torch.Tensor:  # (context frames,) bool
        return torch.tensor([role in wanted for role in roles], dtype=torch.bool)

    # per key tile: holds a frame (not only padding)
    key_real = torch.ones(key_tiles + 1, dtype=torch.bool)
    key_real[:context_tiles] = (frames_of_t & of_role("memory", "recent")).any(-1).repeat_interleave(hw)

    prio = torch.full((query_tiles + 1, key_tiles + 1), NEVER)
    chunk_rows = slice(tiled.sequence.context_frames // tiled.tile[0] * hw if s.queries == "all" else 0, query_tiles)
    prio[chunk_rows, context_tiles:key_tiles] = OWN
    prio[:, key_tiles] = SINK

    # recent window (later recent frames first), then memory tiles the chunk's cameras see (ranked by how much)
    recent = torch.nonzero(of_role("recent")).flatten().tolist()
    if recent:
        window = recent_window(tiled, chunk_poses, context_poses[recent], bounds, params)  # (Tc, R, hw)
        _visit_recent(prio[chunk_rows], window, recent, tiled)
    memory = torch.nonzero(of_role("memory")).flatten().tolist()
    if memory:
        seen = memory_visibility(tiled, context_poses[memory], chunk_poses, bounds, params)  # (M, hw)
        _visit_memory(prio[chunk_rows], seen[:, None], memory, tiled, params)

    # context query tiles (full sequence) and prefix/suffix queries
    every_key = torch.where(key_real, OWN, NEVER)
    every_key[key_tiles] = SINK
    prio[query_tiles] = every_key
    if s.queries == "all" and context_tiles:
        query_real = key_real[:context_tiles]
        if params.context_queries == "dense":
            prio[:context_tiles] = torch.where(query_real[:, None], every_key, prio[:context_tiles])
        else:
            same_t = torch.arange(context_tiles)[:, None] // hw == torch.arange(key_tiles)[None] // hw
            local = torch.where(same_t & query_real[:, None] & key_real[None, :key_tiles], OWN, NEVER)
            prio[:context_tiles, :key_tiles] = local
            if params.context_queries == "camera":
                rows = torch.maximum(prio[:context_tiles], camera_context_rows(tiled, roles, context_poses, bounds, params))
                rows[:, context_tiles:key_tiles] = OWN
                prio[:context_tiles] = torch.where(query_real[:, None], rows, prio[:context_tiles])
    return prio


def camera_context_rows(
    tiled: TiledSequence, roles: Sequence[str], context_poses: torch.Tensor, bounds: torch.Tensor,
    params: TilePlanParams,
) -> torch.Tensor:
    """The ``"camera"`` rule's context key tiles for the context's own query tiles: ``(context tiles,
    key tiles + 1)`` priorities (``NEVER`` elsewhere). Each context query tile is planned from its
    own frames' cameras as a chunk tile is from the chunk's: recent frames through the reprojected
    window (``recent_window``), memory frames through the ray cones its cameras see (``cone_seen``);
    roles and poses as in ``tile_priorities`` (poses already checked)."""
    s = tiled.sequence
    _, nh, nw = tiled.key_order.tiles
    hw = nh * nw
    context_tiles = tiled.context_tiles
    rows = torch.full((context_tiles, math.prod(tiled.key_order.tiles) + 1), NEVER)
    recent = [i for i, role in enumerate(roles) if role == "recent"]
    if recent:
        _visit_recent(rows, recent_window(tiled, context_poses, context_poses[recent], bounds, params), recent, tiled)
    memory = [i for i, role in enumerate(roles) if role == "memory"]
    if memory:
        seen = cone_seen(tiled, context_poses[memory], context_poses, bounds, params)  # (M, context frames, hw)
        frames_of_t = _frames_of_t(tiled, s.context_frames)  # (context t-tiles, context frames)
        per_t = torch.where(frames_of_t[None, :, :, None], seen[:, None], 0.0).amax(2)  # (M, t-tiles, hw)
        _visit_memory(rows, per_t.repeat_interleave(hw, 1), memory, tiled, params)
    return rows


def _visit_recent(rows: torch.Tensor, window: torch.Tensor, frames: Sequence[int], tiled: TiledSequence) -> None:
    """Raise ``rows (query tiles, key tiles + 1)`` in place to ``RECENT`` (later frames higher) where
    ``window (query tiles, R, hw)`` says each query tile visits a tile of recent frame ``frames[r]``."""
    hw = math.prod(tiled.key_order.tiles[1:])
    for r, frame in enumerate(frames):
        t = frame // tiled.tile[0]
        value = torch.tensor(RECENT + 0.5 * (frame + 1) / (tiled.sequence.context_frames + 1))
        block = rows[:, t * hw : (t + 1) * hw]
        block.copy_(torch.where(window[:, r], torch.maximum(block, value), block))


def _visit_memory(rows: torch.Tensor, seen: torch.Tensor, frames: Sequence[int], tiled: TiledSequence,
                  params: TilePlanParams) -> None:
    """Raise ``rows (query tiles, key tiles + 1)`` in place to ``MEMORY`` + how much is seen, where
    ``seen (M, query tiles | 1, hw)`` of memory frame ``frames[m]``'s tile exceeds ``min_visibility``."""
    hw = math.prod(tiled.key_order.tiles[1:])
    for m, frame in enumerate(frames):
        t = frame // tiled.tile[0]
        value = torch.where(seen[m] > params.min_visibility, MEMORY + 0.999 * seen[m], NEVER)
        block = rows[:, t * hw : (t + 1) * hw]
        block.copy_(torch.maximum(block, value))


def key_keep(tiled: TiledSequence, roles: Sequence[str]) -> torch.Tensor:
    """(kv_len,) bool in key tile order: False exactly on the tokens of padding context frames."""
    roles = _check_roles(tiled, roles)
    pad = torch.tensor([role == "pad" for role in roles] + [False] * tiled.sequence.chunk_frames, dtype=torch.bool)
    frames = tiled.key_frame_ids
    return torch.where(frames < 0, True, ~pad[frames.clamp_min(0)])


def block_priorities(tiled: TiledSequence, tile_prio: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Tile priorities ``(Tq + 1, Tk + 1)`` -> block priorities ``(Q, K)``: the highest priority of any
    (query tile, key tile) pair that meets in the (query block, key block). Exact when blocks are
    whole tiles; with ragged tiles a block is visited when any of its tiles is (a superset)."""

    def groups(tile_ids: torch.Tensor, tiles: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = torch.where(tile_ids < 0, tiles, tile_ids)  # distinct (block, tile group) pairs
        pair = torch.unique((torch.arange(len(tile_ids)) // block) * (tiles + 1) + group)
        return pair // (tiles + 1), pair % (tiles + 1)

    qb, qg = groups(tiled.query_tile_ids, math.prod(tiled.query_order.tiles), block_q)
    kb, kg = groups(tiled.key_tile_ids, math.prod(tiled.key_order.tiles), block_k)
    rows = torch.full((cdiv(tiled.sequence.q_len, block_q), tile_prio.shape[1]), NEVER)
    rows.scatter_reduce_(0, qb[:, None].expand(-1, rows.shape[1]), tile_prio[qg], "amax")
    out = torch.full((rows.shape[0], cdiv(tiled.sequence.kv_len, block_k)), NEVER)
    return out.scatter_reduce_(1, kb[None].expand(rows.shape[0], -1), rows[:, kg], "amax")


# -- fixed-capacity plans, written in place -----------------------------------------------------


def required_capacity(
    tiled: TiledSequence, params: TilePlanParams = TilePlanParams(), block_q: int = 128, block_k: int = 128
) -> int:
    """The most key blocks one query block must visit (own chunk, sinks, dense context rows): the
    least capacity a plan buffer may have. Independent of the cameras; computed with no padding."""
    return int(mandatory_blocks(tiled, params, block_q, block_k).sum(-1).max())


def mandatory_blocks(
    tiled: TiledSequence, params: TilePlanParams = TilePlanParams(), block_q: int = 128, block_k: int = 128
) -> torch.Tensor:
    """``(Q, K)`` bool: the block pairs every plan of ``tiled`` visits whatever the cameras (own chunk,
    sinks, dense context rows), with no padding. Its mean is the least density a plan can have."""
    s = tiled.sequence
    roles = ["memory"] * s.context_frames
    eye = torch.eye(4)
    prio = tile_priorities(
        tiled, roles, eye.expand(s.context_frames, 4, 4), eye.expand(s.chunk_frames, 4, 4),
        torch.tensor([-1.0, 1.0, -1.0, 1.0]), params,
    )
    return block_priorities(tiled, prio, block_q, block_k) >= SINK


def empty_tile_plan(
    tiled: TiledSequence,
    *,
    capacity: int,
    block_q: int = 128,
    block_k: int = 128,
    batch: int = 1,
    heads: int = 1,
    device: str | torch.device = "cpu",
) -> BlockLayout:
    """A plan buffer to write tile plans into: a ``BlockLayout`` with ``capacity`` key blocks per query
    block, full and partial lists (``(batch, heads, Q[, capacity])`` int32, all empty) and a
    ``key_keep (1, kv_len)``. Make it once (at warm-up); ``write_tile_plan`` fills it in place."""
    kv_blocks = cdiv(tiled.sequence.kv_len, block_k)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= kv_blocks:
        raise ValueError(f"capacity must be an int in [1, {kv_blocks}] (key blocks), got {capacity!r}")
    q_blocks = cdiv(tiled.sequence.q_len, block_q)

    def counts() -> torch.Tensor:
        return torch.zeros(batch, heads, q_blocks, dtype=INDEX_DTYPE, device=device)

    def indices() -> torch.Tensor:
        return torch.zeros(batch, heads, q_blocks, capacity, dtype=INDEX_DTYPE, device=device)

    keep = torch.ones(1, tiled.sequence.kv_len, dtype=torch.bool, device=device)
    return BlockLayout(
        counts(), indices(), counts(), indices(), keep, block_q, block_k, tiled.sequence.q_len, tiled.sequence.kv_len
    )


def write_priorities_(layout: BlockLayout, priorities: torch.Tensor, keep: torch.Tensor,
                      dense_span: tuple[int, int] = (0, 0)) -> PlanStats:
    """Fill ``layout`` (from ``empty_tile_plan``) in place from block priorities.

    ``priorities: (Q, K)`` or ``(B|1, H|1, Q, K)`` (broadcast to the layout's batch and heads; e.g.
    calibrated per-head plans), -inf = never; ``keep: (kv_len,)`` bool, False on padding keys. Per
    query block, the ``capacity`` highest-priority candidates are visited (ties: lower key block
    first): blocks with a padding key go to the partial list (under ``key_keep``), the rest to the
    full list. Key blocks ``[first, end)`` of ``dense_span``, which every query block must visit
    (SDPA runs them: ``kernels.split_attention``), count as visited and are left out of both lists.
    Raises ``ValueError`` when the mandatory blocks (priority >= ``SINK``) exceed the capacity: that
    is a buffer made too small, never a per-chunk event."""
    if layout.full_kv_num_blocks is None or layout.key_keep is None:
        raise ValueError("layout must have full lists and a key_keep buffer: make it with empty_tile_plan")
    lead = tuple(layout.kv_num_blocks.shape[:2])
    grid = (layout.q_blocks, layout.kv_blocks)
    if priorities.dim() == 2:
        priorities = priorities[None, None]
    if priorities.dim() != 4 or tuple(priorities.shape[2:]) != grid:
        raise ValueError(f"priorities must be (Q, K) = {grid} or (B|1, H|1, Q, K), got {tuple(priorities.shape)}")
    try:
        torch.broadcast_shapes(tuple(priorities.shape), (*lead, *grid))
    except RuntimeError:
        raise ValueError(f"priorities lead dims {tuple(priorities.shape[:2])} do not broadcast to the layout's {lead}") from None
    # planned once per distinct (batch, head) of ``priorities``; broadcast when written
    prio = priorities.detach().cpu().float()
    copies = math.prod(lead) // math.prod(prio.shape[:2])
    if keep.shape != (layout.kv_len,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool ({layout.kv_len},), got {keep.dtype} {tuple(keep.shape)}")
    capacity = layout.capacity
    mandatory = int((prio >= SINK).sum(-1).max())
    if mandatory > capacity:
        raise ValueError(
            f"capacity {capacity} is below the {mandatory} key blocks a query block must visit (own chunk, sinks, "
            "dense rows): make the buffer with capacity >= required_capacity(...)"
        )
    candidates = prio > NEVER
    order = prio.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(grid[1]).expand_as(order))
    chosen = candidates & (rank < capacity)
    padded = torch.cat([keep.cpu(), keep.new_ones(layout.kv_blocks * layout.block_k - layout.kv_len)])
    masked = ~padded.view(layout.kv_blocks, layout.block_k).all(-1)  # (K,): blocks holding a padding key
    listed = chosen.clone()
    listed[..., dense_span[0]:dense_span[1]] = False
    for (counts, indices), mask in zip(layout._lists(), (listed & masked, listed & ~masked)):
        new_counts, new_indices = to_bcsr(mask, capacity)
        counts.copy_(new_counts.expand_as(counts))
        indices.copy_(new_indices.expand_as(indices))
    layout.key_keep.copy_(keep[None])
    dropped = candidates & ~chosen
    return PlanStats(
        density=chosen.float().mean().item(),
        visited=int(chosen.sum()) * copies,
        dropped={
            "recent": int((dropped & (prio >= RECENT) & (prio < SINK)).sum()) * copies,
            "memory": int((dropped & (prio < RECENT)).sum()) * copies,
        },
    )


def write_tile_plan(
    layout: BlockLayout,
    tiled: TiledSequence,
    roles: Sequence[str],
    context_poses: torch.Tensor,
    chunk_poses: torch.Tensor,
    bounds: torch.Tensor,
    params: TilePlanParams | Sequence[TilePlanParams | None] = TilePlanParams(),
    dense_span: tuple[int, int] = (0, 0),
) -> PlanStats:
    """The once-per-chunk call: the tile plan of this chunk's cameras, written into ``layout`` in place.

    ``layout``: a buffer from ``empty_tile_plan(tiled, ...)`` (its tensors keep their identity and
    shapes); ``params``: one for every head, or one per head (``len`` = the layout's heads; None =
    that head visits every block: a calibrated global head); ``dense_span``: key blocks left out of
    the lists for SDPA (``write_priorities_``); the other arguments as in ``tile_priorities``. The
    plan is in tile order: the site must run q, k, v permuted by ``tiled``
    (``TiledSequence.permute_queries`` / ``permute_keys``)."""
    if (layout.q_len, layout.kv_len) != (tiled.sequence.q_len, tiled.sequence.kv_len):
        raise ValueError(
            f"layout is for (q_len, kv_len) = {(layout.q_len, layout.kv_len)}, the sequence has "
            f"{(tiled.sequence.q_len, tiled.sequence.kv_len)}"
        )
    per_head = (params,) if isinstance(params, TilePlanParams) else tuple(params)
    heads = layout.kv_num_blocks.shape[1]
    if len(per_head) not in (1, heads):
        raise ValueError(f"params must be one TilePlanParams or one per head ({heads}), got {len(per_head)}")
    if len(set(per_head)) == 1:  # every head alike (a calibration that chose one plan): written once, broadcast
        per_head = per_head[:1]
    grid = (layout.q_blocks, layout.kv_blocks)
    blocks: dict[TilePlanParams | None, torch.Tensor] = {}
    for p in per_head:
        if p not in blocks:
            blocks[p] = torch.full(grid, OWN) if p is None else block_priorities(
                tiled, tile_priorities(tiled, roles, context_poses, chunk_poses, bounds, p), layout.block_q, layout.block_k)
    prio = torch.stack([blocks[p] for p in per_head])[None]  # (1, heads | 1, Q, K)
    return write_priorities_(layout, prio, key_keep(tiled, roles), dense_span)


def tile_plan(
    tiled: TiledSequence,
    roles: Sequence[str],
    context_poses: torch.Tensor,
    chunk_poses: torch.Tensor,
    bounds: torch.Tensor,
    params: TilePlanParams = TilePlanParams(),
    *,
    block_q: int = 128,
    block_k: int = 128,
) -> BlockLayout:
    """A fresh layout with the chunk's tile plan at full capacity (nothing dropped): for calibration,
    tests and pictures; the controller writes into a fixed buffer with ``write_tile_plan`` instead."""
    layout = empty_tile_plan(tiled, capacity=cdiv(tiled.sequence.kv_len, block_k), block_q=block_q, block_k=block_k)
    write_tile_plan(layout, tiled, roles, context_poses, chunk_poses, bounds, params)
    return layout
