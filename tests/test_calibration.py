"""Calibration: kept mass is the softmax mass a plan visits (1 when dense); on a model built to have
known local attention, calibration picks the narrowest plan reaching the target, a higher target
never picks a narrower one, global heads stay dense, and the result survives a JSON round trip; a
corrupt or foreign file is refused, naming what is wrong (kept masses outside [0, 1], a choice its
kept masses and target do not give)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.calibration import (
    DENSE,
    FORMAT_VERSION,
    Calibration,
    CalibrationSetting,
    calibrate,
    kept_mass,
    kept_mass_from_probs,
    widening_ladder,
)
from li_compile.controller.poses import bounds_from_fov
from li_compile.controller.tile_plan import TilePlanParams, tile_plan
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence

TILED = TiledSequence(SequenceLayout(2, 1, 8, 16, queries="chunk"), (1, 4, 4))
ROLES = ["recent", "recent"]
EYE = torch.eye(4)


def _plan(chunk: int, params: TilePlanParams):
    """A static camera: the recent window is the query tile and its neighbours within the radius."""
    return tile_plan(TILED, ROLES, EYE.expand(2, 4, 4), EYE.expand(1, 4, 4), bounds_from_fov(60.0, 2.0), params,
                     block_q=16, block_k=16)


def _local_attention(sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 2, L, 3) in tile order: head 0 attends by -sharpness * (distance in tokens)^2 to keys
    at the same place in every frame; head 1 is global (uniform)."""
    s = TILED.sequence

    def places(perm: torch.Tensor) -> torch.Tensor:
        raster = perm % s.tokens_per_frame
        return torch.stack([raster // s.grid_w, raster % s.grid_w], -1).double()

    pq, pk = places(TILED.query_perm), places(TILED.key_perm)
    q_local = torch.cat([2 * sharpness * pq, torch.ones(len(pq), 1, dtype=torch.float64)], -1)
    k_local = torch.cat([pk, -sharpness * (pk**2).sum(-1, keepdim=True)], -1)
    q = torch.stack([q_local, torch.zeros_like(q_local)])[None]
    k = torch.stack([k_local, k_local])[None]
    return q, k


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0))
def test_kept_mass_is_the_softmax_mass_on_visited_keys_and_one_when_dense(seed, keep):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    mask = torch.rand(1, 4, 6, 10, generator=g) < keep
    probs = torch.softmax(q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5, -1)
    torch.testing.assert_close(kept_mass(q, k, mask, rows_per_pass=4), kept_mass_from_probs(probs, mask))
    torch.testing.assert_close(kept_mass(q, k, torch.ones(1, 1, 6, 10, dtype=torch.bool)), torch.ones(4, dtype=torch.float64))


def test_calibration_reaches_its_target_on_known_local_attention_and_keeps_global_heads_dense():
    q, k = _local_attention(sharpness=0.15)
    ladder = widening_ladder(TilePlanParams(recent_radius=0), steps=3)  # radius 0..2: never the whole frame
    result = calibrate(ladder, [{"layer0": (q, k)}], _plan, target=0.99, scale=1.0)
    local, global_ = result.choice["layer0"]
    assert global_ == DENSE and result.params_for("layer0", 1) is None
    assert local != DENSE and result.recall("layer0")[0] >= 0.99
    if local > 0:  # the narrower candidate really misses the target
        assert result.kept["layer0"][local - 1, 0] < 0.99
    kept = result.kept["layer0"][:, 0]
    assert (kept.diff() >= -1e-12).all()  # wider plans keep more


def test_a_higher_target_never_picks_a_narrower_plan():
    q, k = _local_attention(sharpness=0.08)
    ladder = widening_ladder(TilePlanParams(recent_radius=0), steps=3)
    choices = [calibrate(ladder, [{"l": (q, k)}], _plan, target=t, scale=1.0).choice["l"][0] for t in (0.9, 0.99, 0.999)]
    ranks = [len(ladder) if c == DENSE else c for c in choices]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_calibration_is_saved_and_reloaded_and_prints_recall_per_layer():
    q, k = _local_attention(sharpness=0.15)
    result = calibrate(widening_ladder(steps=2), [{"a": (q, k)}, {"a": (q, k)}], _plan, target=0.95, scale=1.0)
    again = Calibration.from_json(result.to_json())
    assert again.choice == result.choice and again.candidates == result.candidates
    torch.testing.assert_close(again.kept["a"], result.kept["a"])
    assert "a " in result.table() or "a  " in result.table()


def test_a_frame_local_ladder_widens_its_context_rows_last_and_every_step_is_a_superset():
    full = TiledSequence(SequenceLayout(2, 1, 8, 16, queries="all"), (1, 4, 4))
    ladder = widening_ladder(TilePlanParams(recent_radius=0, context_queries="frame_local"), steps=3)
    assert [p.context_queries for p in ladder] == ["frame_local"] * 3 + ["camera", "dense"]
    assert ladder[-1].recent_radius == ladder[-2].recent_radius == ladder[-3].recent_radius == 2
    masks = [tile_plan(full, ROLES, EYE.expand(2, 4, 4), EYE.expand(1, 4, 4), bounds_from_fov(60.0, 2.0), p,
                       block_q=16, block_k=16).to_dense_mask() for p in ladder]
    for narrow, wide in zip(masks, masks[1:]):
        assert not (narrow & ~wide).any() and wide.sum() >= narrow.sum()
    assert masks[-1].sum() > masks[-2].sum()


