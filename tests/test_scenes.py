"""Specifications of the procedural scene renderer (training.scenes)."""

import pytest
import torch

from li_compile.controller.poses import make_poses, rotation_about_axis
from training.scenes import FLOOR_Y, ROOM_HALF, make_scene, make_scenes, render

SIZE = 24  # small frames keep the suite fast; the geometry does not depend on resolution


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread avoids thread-pool waits that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _yaw_poses(angles, centre=(0.0, 0.0, 0.0)):
    angles = torch.as_tensor(angles, dtype=torch.float32)
    axis = torch.tensor([0.0, 1.0, 0.0]).expand(len(angles), 3)
    return make_poses(rotation_about_axis(axis, angles), torch.tensor(centre).expand(len(angles), 3))


def test_same_seed_gives_the_same_scene_and_images():
    poses = _yaw_poses([0.0, 1.0])
    a, b = render(make_scene(7), poses, size=SIZE), render(make_scene(7), poses, size=SIZE)
    assert torch.equal(a, b)


def test_different_seeds_give_different_images():
    poses = _yaw_poses([0.0, 1.0])
    assert (render(make_scene(1), poses, size=SIZE) - render(make_scene(2), poses, size=SIZE)).abs().mean() > 0.02


def test_images_are_rgb_in_unit_range_with_requested_shapes():
    scene, poses = make_scene(0), _yaw_poses([0.0, 2.0, 4.0])
    frames = render(scene, poses, size=SIZE, supersample=1)
    assert frames.shape == (3, 3, SIZE, SIZE) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1
    assert render(scene, poses[0], size=SIZE).shape == (3, SIZE, SIZE)


def test_image_changes_when_the_camera_turns_or_moves():
    scene = make_scene(3)
    base, turned = render(scene, _yaw_poses([0.0, 0.5]), size=SIZE)
    moved = render(scene, _yaw_poses([0.0], centre=(0.0, 0.0, 1.0)), size=SIZE)[0]
    assert (base - turned).abs().mean() > 0.02
    assert (base - moved).abs().mean() > 0.01


def test_revisiting_a_pose_renders_the_same_frame():
    poses = _yaw_poses([0.3, 2.0, 4.0, 0.3])
    frames = render(make_scene(5), poses, size=SIZE)
    torch.testing.assert_close(frames[0], frames[3], atol=1e-6, rtol=0)


def test_a_batch_of_scenes_matches_rendering_each_scene_alone():
    seeds, poses = [4, 9], _yaw_poses([0.0, 1.5])
    batch = render(make_scenes(seeds), torch.stack([poses, poses.flip(0)]), size=SIZE)
    torch.testing.assert_close(batch[0], render(make_scene(4), poses, size=SIZE), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch[1], render(make_scene(9), poses.flip(0), size=SIZE), atol=1e-6, rtol=0)


def test_floor_fills_the_bottom_when_looking_down():
    down = make_poses(rotation_about_axis(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(-torch.pi / 2)), torch.zeros(3))
    scene = make_scene(0)
    img = render(scene, down, size=SIZE, supersample=1)
    floor_a, floor_b = scene.color_a[0, 0], scene.color_b[0, 0]
    # every pixel is a fogged, lit mix of the two floor colours: close to the line between them
    pixels = img.permute(1, 2, 0).reshape(-1, 3)
    along = floor_b - floor_a
    lam = ((pixels - floor_a) @ along / along.dot(along)).clamp(0, 1)
    off_line = (pixels - (floor_a + lam[:, None] * along)).norm(dim=-1)
    assert off_line.median() < 0.25


def test_objects_keep_clear_of_the_given_camera_path():
    path = torch.stack([torch.linspace(-5, 5, 21), torch.zeros(21), torch.zeros(21)], -1)
    scene = make_scene(11, clear_points=path, clearance=0.8)
    box_lo, box_hi = scene.box_min[0][:, [0, 2]], scene.box_max[0][:, [0, 2]]
    xz = path[:, [0, 2]]
    nearest = torch.maximum(box_lo[None] - xz[:, None], xz[:, None] - box_hi[None]).clamp_min(0).norm(dim=-1)
    assert nearest.min() > 0.5
    pillar_gap = (xz[:, None] - scene.pillar_xz[0][None]).norm(dim=-1) - scene.pillar_radius[0][None]
    assert pillar_gap.min() > 0.5
    assert (scene.box_max[0][:, [0, 2]].abs() <= ROOM_HALF).all() and (scene.box_max[0][:, 1] == FLOOR_Y).all()


@pytest.mark.parametrize("bad", [torch.eye(3), torch.eye(4)[None, None, None]])
def test_bad_pose_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="poses must be"):
        render(make_scene(0), bad, size=SIZE)


def test_pose_batch_must_match_the_scene_batch():
    with pytest.raises(ValueError, match="scene"):
        render(make_scenes([1, 2]), _yaw_poses([0.0])[None], size=SIZE)


def test_wide_frames_see_more_to_the_sides_with_the_same_vertical_view():
    scene, pose = make_scene(2), _yaw_poses([0.0])
    square = render(scene, pose, size=(SIZE, SIZE), supersample=1)[0]
    wide = render(scene, pose, size=(SIZE, 2 * SIZE), supersample=1)[0]
    assert wide.shape == (3, SIZE, 2 * SIZE)
    # the centre column is the same ray in both lenses
    torch.testing.assert_close(wide[:, :, SIZE - 1:SIZE + 1].mean(-1), square[:, :, SIZE // 2 - 1:SIZE // 2 + 1].mean(-1),
                               atol=1e-5, rtol=0)
