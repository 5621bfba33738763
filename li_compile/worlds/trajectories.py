"""Seeded camera trajectories with exploration and revisits, one camera per latent frame.

A world model is driven along a camera path; the interesting paths for this project come back to
places they have seen, because that is where retrieved memory frames matter and where a denoising
cache can hit. The paths in ``REVISITING`` are built so that their revisits are exact: the returning
camera has the same centre and the same view direction as an earlier one (within float rounding).
The rest resemble how people drive these models: ``explore`` never comes back, ``wander`` stops
and turns back the way a person does (its returns are near, not exact).

Conventions (those of ``li_compile.controller.poses``): camera-to-world ``(N, 4, 4)`` float32,
OpenCV camera axes (x right, y down, z forward); the world also uses y down, so the ground is
the x-z plane and turning left or right is a rotation about the world y axis. One lens for all
cameras: ``fov_y_deg`` and ``aspect`` (the similarity functions take ``bounds_from_fov`` of them).
Distances are in world units; ``li_compile.controller.similarity`` treats 10 units as the scene
depth, and the paths move ``STEP`` units per latent frame.

Matrix-Game-style worlds are driven by discrete actions instead of poses: ``Trajectory.actions``
derives them from the motion (keyboard forward/back/left/right, mouse yaw/pitch deltas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from li_compile.controller.poses import look_at, make_poses, relative_pose, rotation_about_axis

STEP = 0.25  # world units moved per latent frame
TURN_DEG = 6.0  # largest yaw change per latent frame while walking, degrees
CORNER_DEG = (60.0, 120.0)  # a random walk turns corners of this many degrees (either way) ...
CORNER_FRAMES = 3  # ... over this many frames ...
CORNER_EVERY = 6  # ... every this many frames on average
SMOOTHING = 0.8  # turn rate kept from one frame to the next by explore and wander (the rest is fresh noise)
EXPLORE_HEADING_DEG = 60.0  # explore's heading stays within this of its start direction: it never comes back
PAN_DEG = 90.0  # look_around pans at most this far either way ...
TILT_DEG = 20.0  # ... and tilts at most this far up or down
WANDER_EVENT_EVERY = 10  # wander stops or turns back every this many frames on average ...
WANDER_STOP_FRAMES = (2, 5)  # ... standing still for this many frames (inclusive) ...
TURN_BACK_FRAMES = 6  # ... or turning 180 degrees in place over this many frames
ACCELERATION = 0.5  # wander closes this fraction of the gap to full speed each frame
FOV_Y_DEG = 60.0
ASPECT = 16 / 9
MOVE_EPS = 1e-3  # translation (world units) below which no movement key is pressed
KEY_COS = 0.5  # a key is pressed when the move's direction is within 60 degrees of the key's axis
KEYS = ("forward", "back", "left", "right")
MOUSE = ("yaw", "pitch")
ACTION_DIM = len(KEYS) + len(MOUSE)


@dataclass(frozen=True)
class Trajectory:
    """A camera path: ``poses (N, 4, 4)`` camera-to-world per latent frame and one lens for all."""

    name: str
    poses: torch.Tensor
    fov_y_deg: float = FOV_Y_DEG
    aspect: float = ASPECT

    def __len__(self) -> int:
        return self.poses.shape[0]

    def actions(self) -> torch.Tensor:
        """Matrix-Game-style actions per frame, derived from the motion: ``(N, 6)`` float32.

        Columns: keyboard ``forward, back, left, right`` (0/1: the camera-frame translation from
        the previous frame is longer than ``MOVE_EPS`` and within 60 degrees of +z, -z, -x, +x) and
        mouse ``yaw, pitch``
        (radians turned since the previous frame: yaw about the camera's y axis, positive to
        the right; pitch about its x axis, positive up). Frame 0 has no motion: all zeros.
        """
        rel = relative_pose(self.poses[:-1], self.poses[1:])  # frame i+1 in the camera of frame i
        move = rel[:, :3, 3]
        length = move.norm(dim=-1, keepdim=True)
        along = move[:, [2, 2, 0, 0]] * torch.tensor([1.0, -1.0, -1.0, 1.0]) / length.clamp_min(MOVE_EPS)
        keys = (along > KEY_COS) & (length > MOVE_EPS)
        forward = rel[:, :3, 2]  # the new view direction in the old camera's frame
        yaw = torch.atan2(forward[:, 0], forward[:, 2])
        pitch = torch.atan2(-forward[:, 1], forward[:, [0, 2]].norm(dim=-1))
        per_step = torch.cat([keys.float(), yaw[:, None], pitch[:, None]], -1)
        return torch.cat([torch.zeros(1, ACTION_DIM), per_step], 0)


def ground_poses(x: torch.Tensor, z: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor | None = None) -> torch.Tensor:
    """Cameras standing on the ground plane: positions ``(x, 0, z)``, heading ``yaw`` (radians,
    0 looks along +z, positive turns right towards +x), tilt ``pitch`` (positive looks up):
    ``(N,)`` each -> ``(N, 4, 4)``."""
    pitch = torch.zeros_like(yaw) if pitch is None else pitch
    down = torch.tensor([0.0, 1.0, 0.0]).expand(len(yaw), 3)
    right = torch.tensor([1.0, 0.0, 0.0]).expand(len(yaw), 3)
    rot = rotation_about_axis(down, yaw) @ rotation_about_axis(right, pitch)  # view (sin yaw, 0, cos yaw) at pitch 0
    return make_poses(rot, torch.stack([x, torch.zeros_like(x), z], -1))


def _walk(steps: torch.Tensor, turns: torch.Tensor, start_yaw: float = 0.0) -> torch.Tensor:
    """Integrate a forward walk: per-frame step lengths and yaw turns ``(N,)`` -> poses ``(N, 4, 4)``.

    Frame 0 stands at the origin facing ``start_yaw``; frame i turns by ``turns[i]`` then steps.
    """
    yaw = start_yaw + torch.cumsum(turns, 0) - turns[0]
    step = steps.clone()
    step[0] = 0.0
    x = torch.cumsum(step * torch.sin(yaw), 0)
    z = torch.cumsum(step * torch.cos(yaw), 0)
    return ground_poses(x, z, yaw)


def _check_frames(frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")


def out_and_back(frames: int, seed: int = 0) -> Trajectory:
    """Walk out along a gently curving path, then retreat backwards along it to the start, facing
    the same way: the second half revisits the first half's cameras in reverse order, exactly."""
    _check_frames(frames)
    gen = torch.Generator().manual_seed(seed)
    out_len = frames // 2 + 1
    turns = (torch.rand(out_len, generator=gen) * 2 - 1) * math.radians(TURN_DEG) / 2
    out = _walk(torch.full((out_len,), STEP), turns)
    back = out.flip(0)[1:]
    return Trajectory("out_and_back", torch.cat([out, back])[:frames])


