"""Calibrating a compiled model's tile plans on its own chunks (``li_compile.calibrate``).

Specifications: the kept mass measured at a site equals the fp64 softmax reference, padding rows
and keys left out; chunks inside a calibration compute exactly what dense attention does; a
calibration to keep all the mass changes no answer afterwards; a looser one makes later plans
sparse per head, with no recompilation, and the report prints the recall per layer; a saved
calibration reloads to the same plans; a calibration that cannot act on a model (its controller
writes no tile plan, or it was made for other heads, blocks, tile, depth range, lens or attention
layers) is refused, naming why.
"""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import li_compile
from li_compile.accelerator import Accelerator
from li_compile.calibrating import CalibrationRun
from li_compile.controller.attention_plan import tile_shape, write_tile_chunk_plan
from li_compile.controller.calibration import Calibration, CalibrationSetting, widening_ladder
from li_compile.controller.context import ContextController
from li_compile.controller.poses import bounds_from_fov, make_poses
from li_compile.controller.tile_plan import TilePlanParams, empty_tile_plan, key_keep, write_tile_plan
from li_compile.kernels.block_sparse_attention import launched_shapes
from li_compile.options import ContextOptions, Options, SparsityOptions
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
    setting = CalibrationSetting(16, 16, tile_shape(16), (0.1, 10.0), tuple(bounds.tolist()))
    run.write_candidates(plan, tiled, roles, poses[:2], poses[2:], bounds, setting)
    assert slot.is_dense  # calibration chunks run dense
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, seq.q_len, 8, generator=generator) * 2 for _ in range(2))
    real = key_keep(tiled, roles)[tiled.key_inverse]  # token order: False on the padding frame
    run.record("g.attention0", slot, q, k, real[None, None, None, :], None)

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
    assert run.finish().made_for == setting  # the calibration records the setting it was measured in


def _run(world, trajectory, target=None, chunks=3, calibrate_chunks=2, options=OPTIONS, calibration=None):
    """A light_interaction run of ``chunks`` chunks; with ``target``, after a calibration over
    ``calibrate_chunks`` chunks; with ``calibration``, using that one. Returns (calibration scope or
    None, generation, accelerator, Dynamo frames compiled after the calibration). The kernel call
    shapes first launched by those chunks are in ``_run.new_kernel_shapes``."""
    setup = light_interaction_setup(world, options)
    setup.warm_up()
    driver = setup.driver(trajectory)
    driver.accelerator.use_calibration(calibration)  # the fixture's model keeps its accelerator between tests
    scope = None
    if target is not None:
        with li_compile.calibrate(setup.world.model, target=target) as scope:
            generate(setup.world, trajectory, chunks=calibrate_chunks, accelerator=driver.accelerator, decode=False)
    compiled, shapes = counters["frames"]["ok"], launched_shapes()
    generation = generate(setup.world, trajectory, chunks=chunks, accelerator=driver.accelerator, decode=False)
    _run.new_kernel_shapes = launched_shapes() - shapes
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
    assert _run.new_kernel_shapes == 0  # the calibrated plans' kernel shapes were warmed up when it was applied
    assert min(s.values["density"] for s in accelerator.report().chunks) < 1
    for layer in calibration.choice:
        assert (calibration.recall(layer) >= 0.5).all()
    report = str(accelerator.report())
    assert "calibrated tile plans" in report and all(layer in report for layer in calibration.choice)
    reloaded = Calibration.from_json(calibration.to_json())
    assert reloaded.head_params() == calibration.head_params() and reloaded.choice == calibration.choice


