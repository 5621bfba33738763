"""Calibrating a compiled model's tile plans on its own chunks (``li_compile.calibrate``).

Specifications: the kept mass measured at a site equals the fp64 softmax reference, padding rows
and keys left out; chunks inside a calibration compute exactly what dense attention does; a
calibration to keep all the mass changes no answer afterwards; a looser one makes later plans
sparse per head, with no recompilation, and the report prints the recall per layer; a saved
calibration reloads to the same plans.
"""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import li_compile
from li_compile.calibrating import CalibrationRun
from li_compile.controller.attention_plan import tile_shape
from li_compile.controller.calibration import Calibration, widening_ladder
from li_compile.controller.poses import bounds_from_fov, make_poses
from li_compile.controller.tile_plan import TilePlanParams, empty_tile_plan, key_keep, write_tile_plan
from li_compile.plan import Plan, SlotSignature
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence
from li_compile.worlds import hy_worldplay, trajectories
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import light_interaction_setup

OPTIONS = {"inner": "eager", "sparsity": {"block_q": 16, "block_k": 16, "max_density": 1.0}, "cache": {"enabled": False}}


def test_measured_kept_mass_equals_the_reference_softmax_without_padding():
    seq = SequenceLayout(2, 1, 4, 4, prefix_tokens=3, queries="all")
    tiled = TiledSequence(seq, tile_shape(16))
    plan = Plan()
    slot = plan.slot_for(SlotSignature(1, 2, seq.q_len, seq.kv_len, "cpu", 16, 16))
    poses = make_poses(torch.eye(3), torch.tensor([[0.0, 0.0, 0.2 * i] for i in range(3)]))
    roles, bounds = ["pad", "recent"], bounds_from_fov(60.0, 1.0)
    candidates = widening_ladder(TilePlanParams(recent_radius=0, context_queries="frame_local"), 2)
    run = CalibrationRun(candidates, target=0.9, rows=10_000)
    run.write_candidates(plan, tiled, roles, poses[:2], poses[2:], bounds)
    assert slot.is_dense  # calibration chunks run dense
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, seq.q_len, 8, generator=generator) * 2 for _ in range(2))
    real = key_keep(tiled, roles)[tiled.key_inverse]  # token order: False on the padding frame
    run.begin_graph_call("g")
    run.record(slot, q, k, real[None, None, None, :], None)

    qt, kt = q[:, :, tiled.query_perm].double(), k[:, :, tiled.key_perm].double()
    probs = torch.softmax((qt @ kt.transpose(-1, -2) / 8**0.5).masked_fill(~key_keep(tiled, roles), float("-inf")), -1)
    rows = key_keep(tiled, roles)  # padding queries are not measured
    for c, params in enumerate(candidates):
        layout = empty_tile_plan(tiled, capacity=slot.signature.kv_blocks, block_q=16, block_k=16)
        write_tile_plan(layout, tiled, roles, poses[:2], poses[2:], bounds, params)
        blocks = layout.block_mask()[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)
        visited = blocks[: seq.q_len, : seq.kv_len]
        expected = (probs * visited).sum(-1)[:, :, rows].mean((0, 2))
        torch.testing.assert_close(run.worst["g.attention0"][c], expected, rtol=1e-5, atol=1e-6)
    assert (run.worst["g.attention0"][1] >= run.worst["g.attention0"][0] - 1e-9).all()  # wider keeps more


def _run(world, trajectory, target=None, chunks=3, calibrate_chunks=2, options=OPTIONS, calibration=None):
    """A light_interaction run of ``chunks`` chunks; with ``target``, after a calibration over
    ``calibrate_chunks`` chunks; with ``calibration``, using that one. Returns (calibration scope or
    None, generation, accelerator, Dynamo frames compiled after the calibration)."""
    setup = light_interaction_setup(world, options)
    setup.warm_up()
    driver = setup.driver(trajectory)
    driver.accelerator.use_calibration(calibration)  # the fixture's model keeps its accelerator between tests
    scope = None
    if target is not None:
        with li_compile.calibrate(setup.world.model, target=target) as scope:
            generate(setup.world, trajectory, chunks=calibrate_chunks, accelerator=driver.accelerator, decode=False)
    compiled = counters["frames"]["ok"]
    generation = generate(setup.world, trajectory, chunks=chunks, accelerator=driver.accelerator, decode=False)
    return scope, generation, driver.accelerator, counters["frames"]["ok"] - compiled


@pytest.fixture(scope="module")
def world():
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=1, steps=2)
    return hy_worldplay.build(spec, seed=0)


@pytest.fixture(scope="module")
def trajectory(world):
    return trajectories.make("out_and_back", 4 * world.spec.chunk_frames, chunk_frames=world.spec.chunk_frames)


@pytest.fixture(scope="module")
def dense(world, trajectory):
    """The same run with attention left dense (sparsity off): the reference."""
    torch._dynamo.reset()
    return _run(world, trajectory, options={**OPTIONS, "sparsity": {"enabled": False}})[1].latents


def test_calibration_chunks_are_dense_and_a_full_target_changes_no_answer(world, trajectory, dense):
    torch._dynamo.reset()
    scope, calibrated, accelerator, _ = _run(world, trajectory, target=1.0)
    torch.testing.assert_close(calibrated.latents, dense, rtol=1e-5, atol=1e-5)
    assert scope.run.chunks == 2 and accelerator.calibration is scope.calibration


def test_a_looser_target_picks_sparse_plans_per_head_that_reach_it_with_no_recompile(world, trajectory):
    torch._dynamo.reset()
    scope, generation, accelerator, recompiles = _run(world, trajectory, target=0.5)
    calibration = scope.calibration
    assert recompiles == 0 and torch.isfinite(generation.latents).all()
    assert min(s.values["density"] for s in accelerator.report().chunks) < 1
    for layer in calibration.choice:
        assert (calibration.recall(layer) >= 0.5).all()
    report = str(accelerator.report())
    assert "calibrated tile plans" in report and all(layer in report for layer in calibration.choice)
    reloaded = Calibration.from_json(calibration.to_json())
    assert reloaded.head_params() == calibration.head_params() and reloaded.choice == calibration.choice


def test_heads_a_calibration_keeps_dense_visit_every_block(world, trajectory, dense):
    """A calibration that keeps every head dense: later plans visit every block (density 1 on the
    block-sparse path, max_density 1) and give dense attention's answer."""
    heads = world.spec.heads
    global_heads = Calibration(0.99, widening_ladder(TilePlanParams(), 1), {"g.attention0": torch.zeros(1, heads)},
                               {"g.attention0": [-1] * heads})
    torch._dynamo.reset()
    _, dense_heads, accelerator, _ = _run(world, trajectory, calibration=global_heads)
    assert all(s.values["density"] == 1 and s.values["plan"] == "sparse" for s in accelerator.report().chunks)
    torch.testing.assert_close(dense_heads.latents, dense, rtol=1e-5, atol=1e-5)


def test_a_calibration_without_measured_chunks_says_what_it_needs(world, trajectory):
    setup = light_interaction_setup(world, OPTIONS)
    setup.driver(trajectory)
    with pytest.raises(ValueError, match="calibration measured no attention site"):
        with li_compile.calibrate(setup.world.model, target=0.9):
            pass
    with pytest.raises(ValueError, match=r"target kept mass must be in \(0, 1\], got 1.5"):
        li_compile.calibrate(setup.world.model, target=1.5)