SETTING = CalibrationSetting(16, 16, (1, 4, 4), (0.1, 10.0), (-1.0, 1.0, -0.5, 0.5))


def _saved_calibration() -> dict:
    """A valid calibration file (3 candidates, one layer "l" of 2 heads) as the JSON object to corrupt."""
    kept = torch.tensor([[0.5, 0.95], [0.95, 0.97], [1.0, 1.0]], dtype=torch.float64)
    calibration = Calibration(0.9, widening_ladder(TilePlanParams(), 3), {"l": kept}, {"l": [1, 0]},
                              SETTING)
    return json.loads(calibration.to_json())


def _set(*path, value):
    def corrupt(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return corrupt


def _delete(key):
    return lambda data: data.pop(key)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_set("choice", "l", value=[-3, 0]), r"choice\['l'\] must list one candidate index in \[-1, 3\) per head"),
        (_set("choice", "l", value=[7, 0]), r"choice\['l'\] must list one candidate index in \[-1, 3\) per head"),
        (_set("kept", value={"other": [[0.5, 0.9]] * 3}), r"kept and choice must name the same layers"),
        (_set("kept", "l", value=[[0.1]]), r"kept\['l'\] must be \(candidates=3, heads=2\) .* got \(1, 1\)"),
        (_set("kept", "l", 0, 0, value=float("nan")), r"kept\['l'\] must hold kept masses in \[0, 1\], got nan"),
        (_set("kept", "l", 0, 1, value=-3.0), r"kept\['l'\] must hold kept masses in \[0, 1\], got -3.0"),
        (_set("kept", "l", 2, 0, value=7.5), r"kept\['l'\] must hold kept masses in \[0, 1\], got 7.5"),
        (_set("choice", "l", value=[0, 0]), r"choice\['l'\] is \[0, 0\], but kept\['l'\] at target 0.9 gives \[1, 0\]"),
        (_set("choice", "l", value=[-1, 0]), r"choice\['l'\] is \[-1, 0\], but kept\['l'\] at target 0.9 gives \[1, 0\]"),
        (_set("target", value=0.99), r"choice\['l'\] is \[1, 0\], but kept\['l'\] at target 0.99 gives \[2, 2\]"),
        (_set("target", value=7), r"target kept mass must be in \(0, 1\], got 7"),
        (_set("target", value=0), r"target kept mass must be in \(0, 1\], got 0"),
        (_set("tile_budget", value=3), r"calibration has unknown fields \['tile_budget'\]"),
        (_set("candidates", 0, "tile_budget", value=3), r"candidates\[0\] has unknown fields \['tile_budget'\]"),
        (_delete("choice"), r"calibration has missing fields \['choice'\]"),
        (_set("made_for", "tile", value=[1, 4]), r"made_for.tile must be a list of 3 numbers, got \[1, 4\]"),
        (_delete("format_version"), r"calibration has no format_version"),
        (_set("format_version", value=3), r"calibration format_version is 3, this li_compile reads version 2"),
        (_set("format_version", value=1), r"calibration format_version is 1, this li_compile reads version 2"),
        (_set("made_for", "bounds", value=[1.0, -1.0, -0.5, 0.5]), r"bounds must be \(x_min, x_max, y_min, y_max\)"),
        (_set("candidates", 0, "visibility_margin", value="0.1"), r"visibility_margin must be >= 0 .*got '0.1'"),
        (_set("candidates", 0, "min_visibility", value=None), r"min_visibility must be in \[0, 1\), got None"),
        (_set("candidates", 0, "depth_range", value=["near", 2.0]), r"depth_range must be \(near, far\)"),
    ],
    ids=["choice_below_dense", "choice_past_the_candidates", "layers_differ", "heads_differ", "kept_nan",
         "kept_negative", "kept_above_one", "choice_narrower_than_kept_allows", "choice_dense_where_a_plan_reaches",
         "target_above_the_choice", "target_above_one",
         "target_zero", "unknown_field", "unknown_candidate_field", "missing_field", "bad_setting", "no_version",
         "newer_version", "older_version_without_lens", "empty_lens", "margin_a_string", "visibility_none", "depth_a_string"],
)
def test_a_corrupt_or_foreign_calibration_file_is_refused_naming_what_is_wrong(corrupt, match):
    data = _saved_calibration()
    Calibration.from_json(json.dumps(data))  # the file itself loads
    corrupt(data)
    with pytest.raises(ValueError, match=match):
        Calibration.from_json(json.dumps(data))


def test_a_saved_calibration_keeps_the_setting_it_was_measured_in():
    data = _saved_calibration()
    assert data["format_version"] == FORMAT_VERSION
    assert Calibration.from_json(json.dumps(data)).made_for == SETTING