def test_a_model_that_records_cuda_graphs_refuses_a_calibration(world, trajectory):
    """Its graphs replay the kernel routes recorded at warm-up (a chunk's span split off or not),
    which calibrated plans may change: refused at once, naming why."""
    torch._dynamo.reset()
    setup = light_interaction_setup(world, OPTIONS)
    setup.warm_up()
    accelerator = setup.driver(trajectory).accelerator
    accelerator.records_cuda_graphs = True  # as a graph compiled with mode="reduce-overhead" marks it
    heads = world.spec.heads
    calibration = Calibration(0.99, widening_ladder(TilePlanParams(), 1), {"g.attention0": torch.ones(1, heads)},
                              {"g.attention0": [0] * heads})
    try:
        with pytest.raises(ValueError, match="records CUDA graphs"):
            accelerator.use_calibration(calibration)
        with pytest.raises(ValueError, match="records CUDA graphs"):
            li_compile.calibrate(setup.world.model, target=0.9)
        accelerator.records_cuda_graphs = False  # applied first, then its graphs record: refused at warm-up
        accelerator.use_calibration(calibration)
        accelerator.records_cuda_graphs = True
        with pytest.raises(ValueError, match="records CUDA graphs"):
            setup.warm_up()
    finally:
        accelerator.records_cuda_graphs = False  # the module's world keeps its accelerator
        accelerator.use_calibration(None)


def test_a_calibration_is_applied_between_chunks_not_inside_one(world, trajectory):
    torch._dynamo.reset()
    setup = light_interaction_setup(world, OPTIONS)
    accelerator = setup.driver(trajectory).accelerator
    heads = world.spec.heads
    calibration = Calibration(0.99, widening_ladder(TilePlanParams(), 1), {"g.attention0": torch.ones(1, heads)},
                              {"g.attention0": [0] * heads})
    poses = trajectory.poses.float()
    frames = world.spec.chunk_frames
    with accelerator.chunk(0, poses[:0], poses[:frames], torch.zeros(0, *world.spec.latent_shape)):
        with pytest.raises(ValueError, match="applied between chunks, not inside chunk 0"):
            accelerator.use_calibration(calibration)
    assert accelerator.calibration is None


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
    with pytest.raises(ValueError, match="calibration measured no attention site") as refused:
        with li_compile.calibrate(setup.world.model, target=0.9):
            pass
    assert "max_density" not in str(refused.value)  # calibration measures whatever a plan's floor
    with pytest.raises(ValueError, match=r"target kept mass must be in \(0, 1\], got 1.5"):
        li_compile.calibrate(setup.world.model, target=1.5)


def test_calibrating_a_model_whose_controller_writes_no_tile_plan_is_refused_at_once_naming_why(world, trajectory):
    off = {**OPTIONS, "sparsity": {"block_q": 16, "block_k": 16}, "context": {"enabled": False, "reuse_rows": False}}
    setup = light_interaction_setup(world, off)
    accelerator = setup.driver(trajectory).accelerator
    with pytest.raises(ValueError, match=r"HYWorldPlayDiT cannot be calibrated: no chunk gets a tile plan to measure, "
                                         r"as the context controller is off \(context.enabled=False\)"):
        li_compile.calibrate(setup.world.model, target=0.9)  # before any chunk runs
    assert accelerator.calibrating is None


def _layout(capacity: int) -> SequenceLayout:
    return SequenceLayout(capacity, 1, 4, 4, prefix_tokens=3, queries="all")


def _controller(plan: Plan, sparsity: dict | None = None, context: dict | None = None, **kwargs) -> ContextController:
    """A controller of 16-token blocks over ``_layout`` with a 60 degree lens, unless ``kwargs`` say otherwise."""
    options = ContextOptions(**{"window_min": 1, "window_max": 2, "window_rule": "fixed", **(context or {})})
    sparsity = SparsityOptions(**{"block_q": 16, "block_k": 16, "max_density": 1.0, **(sparsity or {})})
    return ContextController(options, plan, sparsity=sparsity, memory_k=2, **{"layout": _layout, "fov_y_deg": 60.0, **kwargs})


def _calibration(heads: int, made_for: CalibrationSetting | None) -> Calibration:
    candidates = widening_ladder(TilePlanParams(depth_range=(0.1, 10.0)), 1)
    return Calibration(0.9, candidates, {"g.attention0": torch.ones(1, heads)}, {"g.attention0": [0] * heads}, made_for)


FITS = CalibrationSetting(16, 16, tile_shape(16), (0.1, 10.0), tuple(bounds_from_fov(60.0, 1.0).tolist()))  # _controller()'s


