"""The trajectory suite a user would recognise: every path is a list of valid cameras, the same for
the same seed; ``explore`` never comes back, ``look_around`` stays in place and pans and tilts,
``wander`` stops and turns back. (Revisiting paths are specified in ``test_worlds.py``.)"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.poses import camera_centers, validate_poses, view_directions
from li_compile.worlds import trajectories

NEW = ("explore", "look_around", "wander")


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(trajectories.TRAJECTORIES)), frames=st.integers(2, 70), seed=st.integers(0, 10**6))
def test_every_trajectory_is_valid_rotations_and_deterministic_by_seed(name, frames, seed):
    traj = trajectories.make(name, frames, seed)
    assert traj.name == name and traj.poses.shape == (frames, 4, 4) and traj.poses.dtype == torch.float32
    validate_poses(traj.poses)
    assert torch.equal(traj.poses, trajectories.make(name, frames, seed).poses)


@pytest.mark.parametrize("name", NEW)
def test_new_paths_are_accepted_by_name_and_differ_by_seed(name):
    assert name in trajectories.TRAJECTORIES
    assert not torch.equal(trajectories.make(name, 40, 0).poses, trajectories.make(name, 40, 1).poses)


@pytest.mark.parametrize("seed", range(5))
def test_explore_never_comes_back(seed):
    poses = trajectories.make("explore", 96, seed).poses
    centers = camera_centers(poses)
    gap = torch.arange(96)[None, :] - torch.arange(96)[:, None]  # j - i
    distance = (centers[None, :] - centers[:, None]).norm(dim=-1)
    progress = trajectories.STEP * math.cos(math.radians(trajectories.EXPLORE_HEADING_DEG))
    later = gap > 0
    assert (distance[later] >= progress * gap[later] - 1e-4).all()  # every frame further from all earlier ones
    assert "explore" not in trajectories.REVISITING


def test_explore_turns_corners_so_the_view_really_changes():
    dirs = view_directions(trajectories.make("explore", 96, 0).poses)
    yaw = torch.rad2deg(torch.atan2(dirs[:, 0], dirs[:, 2]))
    assert yaw.max() - yaw.min() > 45


@pytest.mark.parametrize("seed", range(3))
def test_look_around_stays_in_place_and_pans_and_tilts(seed):
    traj = trajectories.make("look_around", 48, seed)
    assert torch.equal(camera_centers(traj.poses), torch.zeros(48, 3))
    _, _, _, _, yaw, pitch = traj.actions().unbind(-1)
    assert (yaw > 0).any() and (yaw < 0).any() and (pitch > 0).any() and (pitch < 0).any()
    dirs = view_directions(traj.poses)
    pan = torch.rad2deg(torch.atan2(dirs[:, 0], dirs[:, 2]))
    assert pan.abs().max() <= trajectories.PAN_DEG + 1e-3 and pan.abs().max() > 0.5 * trajectories.PAN_DEG


def test_look_around_repeats_with_its_period_in_whole_chunks():
    traj = trajectories.make("look_around", 48, 2, chunk_frames=4)
    period = trajectories.default_period(48, 4)
    torch.testing.assert_close(traj.poses[period:], traj.poses[: 48 - period])


@pytest.mark.parametrize("seed", range(4))
def test_wander_stops_and_turns_back_smoothly(seed):
    poses = trajectories.make("wander", 128, seed).poses
    centers = camera_centers(poses)
    step = (centers[1:] - centers[:-1]).norm(dim=-1)
    assert (step <= trajectories.STEP + 1e-5).all()
    assert (step < 1e-6).any(), "never stops"
    dirs = view_directions(poses)
    yaw = torch.atan2(dirs[:, 0], dirs[:, 2])
    turn = torch.remainder(yaw[1:] - yaw[:-1] + math.pi, 2 * math.pi) - math.pi
    assert turn.abs().max() <= math.pi / trajectories.TURN_BACK_FRAMES + 1e-4  # no jumps in heading
    over_turn_back = turn.unfold(0, trajectories.TURN_BACK_FRAMES, 1).sum(-1).abs()
    assert (over_turn_back > math.pi - 1e-3).any(), "never turns back"


def test_wander_speeds_up_after_a_stop():
    centers = camera_centers(trajectories.make("wander", 128, 0).poses)
    step = (centers[1:] - centers[:-1]).norm(dim=-1)
    restarts = torch.nonzero((step[:-1] < 1e-6) & (step[1:] > 1e-6)).flatten() + 1
    assert len(restarts) and (step[restarts] < trajectories.STEP * (1 - 1e-3)).all()  # eases up, no jump to full speed