def loop(frames: int, seed: int = 0, period: int | None = None) -> Trajectory:
    """Walk a closed loop (a circle, facing along it) again and again: frame ``i`` and frame
    ``i + period`` are the same camera. Default period: two thirds of ``frames``, so the last
    third is a revisit. ``seed`` sets the loop's radius and direction."""
    _check_frames(frames)
    period = period or default_period(frames)
    gen = torch.Generator().manual_seed(seed)
    direction = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
    phase = direction * 2 * math.pi * (torch.arange(frames) % period).float() / period
    radius = period * STEP / (2 * math.pi) * (0.8 + 0.4 * torch.rand(1, generator=gen).item())
    x = radius * (1 - torch.cos(phase)) * direction
    z = radius * torch.sin(phase) * direction
    return Trajectory("loop", ground_poses(x, z, phase))


def orbit(frames: int, seed: int = 0, period: int | None = None) -> Trajectory:
    """Circle a point while looking at it, slightly from above; frame ``i + period`` repeats frame
    ``i`` (default period: two thirds of ``frames``). ``seed`` sets radius, height and direction."""
    _check_frames(frames)
    period = period or default_period(frames)
    gen = torch.Generator().manual_seed(seed)
    radius = 3.0 + 2.0 * torch.rand(1, generator=gen).item()
    height = -0.5 - torch.rand(1, generator=gen).item()  # y is down: negative is above the ground
    direction = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
    angle = direction * 2 * math.pi * (torch.arange(frames) % period).float() / period
    eye = torch.stack([radius * torch.sin(angle), torch.full_like(angle, height), -radius * torch.cos(angle)], -1)
    return Trajectory("orbit", look_at(eye, torch.zeros(3)))


