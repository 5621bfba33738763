"""ContextController.select: which past frames a chunk attends to, its capacity bucket, bad input."""

import math

import pytest
import torch

from li_compile.controller.buckets import bucket_for, capacity_buckets
from li_compile.controller.context import ContextController
from li_compile.controller.poses import make_poses, rotation_about_axis
from li_compile.options import ContextOptions, Options
from li_compile.plan import Plan
from li_compile.sequence import SequenceLayout

C, H, W = 4, 4, 4
Y_AXIS = torch.tensor([0.0, 1.0, 0.0])


def _turned(yaw_deg: list[float], x: list[float] | None = None) -> torch.Tensor:
    """Cameras at (x, 0, 0) turned by ``yaw_deg`` about the world y axis: (N, 4, 4)."""
    yaw = torch.tensor([math.radians(a) for a in yaw_deg])
    centers = torch.zeros(len(yaw_deg), 3)
    if x is not None:
        centers[:, 0] = torch.tensor(x)
    return make_poses(rotation_about_axis(Y_AXIS.expand(len(yaw_deg), 3), yaw), centers)


def _static_latents(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` identical latent frames: no dynamics, so the shrink rule keeps the full window."""
    frame = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(seed))
    return frame.expand(n, C, H, W).clone()


def _moving_latents(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` unrelated latent frames: maximal dynamics, so the shrink rule gives the shortest window."""
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def _make(context: dict, **kwargs) -> ContextController:
    """A controller with these context options (validated as the backend validates them), own plan."""
    return ContextController(Options.from_user({"context": context}).context, Plan(), **kwargs)


def _controller(**context) -> ContextController:
    return _make({"window_min": 1, "window_max": 2, "keep_threshold": 0.3, "window_rule": "fixed", **context}, memory_k=3)


def test_memory_keeps_frames_facing_the_chunk_and_drops_the_opposite_view():
    # frames 0..3 face the chunk's way (0 deg), 4..5 look the opposite way; 6..7 are the recent window
    past = _turned([0, 2, 0, 4, 180, 178, 0, 0])
    selection = _controller().select(3, past, _turned([0]), _static_latents(8))
    assert selection.recent == [6, 7]
    assert 4 not in selection.memory and 5 not in selection.memory
    assert len(selection.memory) == 3 and set(selection.memory) <= {0, 1, 2, 3}


def test_novel_exploration_drops_all_stale_memory():
    past = _turned([180] * 6 + [0, 0])
    controller = _controller()
    selection = controller.select(1, past, _turned([0]), _static_latents(8))
    assert selection.memory == []
    stats = controller.stats[-1].values
    assert stats["memory_kept"] == 0 and stats["memory_dropped"] == 3 and stats["memory_candidates"] == 6


def test_loop_revisit_brings_back_the_frames_of_the_first_visit():
    # walk away along +x facing +z, turn around and come back: the chunk stands where frame 0 stood
    past = _turned([0, 0, 0, 90, 180, 180, 180, 180], x=[0, 1, 2, 3, 3, 2, 1, 0.5])
    selection = _controller().select(2, past, _turned([0], x=[0.0]), _static_latents(8))
    assert selection.memory[:2] == [0, 1]


def test_identical_pose_scores_highest():
    past = _turned([30, 0, 15, 0, 0], x=[0, 0, 0, 0, 0])
    controller = _make({"window_min": 1, "window_max": 1, "keep_threshold": 0.0}, memory_k=1)
    assert controller.select(0, past, _turned([0]), _static_latents(5)).memory == [1]


@pytest.mark.parametrize("rule, static, moving", [("shrink_on_motion", 4, 1), ("grow_on_motion", 1, 4), ("fixed", 4, 4)])
def test_window_follows_the_rule_on_static_and_moving_latents(rule, static, moving):
    controller = _controller(window_min=1, window_max=4, window_rule=rule)
    past = _turned([0] * 8)
    assert controller.select(0, past, _turned([0]), _static_latents(8)).recent == list(range(8 - static, 8))
    assert controller.select(1, past, _turned([0]), _moving_latents(8)).recent == list(range(8 - moving, 8))
    assert [s.values["window"] for s in controller.stats] == [static, moving]


def test_past_latents_in_any_layout_after_the_frame_axis_give_the_same_window():
    """The window measures each frame's change over all its values: ``(N, C, h, w)`` and a token
    layout ``(N, h * w, C)`` of the same latents decide alike."""
    controller = _controller(window_min=1, window_max=4, window_rule="shrink_on_motion")
    past = _turned([0] * 8)
    for latents in (_static_latents(8), _moving_latents(8)):
        grid = controller.select(0, past, _turned([0]), latents)
        tokens = controller.select(1, past, _turned([0]), latents.flatten(2).transpose(1, 2))
        assert (grid.recent, grid.capacity) == (tokens.recent, tokens.capacity)


def test_capacity_is_the_smallest_bucket_holding_the_kept_frames():
    controller = _controller(window_min=1, window_max=5, window_rule="shrink_on_motion")  # buckets 4, 6, 8
    assert controller.warm_up_buckets() == (4, 6, 8)
    past = _turned([180] * 8 + [0] * 2)
    assert controller.select(0, past, _turned([0]), _moving_latents(10)).capacity == 4  # 1 recent, 1 memory
    assert controller.select(1, past, _turned([0]), _static_latents(10)).capacity == 6  # 5 recent
    first = controller.select(2, past[:1], _turned([0]), _static_latents(1))
    assert (first.memory, first.recent, first.capacity) == ([], [0], 4)


@pytest.mark.parametrize("chunk_frames, fill_density, filled", [(4, 0.75, True), (4, 0.8, False), (1, 0.75, False),
                                                                  (4, 1.0, False)])
def test_padding_of_a_dense_plan_is_filled_with_the_next_best_memory_frames(chunk_frames, fill_density, filled):
    """2 kept memory frames + 2 recent in a 5-slot bucket: with a 4-frame chunk the plan would visit
    (8/9)^2 = 0.79 of its token pairs, so above ``fill_density`` the padding takes the best of the
    frames below the keep threshold (frame 2, turned 90 degrees, over 3 and 4, facing away); a
    1-frame chunk's plan visits (5/6)^2 = 0.69 and keeps its padding."""
    layout = lambda capacity: SequenceLayout(capacity, chunk_frames, 2, 2)  # noqa: E731
    controller = _make({"window_max": 2, "keep_threshold": 0.3, "fill_density": fill_density},
                       memory_k=3, capacity_fractions=(1.0,), layout=layout)
    past = _turned([0, 2, 90, 180, 180, 0, 0])
    selection = controller.select(1, past, _turned([0]), _static_latents(7))
    assert selection.capacity == 5 and selection.recent == [5, 6]
    assert selection.memory == ([0, 1, 2] if filled else [0, 1])
    stats = controller.stats[-1].values
    assert stats["memory_filled"] == int(filled) and stats["memory_dropped"] == 3 - len(selection.memory)


def test_disabled_controller_is_the_dense_policy():
    # a keep_threshold (which would prune) given with it is an error: it cannot act
    controller = _make({"enabled": False, "window_max": 2}, memory_k=3)
    past = _turned([180] * 6 + [0, 0])
    selection = controller.select(0, past, _turned([0]), _moving_latents(8))
    assert selection.recent == [6, 7] and len(selection.memory) == 3 and selection.capacity == 5
    assert controller.warm_up_buckets() == (5,)


def test_capacity_buckets_cover_every_context_size():
    assert capacity_buckets(12) == (6, 9, 12)
    assert capacity_buckets(3) == (2, 3)
    assert capacity_buckets(12, (0.25, 0.5, 0.75, 1.0)) == (3, 6, 9, 12)
    for frames in range(13):
        assert bucket_for(frames, capacity_buckets(12)) >= frames
    with pytest.raises(ValueError, match="exceed the largest capacity bucket 12"):
        bucket_for(13, capacity_buckets(12))
    with pytest.raises(ValueError, match="fractions"):
        capacity_buckets(8, (0.0, 1.0))


@pytest.mark.parametrize(
    "poses, chunk_poses, latents, message",
    [
        (_turned([0, 0]).index_put((torch.tensor([1]), torch.tensor([0]), torch.tensor([3])), torch.tensor(math.nan)),
         _turned([0]), _static_latents(2), r"poses\[1\] contains NaN or inf"),
        (_turned([0, 0]) * torch.tensor([2.0, 1, 1, 1])[:, None], _turned([0]), _static_latents(2),
         r"poses\[0\].* rotation is not orthonormal"),
        (_turned([0, 0])[:, :3], _turned([0]), _static_latents(2), r"poses must have shape \(\.\.\., 4, 4\)"),
        (_turned([0, 0])[0], _turned([0]), _static_latents(2), r"poses must be \(N, 4, 4\)"),
        (_turned([0, 0]), _turned([0]).index_put((torch.tensor([0]), torch.tensor([2]), torch.tensor([3])),
                                                 torch.tensor(math.inf)), _static_latents(2),
         r"chunk_poses\[0\] contains NaN or inf"),
        (_turned([0, 0]), _turned([0]), _static_latents(3), r"latents must be \(N, ...\) with N = 2"),
    ],
    ids=["nan", "scaled-rotation", "wrong-shape", "single-pose", "inf-chunk", "latents-count"],
)
def test_bad_input_raises_value_error_naming_the_problem(poses, chunk_poses, latents, message):
    with pytest.raises(ValueError, match=message):
        _controller().select(0, poses, chunk_poses, latents)


def test_a_bad_frame_among_the_recent_latents_is_named_by_its_index_in_the_history():
    controller = ContextController(ContextOptions(window_rule="shrink_on_motion", window_max=4), Plan(), memory_k=4,
                                   fov_y_deg=60.0)
    latents = _moving_latents(20)
    latents[18] = math.nan
    yaw = [0.0] * 21
    with pytest.raises(ValueError, match=r"latents\[18\] contains NaN or inf"):
        controller.select(0, _turned(yaw[:20]), _turned(yaw[20:]), latents)


@pytest.mark.parametrize("lens", [{"bounds": torch.tensor([[-1.0, 1, -1, 1]] * 2)},
                                  {"fov_y_deg": torch.tensor([60.0, 70.0])}, {"fov_y_deg": [60.0, 70.0]},
                                  {"fov_y_deg": True}, {"fov_y_deg": torch.tensor(True)},
                                  {"fov_y_deg": 60.0, "aspect": None},
                                  {"fov_y_deg": 60.0, "aspect": torch.tensor([1.0, 2.0])}])
def test_a_lens_is_one_lens_for_every_camera(lens):
    """One field of view (or one bounds rectangle) for the model's cameras, refused at construction
    (a batch of lenses failed at the first chunk, deep in the similarity; a bool was a 1 degree lens)."""
    with pytest.raises(ValueError, match="one lens for every camera"):
        ContextController(ContextOptions(), Plan(), memory_k=4, **lens)
    assert ContextController(ContextOptions(), Plan(), memory_k=4, fov_y_deg=torch.tensor([60.0])).bounds.shape == (4,)


def test_a_layout_is_a_function_of_the_capacity_checked_at_every_bucket():
    """``layout`` gives the token layout at each context capacity: a layout itself, or a function
    that ignores its capacity, is refused when configured, naming what was expected."""
    with pytest.raises(ValueError, match="layout must be a function capacity -> SequenceLayout.*got SequenceLayout"):
        ContextController(ContextOptions(), Plan(), memory_k=4, layout=SequenceLayout(6, 2, H, W))
    with pytest.raises(ValueError, match=r"layout\(\d+\) must be a SequenceLayout with \d+ context frames .* got 6"):
        ContextController(ContextOptions(), Plan(), memory_k=4, layout=lambda capacity: SequenceLayout(6, 2, H, W))
    controller = ContextController(ContextOptions(), Plan(), memory_k=4, layout=lambda c: SequenceLayout(c, 2, H, W))
    assert controller.layout(controller.buckets[0]).context_frames == controller.buckets[0]


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="context.window_min"):
        _make({"window_min": 5, "window_max": 2})
    with pytest.raises(ValueError, match="memory_k"):
        _make({}, memory_k=-1)
    with pytest.raises(ValueError, match="keep_threshold"):
        _make({"keep_threshold": 2.0})
    with pytest.raises(ValueError, match="options must be ContextOptions"):
        ContextController({"keep_threshold": 0.2}, Plan())  # a dict here would bypass the compile options
    assert ContextController(ContextOptions(window_max=3), Plan()).max_context == 3 + 4