@pytest.mark.parametrize(
    "controller, calibration, match",
    [
        ({"fov_y_deg": None}, {}, "no lens is configured"),
        ({"sparsity": {"plan": "frames"}}, {}, "sparsity.plan is 'frames'"),
        ({"context": {"enabled": False}}, {}, r"the context controller is off"),
        ({"layout": None}, {}, "no attention layout is configured"),
        ({}, {"heads": 4}, "the calibration has plans for 4 heads, but the attention sites of .* tokens have 2 heads"),
        ({}, {"made_for": dataclasses.replace(FITS, block_q=32)}, r"another setting .*: block_q 32 vs 16"),
        ({"near": 0.5, "far": 20.0}, {}, r"another setting .*: depth_range \(0.1, 10.0\) vs \(0.5, 20.0\)"),
        ({"fov_y_deg": 90.0}, {}, r"another setting .*: bounds \(-0.57.*\) vs \(-1.0, 1.0, -1.0, 1.0\)"),
    ],
    ids=["no_lens", "frame_plans", "controller_off", "no_layout", "other_heads",
         "other_blocks", "other_depth_range", "other_lens"],
)
def test_a_calibration_that_cannot_act_on_a_model_is_refused_naming_why(controller, calibration, match):
    plan = Plan()
    plan.slot_for(SlotSignature(1, 2, _layout(4).q_len, _layout(4).kv_len, "cpu", 16, 16))  # a compiled 2-head site
    ours = _controller(plan, **controller)
    with pytest.raises(ValueError, match=match):
        ours.use_calibration(_calibration(**{"heads": 2, "made_for": FITS, **calibration}))
    assert ours.head_params is None


@pytest.mark.parametrize("change, match", [({"near": 0.5, "far": 20.0}, "depth_range"), ({"fov_y_deg": 120.0}, "bounds")],
                         ids=["depth_range", "lens"])
def test_a_reconfiguration_the_calibration_does_not_fit_raises_and_changes_nothing(change, match):
    accelerator = Accelerator(Options.from_user(OPTIONS), "m")
    accelerator.configure(memory_k=2, fov_y_deg=60.0, layout=_layout, revisit_inputs=("context",))
    calibration = Calibration(0.9, widening_ladder(TilePlanParams(depth_range=(0.1, 10.0)), 1),
                              {"m.graph1.attention0": torch.ones(1, 2)}, {"m.graph1.attention0": [0, 0]}, FITS)
    accelerator.use_calibration(calibration)
    controller = accelerator.controller
    with pytest.raises(ValueError, match=f"another setting .*: {match}"):
        accelerator.configure(**{"memory_k": 3, "fov_y_deg": 60.0, "layout": _layout, **change})
    assert accelerator.controller is controller and accelerator.revisit_inputs == {"context"}
    assert controller.head_params == calibration.head_params() and accelerator.calibration is calibration


def test_calibrated_plans_too_dense_to_pay_are_accepted_and_their_chunks_run_dense_saying_why():
    """A calibration measured on this model whose plans would run more block pairs than
    ``sparsity.max_density`` is no error (dense is what they call for): such chunks take the frame
    plan, and the reason names the calibrated plans' floor."""
    plan = Plan()
    plan.slot_for(SlotSignature(1, 2, _layout(4).q_len, _layout(4).kv_len, "cpu", 16, 16))
    controller = _controller(plan, sparsity={"max_density": 0.0})
    controller.use_calibration(_calibration(2, FITS))
    assert controller.head_params == _calibration(2, FITS).head_params()
    assert "the calibrated per-head plans at context capacity 4" in controller._frame_plan_reason(4)


def test_a_calibration_made_for_the_model_plans_every_head_and_none_goes_back_to_the_options_plan():
    plan = Plan()
    plan.slot_for(SlotSignature(1, 2, _layout(4).q_len, _layout(4).kv_len, "cpu", 16, 16))
    controller = _controller(plan)
    for made_for in (FITS, None):  # one measured on a model, and one made by hand (its heads are checked)
        controller.use_calibration(_calibration(2, made_for))
        assert controller.head_params == _calibration(2, made_for).head_params()
    controller.use_calibration(None)
    assert controller.head_params is None