def random_walk_with_returns(frames: int, seed: int = 0, return_every: int = 8) -> Trajectory:
    """Explore by a seeded random walk (steady steps, small random turns, and now and then a corner
    of 60-120 degrees, so the view really changes) and, every ``return_every`` frames on average,
    retrace the path backwards (facing as before) for a random number of frames: each return
    revisits earlier cameras exactly, then exploration resumes from there."""
    _check_frames(frames)
    if return_every < 2:
        raise ValueError(f"return_every must be >= 2, got {return_every}")
    gen = torch.Generator().manual_seed(seed)
    path = [torch.eye(4)]  # the cameras of the path as explored so far, including retraced ones
    stack = [0]  # indices into `path` of the current trail (retracing pops it)
    yaw, x, z = 0.0, 0.0, 0.0
    corner: list[float] = []  # the rest of a corner being turned, radians per frame
    while len(path) < frames:
        if len(stack) > 2 and torch.rand(1, generator=gen).item() < 1 / return_every:
            back = int(torch.randint(2, max(3, len(stack) // 2 + 1), (1,), generator=gen))
            for _ in range(min(back, len(stack) - 1)):
                stack.pop()
                path.append(path[stack[-1]])
            head = path[stack[-1]]
            x, z = head[0, 3].item(), head[2, 3].item()
            yaw = math.atan2(head[0, 2].item(), head[2, 2].item())
            continue
        if not corner and torch.rand(1, generator=gen).item() < 1 / CORNER_EVERY:
            low, high = CORNER_DEG
            angle = math.radians(low + (high - low) * torch.rand(1, generator=gen).item())
            sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
            corner = [sign * angle / CORNER_FRAMES] * CORNER_FRAMES
        jitter = (torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(TURN_DEG)
        yaw += corner.pop() if corner else jitter
        x, z = x + STEP * math.sin(yaw), z + STEP * math.cos(yaw)
        path.append(ground_poses(torch.tensor([x]), torch.tensor([z]), torch.tensor([yaw]))[0])
        stack.append(len(path) - 1)
    return Trajectory("random_walk_with_returns", torch.stack(path[:frames]))


def explore(frames: int, seed: int = 0) -> Trajectory:
    """Pure exploration, no return: walk forward, now and then (every ``CORNER_EVERY`` frames on
    average) turning towards a new random heading at corner speed, with small smooth turns between.
    The heading stays within ``EXPLORE_HEADING_DEG`` of the start direction, so every step gains at
    least ``STEP * cos(EXPLORE_HEADING_DEG)`` along it and no camera comes back near an earlier one."""
    _check_frames(frames)
    gen = torch.Generator().manual_seed(seed)
    limit = math.radians(EXPLORE_HEADING_DEG)
    corner_rate = math.radians(CORNER_DEG[1]) / CORNER_FRAMES
    yaw, target, rate, yaws = 0.0, 0.0, 0.0, []
    for _ in range(frames):
        yaws.append(yaw)
        if torch.rand(1, generator=gen).item() < 1 / CORNER_EVERY:
            target = (torch.rand(1, generator=gen).item() * 2 - 1) * limit
        rate = SMOOTHING * rate + (1 - SMOOTHING) * (torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(TURN_DEG)
        yaw = min(max(yaw + rate + min(max(target - yaw, -corner_rate), corner_rate), -limit), limit)
    yaw_t = torch.tensor(yaws)
    return Trajectory("explore", _walk(torch.full((frames,), STEP), torch.cat([yaw_t[:1], yaw_t.diff()])))


def look_around(frames: int, seed: int = 0, period: int | None = None) -> Trajectory:
    """Stand still and look around: pan (yaw) over up to +-``PAN_DEG`` and tilt (pitch) over up to
    +-``TILT_DEG``, smoothly, twice as many tilts as pans per period; frame ``i + period`` repeats
    frame ``i`` (default period: two thirds of ``frames``). ``seed`` sets amplitudes, phase, direction."""
    _check_frames(frames)
    period = period or default_period(frames)
    gen = torch.Generator().manual_seed(seed)
    pan = math.radians(PAN_DEG) * (0.6 + 0.4 * torch.rand(1, generator=gen).item())
    tilt = math.radians(TILT_DEG) * (0.5 + 0.5 * torch.rand(1, generator=gen).item())
    direction = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
    phase = 2 * math.pi * (torch.arange(frames) % period).float() / period
    yaw = direction * pan * torch.sin(phase)
    pitch = tilt * torch.sin(2 * phase)
    still = torch.zeros(frames)
    return Trajectory("look_around", ground_poses(still, still, yaw, pitch))


def wander(frames: int, seed: int = 0) -> Trajectory:
    """A smooth, human-like random drive: speed eases up to ``STEP`` per frame, the turn rate is
    smoothed noise; now and then the camera stops for ``WANDER_STOP_FRAMES`` frames (no motion at
    all), or turns back: 180 degrees in place over ``TURN_BACK_FRAMES`` frames, then walks on over
    the ground it came from. Stops and turn-backs happen about every ``WANDER_EVENT_EVERY`` frames."""
    _check_frames(frames)
    gen = torch.Generator().manual_seed(seed)
    x = z = yaw = rate = speed = 0.0
    xs, zs, yaws = [], [], []
    plan: list[tuple[float, float]] = []  # scripted frames ahead: (speed, yaw turn) per frame
    while len(xs) < frames:
        xs.append(x), zs.append(z), yaws.append(yaw)
        if not plan and torch.rand(1, generator=gen).item() < 1 / WANDER_EVENT_EVERY:
            if torch.rand(1, generator=gen).item() < 0.5:
                low, high = WANDER_STOP_FRAMES
                plan = [(0.0, 0.0)] * int(torch.randint(low, high + 1, (1,), generator=gen))
            else:
                sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
                plan = [(0.0, sign * math.pi / TURN_BACK_FRAMES)] * TURN_BACK_FRAMES
            rate = 0.0
        if plan:
            speed, turn = plan.pop(0)
        else:
            rate = SMOOTHING * rate + (1 - SMOOTHING) * (torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(TURN_DEG)
            speed, turn = speed + (STEP - speed) * ACCELERATION, rate
        yaw += turn
        x, z = x + speed * math.sin(yaw), z + speed * math.cos(yaw)
    return Trajectory("wander", ground_poses(torch.tensor(xs), torch.tensor(zs), torch.tensor(yaws)))


TRAJECTORIES: dict[str, Callable[..., Trajectory]] = {
    "out_and_back": out_and_back,
    "loop": loop,
    "orbit": orbit,
    "random_walk_with_returns": random_walk_with_returns,
    "explore": explore,
    "look_around": look_around,
    "wander": wander,
}


PERIODIC = ("loop", "orbit", "look_around")  # the paths that repeat themselves with a period
REVISITING = ("loop", "orbit", "out_and_back", "random_walk_with_returns", "look_around")  # exact revisits


def default_period(frames: int, chunk_frames: int = 1) -> int:
    """The period of a periodic path: two thirds of ``frames``, rounded down to whole chunks of
    ``chunk_frames`` frames, so a revisiting chunk has the same cameras, in the same order, as the
    chunk it revisits (what a denoising cache needs to reuse it)."""
    return max(2, chunk_frames, (2 * frames) // 3 // chunk_frames * chunk_frames)


def make(name: str, frames: int, seed: int = 0, chunk_frames: int = 1) -> Trajectory:
    """The trajectory called ``name`` (see ``TRAJECTORIES``) with ``frames`` latent frames; periodic
    paths get ``default_period(frames, chunk_frames)``."""
    if name not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {sorted(TRAJECTORIES)}, got {name!r}")
    if name in PERIODIC:
        return TRAJECTORIES[name](frames, seed, period=default_period(frames, chunk_frames))
    return TRAJECTORIES[name](frames, seed)
