"""Temporal window sizing: a scale-free change measure and monotone, bounded window rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.window import (
    DYNAMICS_HIGH,
    DYNAMICS_LOW,
    frame_changes,
    latent_dynamics,
    validate_latents,
    window_size,
)
from li_compile.options import WINDOW_RULES

FP32 = 1e-5
seeds = st.integers(0, 2**31 - 1)


def _latents(seed: int, frames: int = 5, shape=(4, 6, 8), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(frames, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- the change measure -------------------------------------------------------------------------


def test_frame_changes_match_the_definition_computed_in_float64():
    x = _latents(0).double()
    expected = torch.stack(
        [(x[t] - x[t - 1]).abs().mean() / ((x[t].abs().mean() + x[t - 1].abs().mean()) / 2) for t in range(1, len(x))]
    )
    torch.testing.assert_close(frame_changes(x.float()), expected.float(), atol=FP32, rtol=FP32)
    torch.testing.assert_close(latent_dynamics(x.float()), expected.mean().float(), atol=FP32, rtol=FP32)


def test_still_latents_have_no_dynamics_and_fresh_noise_has_a_lot():
    still = _latents(1, frames=1).expand(4, -1, -1, -1)
    assert latent_dynamics(still).item() == 0.0
    assert latent_dynamics(torch.zeros(3, 2, 2, 2)).item() == 0.0
    assert latent_dynamics(_latents(2)).item() > DYNAMICS_HIGH


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(1e-3, 1e3), st.floats(0.0, 1.0))
def test_change_is_scale_free_bounded_and_grows_with_the_step(seed, scale, step):
    base, direction = _latents(seed, frames=1), _latents(seed + 1, frames=1)
    small = torch.cat([base, base + 0.5 * step * direction])
    large = torch.cat([base, base + step * direction])
    change = frame_changes(large)
    assert 0 <= change.item() <= 2
    torch.testing.assert_close(frame_changes(large * scale), change, atol=FP32, rtol=1e-4)
    assert frame_changes(small).item() <= change.item() + FP32


def test_half_precision_latents_are_measured_in_float32():
    x = _latents(3, dtype=torch.float16)
    torch.testing.assert_close(frame_changes(x), frame_changes(x.float()), atol=FP32, rtol=FP32)


@pytest.mark.parametrize(
    "latents, words",
    [
        (torch.zeros(5), ["(T, ...)", "(5,)"]),
        (torch.zeros(1, 4, 6, 8), ["at least 2 frames", "T=1"]),
        (torch.zeros(3, 4, 6, 8, dtype=torch.int64), ["floating-point", "int64"]),
        (torch.zeros(3, 2, 2, 2).index_fill(0, torch.tensor([2]), float("nan")), ["latents[2]", "NaN or inf"]),
        ([[0.0]], ["torch.Tensor", "list"]),
    ],
)
def test_bad_latents_raise_naming_the_problem(latents, words):
    with pytest.raises(ValueError) as err:
        validate_latents(latents)
    for word in words:
        assert word in str(err.value)


# --- window rules -------------------------------------------------------------------------------

dynamics_lists = st.lists(st.floats(0.0, 2.0), min_size=1, max_size=32)
window_ranges = st.tuples(st.integers(1, 16), st.integers(0, 16)).map(lambda r: (r[0], r[0] + r[1]))


@settings(max_examples=30, deadline=None)
@given(dynamics_lists, window_ranges, st.sampled_from(WINDOW_RULES))
def test_window_is_monotone_in_the_dynamics_and_within_bounds(values, bounds, rule):
    lo, hi = bounds
    dynamics = torch.tensor(sorted(values))
    sizes = window_size(dynamics, rule, lo, hi)
    assert sizes.dtype == torch.int64 and sizes.shape == dynamics.shape
    assert (sizes >= lo).all() and (sizes <= hi).all()
    steps = sizes[1:] - sizes[:-1]
    if rule == "shrink_on_motion":
        assert (steps <= 0).all()
    elif rule == "grow_on_motion":
        assert (steps >= 0).all()
    else:
        assert (sizes == hi).all()


@pytest.mark.parametrize(
    "rule, still, moving",
    [("shrink_on_motion", 8, 2), ("grow_on_motion", 2, 8), ("fixed", 8, 8)],
)
def test_rules_reach_the_ends_of_the_range_outside_the_dynamics_band(rule, still, moving):
    sizes = window_size(torch.tensor([0.0, DYNAMICS_LOW, DYNAMICS_HIGH, 2.0]), rule, 2, 8)
    assert sizes.tolist() == [still, still, moving, moving]


def test_window_is_interpolated_between_the_band_edges():
    middle = (DYNAMICS_LOW + DYNAMICS_HIGH) / 2
    assert window_size(middle, "shrink_on_motion", 1, 9).item() == 5
    assert window_size(torch.tensor(middle), "grow_on_motion", 1, 9, low=0.0, high=2 * middle).item() == 5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"rule": "adaptive"}, ["one of", "shrink_on_motion", "'adaptive'"]),
        ({"window_min": 0}, ["window_min must be an int >= 1", "0"]),
        ({"window_max": 2.5}, ["window_max", "2.5"]),
        ({"window_min": 6, "window_max": 3}, ["window_min (6)", "window_max (3)"]),
        ({"low": 0.5, "high": 0.5}, ["low < high", "low=0.5"]),
        ({"dynamics": float("nan")}, ["NaN"]),
    ],
)
def test_bad_window_arguments_raise_naming_the_value(kwargs, words):
    args = {"dynamics": 0.1, "rule": "shrink_on_motion", "window_min": 1, "window_max": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        window_size(**args)
    for word in words:
        assert word in str(err.value)