def test_per_head_plans_for_another_head_count_are_refused_when_written_not_ignored():
    """A site compiled after the calibration was applied has 2 heads; plans for 4 raise when written."""
    seq = _layout(2)
    tiled = TiledSequence(seq, tile_shape(16))
    plan = Plan()
    plan.slot_for(SlotSignature(1, 2, seq.q_len, seq.kv_len, "cpu", 16, 16))
    poses = make_poses(torch.eye(3), torch.tensor([[0.0, 0.0, 0.1 * i] for i in range(3)]))
    params = TilePlanParams()
    with pytest.raises(ValueError, match="the calibration has plans for 4 heads, but the attention sites of 51 x 51 "
                                         "tokens have 2 heads"):
        write_tile_chunk_plan(plan, tiled, ["pad", "recent"], poses[:2], poses[2:], bounds_from_fov(60.0, 1.0), params,
                              SparsityOptions(max_density=1.0), head_params=(params,) * 4)


def test_calibration_measures_its_candidates_where_the_options_plan_is_too_dense_to_pay(world, trajectory):
    """Under the default ``max_density`` HY's options' plan (dense context rows) runs dense; the
    candidates (frame-local and camera context rows among them) are measured all the same."""
    torch._dynamo.reset()
    options = {**OPTIONS, "sparsity": {"block_q": 16, "block_k": 16}}
    scope = _run(world, trajectory, target=0.9, options=options, chunks=1)[0]
    assert scope.calibration is not None and scope.calibration.choice


def test_a_calibration_of_other_attention_layers_is_refused_naming_them_before_any_plan_uses_it(trajectory):
    """Measured on a depth-1 model: a model of another name refuses it when applied; a depth-2 model
    of the same class, to which it was applied before any graph ran, refuses it at the first chunk,
    before that chunk's plan is written, naming both layer counts. The same model compiled again
    (other graph numbers: compile order is no part of a model) accepts one measured either way."""
    def measure(world):
        return _run(world, trajectory, target=0.5, chunks=1, calibrate_chunks=1)[0].calibration

    shallow = hy_worldplay.build(dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=1, steps=2), seed=0)
    torch._dynamo.reset()
    measured = Calibration.from_json(measure(shallow).to_json())
    assert list(measured.choice) == ["HYWorldPlayDiT.graph1.attention0"]
    torch._dynamo.reset()
    recompiled = measure(shallow)  # the same model compiled again: its later graphs
    assert not recompiled.choice.keys() & measured.choice.keys()

    other = li_compile.accelerator(torch.compile(torch.nn.Linear(2, 2), backend="light_interaction", options=OPTIONS))
    other.configure(memory_k=2, fov_y_deg=60.0, layout=_layout)
    with pytest.raises(ValueError, match=r"measured on the layers of graphs \['HYWorldPlayDiT.graph1'\], not on Linear's"):
        other.use_calibration(measured)

    torch._dynamo.reset()
    setup = light_interaction_setup(shallow, OPTIONS)
    accelerator = setup.driver(trajectory).accelerator
    setup.warm_up()
    accelerator.use_calibration(recompiled)  # graph numbers differ from this compilation's
    generate(setup.world, trajectory, chunks=1, accelerator=accelerator, decode=False)

    deeper = hy_worldplay.build(dataclasses.replace(shallow.spec, depth=2), seed=0)
    torch._dynamo.reset()
    setup = light_interaction_setup(deeper, OPTIONS)
    accelerator = setup.driver(trajectory).accelerator
    accelerator.use_calibration(measured)  # no graph has run: its layers are not known yet
    setup.warm_up()
    with pytest.raises(ValueError, match=r"measured graphs of \[1\] attention layer\(s\) at the video layouts, and "
                                         r"this model ran graphs of \[2\] \(HYWorldPlayDiT.graph1: 2, .*another depth"):
        generate(setup.world, trajectory, chunks=1, accelerator=accelerator, decode=False)
    assert accelerator.controller.stats == []  # refused before the chunk's plan was written
    with pytest.raises(ValueError, match=r"ran graphs of \[2\] .*another depth"):
        accelerator.use_calibration(recompiled)
