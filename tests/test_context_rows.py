"""Context rows reused between denoising steps (``context.reuse_rows``, ``li_compile.context_rows``).

Specifications: inside a chunk, the first computed step and the last step compute every query row,
and the steps between compute only the rows that are not context frames (dense, with the site's own
mask), taking the context rows from that call's first computed step; nothing is reused outside a
chunk, without the step or the step count, for causal sites or other shapes. Through the backend,
a block-causal model gives exactly what it gives without reuse (it is the KV-cache form), and a
bidirectional one gives what the eager model gives with its context's hidden states frozen at each
chunk's first step.
"""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import li_compile
from benchmarks.context_reuse_fidelity import ContextReuse  # the eager emulation: block outputs' context rows frozen
from li_compile.context_rows import ContextRowReuse, RowCut, context_rows, put_back, without
from li_compile import row_blocks
from li_compile.row_blocks import RowBlocks, context_part, cut_tensor
from li_compile.sequence import SequenceLayout
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import sharing_weights

LAYOUT = SequenceLayout(context_frames=3, chunk_frames=1, grid_h=2, grid_w=2, prefix_tokens=2, suffix_tokens=1)
ROWS = (2, 14)  # the context frames' query rows: after 2 prefix tokens, 3 frames of 4 tokens
HEADS, KV_HEADS, DIM = 4, 2, 8


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():  # the reuse is for inference: a call that needs a gradient computes every row
        yield


def _qkv(seed: int, call: int = 0):
    """One call's q, k, v: random, but the context rows' keys and values are those of ``call`` (a
    model recomputes them alike at every step, from the frozen context)."""
    g = torch.Generator().manual_seed(seed)
    n, (a, b) = LAYOUT.kv_len, ROWS
    q, k, v = (torch.randn(1, HEADS, n, DIM, generator=g), torch.randn(1, KV_HEADS, n, DIM, generator=g),
               torch.randn(1, KV_HEADS, n, DIM, generator=g))
    g = torch.Generator().manual_seed(1000 + call)
    k[:, :, a:b], v[:, :, a:b] = torch.randn(2, 1, KV_HEADS, b - a, DIM, generator=g)
    return q, k, v


def _dense(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _unprobed(**kwargs) -> ContextRowReuse:
    """A model's reuse state before its first chunk, on ``LAYOUT`` (``kwargs``: ``ContextRowReuse``'s)."""
    reuse = ContextRowReuse(**kwargs)
    reuse.set_layouts([LAYOUT])
    return reuse


def _reuse(steps: int | None = 4) -> ContextRowReuse:
    """A model's reuse state after its probe chunk found the context's keys step-independent."""
    reuse = _unprobed()
    reuse.verdict = True
    reuse.begin_chunk(1, steps)
    return reuse


def _probe_chunk(reuse: ContextRowReuse, step_dependent: bool, guided_steps: int = 0) -> list[int]:
    """Run one 4-step chunk of two layers through ``reuse``; the first layer's context keys change
    with the step where ``step_dependent``, and the first ``guided_steps`` steps call each layer
    twice (guidance as a second call). Returns the steps whose calls computed every row."""
    computed = []
    reuse.begin_chunk(0, 4)
    for step in range(4):
        reuse.set_step(step)
        for layer in [0, 0, 1, 1] if step < guided_steps else [0, 1]:
            q, k, v = _qkv(10 * step + layer, call=10 * step * step_dependent + layer)
            assert reuse.applies(q, k, is_causal=False)
            reuse.attend(q, k, v, None, None, lambda: computed.append(step) or _dense(q, k, v))
    return sorted(set(computed))


def test_context_rows_are_the_context_frames_of_a_full_sequence_only():
    assert context_rows(LAYOUT) == ROWS
    assert context_rows(dataclasses.replace(LAYOUT, queries="chunk")) is None
    assert context_rows(dataclasses.replace(LAYOUT, context_frames=0)) is None


def test_the_first_and_last_steps_compute_every_row_and_the_steps_between_reuse_the_context_rows():
    reuse = _reuse(steps=4)
    a, b = ROWS
    mask = torch.rand(1, 1, LAYOUT.q_len, LAYOUT.kv_len, generator=torch.Generator().manual_seed(9)) > 0.3
    mask[..., -1] = True  # every row sees a key
    computed, first = [], {}
    for step in range(4):
        reuse.set_step(step)
        for layer in range(2):
            q, k, v = _qkv(10 * step + layer, call=layer)
            assert reuse.applies(q, k, is_causal=False)
            out = reuse.attend(q, k, v, mask, None, lambda: computed.append((step, layer)) or _dense(q, k, v, mask))
            full = _dense(q, k, v, mask)
            if step in (0, 3):
                torch.testing.assert_close(out, full, rtol=0, atol=0)
                first.setdefault(layer, out)
            else:
                torch.testing.assert_close(out[:, :, a:b], first[layer][:, :, a:b], rtol=0, atol=0)
                torch.testing.assert_close(out[:, :, :a], full[:, :, :a], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(out[:, :, b:], full[:, :, b:], rtol=1e-5, atol=1e-6)
    assert computed == [(0, 0), (0, 1), (3, 0), (3, 1)]
    reuse.end_chunk()
    assert reuse.history[-1].values["context_rows_reused"] == 4


def test_a_chunk_whose_first_steps_were_served_computes_in_full_at_its_first_computed_step():
    reuse = _reuse(steps=4)  # step 0 served by the denoising cache: no call
    calls = []
    for step in (1, 2, 3):
        reuse.set_step(step)
        q, k, v = _qkv(step)
        reuse.attend(q, k, v, None, None, lambda: calls.append(step) or _dense(q, k, v))
    assert calls == [1, 3]


@pytest.mark.parametrize("case", ["outside a chunk", "no step told", "step count unknown", "causal", "other shape",
                                  "after the chunk"])
def test_nothing_is_reused_where_the_steps_or_the_rows_are_unknown(case):
    reuse = _unprobed()
    q, k, _ = _qkv(0)
    if case != "outside a chunk":
        reuse.begin_chunk(0, None if case == "step count unknown" else 4)
    if case not in ("outside a chunk", "no step told"):
        reuse.set_step(1)
    if case == "other shape":
        q, k = q[:, :, :-1], k[:, :, :-1]
    if case == "after the chunk":
        reuse.end_chunk()
    assert not reuse.applies(q, k, is_causal=case == "causal")


@pytest.mark.parametrize("required", [False, True])
def test_a_call_whose_context_keys_differ_from_the_keepers_is_reported_when_the_chunk_ends(required):
    """Keys that differ from the kept call's (the calls changed order, or a layer changes the context
    rows with the step past the probe's first layer) raise when the chunk ends; under ``"auto"``
    reuse is then off for the model, so the next chunk computes every row."""
    reuse = _reuse(steps=4)
    reuse.required = required
    reuse.set_step(0)
    for call in (0, 1):  # e.g. guided and unguided calls
        q, k, v = _qkv(call, call=call)
        reuse.attend(q, k, v, None, None, lambda: _dense(q, k, v))
    reuse.set_step(1)
    q, k, v = _qkv(5, call=1)  # the first call of the step is the second call of step 0
    reuse.attend(q, k, v, None, None, lambda: _dense(q, k, v))
    with pytest.raises(RuntimeError, match="chunk 1, .* the context's keys of a later attention call differed"):
        reuse.end_chunk()
    assert not reuse._kept
    assert reuse.verdict is (True if required else False)
    reuse.begin_chunk(2, 4)
    reuse.set_step(1)
    assert reuse.applies(q, k, is_causal=False) is required
    if not required:
        assert "differed from those of the step that kept them" in reuse.history[-1].values["context_rows_off"]
        reuse.reset()  # the drift is the model's: a reset does not turn reuse back on, as the error said
        assert reuse.verdict is False


def test_a_models_first_chunk_computes_every_row_and_finds_its_context_keys_repeat_between_steps():
    reuse = _unprobed()
    assert _probe_chunk(reuse, step_dependent=False) == [0, 1, 2, 3]
    reuse.end_chunk()
    assert reuse.verdict is True
    assert "probe chunk" in reuse.history[-1].values["context_rows_off"]
    assert _probe_chunk(reuse, step_dependent=False) == [0, 3]  # the next chunk reuses


def test_a_model_whose_context_keys_follow_the_step_is_never_reused_under_auto():
    reuse = _unprobed()
    reuse.blocks = RowBlocks(reuse)  # context.row_blocks on as well: it says why it does nothing
    assert _probe_chunk(reuse, step_dependent=True) == [0, 1, 2, 3]
    reuse.end_chunk()
    assert reuse.verdict is False
    assert "context rows are not reused" in reuse.history[-1].values["row_blocks_off"]
    reuse.begin_chunk(1, 4)
    reuse.set_step(1)
    q, k, _ = _qkv(0)
    assert not reuse.applies(q, k, is_causal=False)
    reuse.end_chunk()
    assert "depend on the step" in reuse.history[-1].values["context_rows_off"]


def test_a_model_that_calls_more_often_on_some_steps_is_never_reused():
    reuse = _unprobed()
    assert _probe_chunk(reuse, step_dependent=False, guided_steps=2) == [0, 1, 2, 3]
    reuse.end_chunk()
    assert reuse.verdict is False
    reuse.begin_chunk(1, 4)
    reuse.set_step(1)
    reuse.end_chunk()
    assert "guidance on some steps only" in reuse.history[-1].values["context_rows_off"]
    required = _unprobed(required=True)
    _probe_chunk(required, step_dependent=False, guided_steps=2)
    with pytest.raises(ValueError, match="different numbers of attention calls"):
        required.end_chunk()


def test_a_model_whose_context_keys_follow_the_step_raises_where_reuse_was_required():
    reuse = _unprobed(required=True)
    _probe_chunk(reuse, step_dependent=True)
    with pytest.raises(ValueError, match=r"reuse_rows=True: in chunk 0 \(its rows all computed\) .*depend on the step"):
        reuse.end_chunk()


def test_nothing_is_reused_in_a_chunk_where_the_denoising_cache_matched_a_call():
    matched = [False]
    reuse = _unprobed(matched=lambda: matched[0])
    reuse.begin_chunk(0, 4)
    reuse.set_step(1)
    q, k, _ = _qkv(0)
    assert reuse.applies(q, k, is_causal=False)
    matched[0] = True
    assert not reuse.applies(q, k, is_causal=False)


@pytest.mark.parametrize("steps, told, reason", [(None, True, "sigmas were not given"),
                                                  (4, False, "never called chunk.step"),
                                                  (4, True, "no layout was configured")])
def test_a_chunk_that_cannot_reuse_says_why_in_its_statistics(steps, told, reason):
    reuse = _reuse(steps=steps)
    if reason == "no layout was configured":
        reuse.set_layouts([])
    if told:
        reuse.set_step(0)
    reuse.end_chunk()
    assert reason in reuse.history[-1].values["context_rows_off"]


@pytest.mark.parametrize("required", [False, True])
def test_a_kv_cache_layout_is_named_only_where_reuse_was_required(required):
    reuse = _unprobed(required=required)
    reuse.set_layouts([dataclasses.replace(LAYOUT, queries="chunk")])
    reuse.begin_chunk(1, 4)
    reuse.set_step(0)
    reuse.end_chunk()
    said = reuse.history[-1].values.get("context_rows_off", "")
    assert ("no context rows (a KV-cache model" in said) == required


def test_the_option_warns_when_the_model_has_no_context_rows_to_reuse():
    accelerator = li_compile.Accelerator(li_compile.Options.from_user({"context": {"reuse_rows": True}}), "m")
    with pytest.warns(UserWarning, match="reuse_rows has nothing to act on"):
        accelerator.configure(layout=lambda capacity: dataclasses.replace(LAYOUT, context_frames=capacity,
                                                                          queries="chunk"))
    blocks = li_compile.Accelerator(li_compile.Options.from_user({"context": {"row_blocks": True}}), "m")
    with pytest.warns(UserWarning, match="option context.row_blocks has nothing to act on"):
        blocks.configure(layout=lambda capacity: dataclasses.replace(LAYOUT, context_frames=capacity, queries="chunk"))


def test_auto_is_the_default_reuses_where_it_can_and_says_nothing_where_it_cannot():
    auto = li_compile.Accelerator(li_compile.Options.from_user({}), "m")
    assert auto.context_rows is not None and not auto.context_rows.required
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.configure(layout=lambda capacity: dataclasses.replace(LAYOUT, context_frames=capacity, queries="chunk"))
    for off in ({"context": {"reuse_rows": False}}, {"context": {"reuse_rows": "auto", "enabled": False}},
                {"context": {"reuse_rows": "auto"}, "sparsity": {"enabled": False}}):
        assert li_compile.Accelerator(li_compile.Options.from_user(off), "m").context_rows is None, off


def test_a_chunk_whose_steps_end_short_of_its_sigmas_decides_nothing_as_the_probe():
    """Its step numbering raises when it ends (the denoising cache's error, not the probe's), and as
    any chunk that raised it decides nothing: the next chunk probes again."""
    from li_compile.worlds.pipeline import chunk_noise, gather_context, sampler_update

    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=2, steps=4)
    world = hy_worldplay.build(spec, form="full")
    trajectory = trajectories.make("loop", 4 * spec.chunk_frames)
    options = {"inner": "eager", "sparsity": {"block_q": 16, "block_k": 16}, "context": {"keep_threshold": 0.0}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    accelerator.configure(memory_k=spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                          layout=world.layout)
    sigmas, frames, poses = spec.sigmas().float(), spec.chunk_frames, trajectory.poses.float()
    history = torch.zeros(2 * frames, *spec.latent_shape)
    with pytest.raises(ValueError, match="its last step told is 2, but its sigmas give 4 steps"):
        with accelerator.chunk(0, poses[:0], poses[:frames], history[:0], sigmas) as scope:
            context = gather_context(history[:0], poses[:0], scope.selection, scope.capacity, True)
            inputs = compiled.inputs(context, poses[:frames], trajectory.actions()[:frames], 0)
            noise = chunk_noise(compiled, 0, 0)
            x = noise[0]
            for step, told in enumerate([0, 1, 2, None]):  # the last step not told
                if told is not None:
                    scope.step(told)
                x = sampler_update(spec.sampler, x, compiled.model(x, sigmas[step], **inputs), sigmas[step],
                                   sigmas[step + 1], noise[step + 1])
    assert accelerator.context_rows.verdict is None
    assert accelerator.context_rows.history[-1].values["context_rows_off"].startswith("the probe chunk raised")


def test_the_kept_rows_are_released_when_the_chunk_ends():
    reuse = _reuse(steps=3)
    reuse.set_step(0)
    q, k, v = _qkv(0)
    reuse.attend(q, k, v, None, None, lambda: _dense(q, k, v))
    assert reuse._kept
    reuse.end_chunk()
    assert not reuse._kept
    assert reuse.history[-1].values["context_rows_kept_gb"] == HEADS * (ROWS[1] - ROWS[0]) * DIM * 4 / 1e9


# --- through the backend ---------------------------------------------------------------------------

OPTIONS = {"inner": "eager", "cache": {"enabled": False}, "sparsity": {"block_q": 16, "block_k": 16},
           "context": {"keep_threshold": 0.0}}


def _world(**spec_changes):
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=2, steps=4, **spec_changes)
    return hy_worldplay.build(spec, form="full")


def _backend_run(world, trajectory, chunks: int, reuse_rows: bool, row_blocks: bool = False):
    options = {**OPTIONS, "context": {**OPTIONS["context"], "reuse_rows": reuse_rows, "row_blocks": row_blocks}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options,
                                                     fullgraph=True, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    accelerator.configure(memory_k=world.spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                          layout=world.layout)
    gen = generate(compiled, trajectory, chunks=chunks, accelerator=accelerator, decode=False)
    torch._dynamo.reset()
    return gen, accelerator


def test_a_block_causal_model_gives_what_it_gives_without_reuse():
    world = _world(block_causal=True)
    trajectory = trajectories.make("random_walk_with_returns", 5 * world.spec.chunk_frames)
    plain, _ = _backend_run(world, trajectory, 5, reuse_rows=False)
    reused, accelerator = _backend_run(world, trajectory, 5, reuse_rows=True)
    torch.testing.assert_close(reused.latents, plain.latents, rtol=1e-5, atol=1e-5)
    assert sum(c.values.get("context_rows_reused", 0) for c in accelerator.report().chunks) > 0


class _Replay:
    """A context policy that selects what a past run selected, chunk by chunk."""

    def __init__(self, selections):
        self.selections = selections

    def select(self, chunk, poses, chunk_poses, latents):
        return self.selections[chunk]


def _sharpened(world, gain: float = 6.0):
    """``world`` with its blocks' projections and modulation scaled by ``gain``: at initialisation
    the context barely reads the chunk (freezing it moves the result by about 1e-5); scaled, it
    moves it by about 1e-2, far beyond the tolerance the comparisons use."""
    with torch.no_grad():
        for block in world.model.blocks:
            block.qkv.weight.mul_(gain)
            block.mod.weight.mul_(gain)
            block.mod.bias.mul_(gain)
    return world


def test_a_bidirectional_model_runs_as_with_its_context_frozen_at_the_first_step():
    world = _sharpened(_world())
    chunks = 4
    trajectory = trajectories.make("random_walk_with_returns", chunks * world.spec.chunk_frames)
    reused, accelerator = _backend_run(world, trajectory, chunks, reuse_rows=True)
    plain = generate(world, trajectory, _Replay(reused.selections), chunks, decode=False)
    stats = accelerator.report().chunks
    probe = next(c.chunk for c in stats if "probe chunk" in c.values.get("context_rows_off", ""))
    assert probe < chunks - 1
    frozen_context = ContextReuse(world.model, world.spec.tokens_per_frame, full_steps=None)
    frozen_steps = frozen_context.step_hook(lambda chunk, step, call: call())

    def step_hook(chunk, step, call):  # chunks up to the probe chunk compute every row
        frozen_context.full_steps = None if chunk <= probe else (0, world.spec.steps - 1)
        return frozen_steps(chunk, step, call)

    frozen = generate(world, trajectory, _Replay(reused.selections), chunks, decode=False, step_hook=step_hook)
    torch.testing.assert_close(reused.latents, frozen.latents, rtol=1e-5, atol=1e-5)
    assert (reused.latents - plain.latents).abs().max() > 1e-3  # the approximation is real here


def test_matrix_game_in_upstreams_form_runs_as_with_its_context_frozen_at_the_first_step():
    """Matrix-Game's full form (upstream's: context and chunk in one sequence at every step) is
    bidirectional as HY's is: its context rows are reused between steps, and the frames equal the
    eager model's with the context's hidden states frozen at each chunk's first step (3 steps: the
    middle one reuses)."""
    spec = dataclasses.replace(matrix_game3.PRESETS["tiny"], depth=2, steps=3)
    world = matrix_game3.build(spec, form="full")
    with torch.no_grad():  # sharpened, so that freezing the context moves the frames (see _sharpened)
        for block in world.model.module.blocks:
            for weight in (block.q.weight, block.k.weight, block.v.weight, block.modulation):
                weight.mul_(6.0)
    chunks = 4
    trajectory = trajectories.make("random_walk_with_returns", chunks * spec.chunk_frames)
    reused, accelerator = _backend_run(world, trajectory, chunks, reuse_rows=True)
    stats = accelerator.report().chunks
    assert sum(c.values.get("context_rows_reused", 0) for c in stats) > 0
    probe = next(c.chunk for c in stats if "probe chunk" in c.values.get("context_rows_off", ""))
    assert probe < chunks - 1
    frozen_context = ContextReuse(world.model, spec.tokens_per_frame, full_steps=None)
    frozen_steps = frozen_context.step_hook(lambda chunk, step, call: call())

    def step_hook(chunk, step, call):
        frozen_context.full_steps = None if chunk <= probe else (0, spec.steps - 1)
        return frozen_steps(chunk, step, call)

    frozen = generate(world, trajectory, _Replay(reused.selections), chunks, decode=False, step_hook=step_hook)
    plain = generate(world, trajectory, _Replay(reused.selections), chunks, decode=False)
    torch.testing.assert_close(reused.latents, frozen.latents, rtol=1e-5, atol=1e-5)
    assert (reused.latents - plain.latents).abs().max() > 1e-3  # the approximation is real here


# --- blocks on the chunk's rows alone (context.row_blocks) -----------------------------------------


def _blocks_run(world, trajectory, chunks: int, row_blocks: bool, step_hook=None, mask_full: bool = True):
    """``world`` with only its blocks compiled (``compile_repeated_blocks``), context rows reused;
    ``mask_full=False``: a full context without its key mask (as on CUDA), one more graph per block."""
    options = {**OPTIONS, "context": {**OPTIONS["context"], "reuse_rows": True, "row_blocks": row_blocks}}
    model = li_compile.compile_repeated_blocks(sharing_weights(world.model), options, dynamic=False, min_blocks=2)
    compiled = world.with_model(model, li_compile.cached(model, latent="x", timestep="sigma"))
    accelerator = li_compile.accelerator(model)
    accelerator.configure(memory_k=world.spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                          layout=world.layout)
    try:
        gen = generate(compiled, trajectory, chunks=chunks, accelerator=accelerator, decode=False,
                       step_hook=step_hook, mask_full=mask_full)
    finally:
        torch._dynamo.reset()
    return gen, [c.values for c in accelerator.report().chunks]


def test_blocks_on_the_chunks_rows_alone_give_what_attention_only_reuse_gives():
    world = _sharpened(_world())
    trajectory = trajectories.make("random_walk_with_returns", 4 * world.spec.chunk_frames)
    attention_only, _ = _blocks_run(world, trajectory, 4, row_blocks=False)
    rows_alone, stats = _blocks_run(world, trajectory, 4, row_blocks=True)
    torch.testing.assert_close(rows_alone.latents, attention_only.latents, rtol=1e-5, atol=1e-5)
    assert sum(s.get("row_blocks_calls", 0) for s in stats) > 0
    assert not any("row_blocks_off" in s for s in stats)


def test_a_step_that_calls_the_model_twice_runs_both_calls_on_the_chunks_rows():
    world = _sharpened(_world())
    trajectory = trajectories.make("random_walk_with_returns", 4 * world.spec.chunk_frames)
    twice = lambda chunk, step, call: 0.5 * (call() + 2 * call())  # noqa: E731 - two calls per step, as guidance
    attention_only, _ = _blocks_run(world, trajectory, 3, row_blocks=False, step_hook=twice)
    rows_alone, stats = _blocks_run(world, trajectory, 3, row_blocks=True, step_hook=twice)
    torch.testing.assert_close(rows_alone.latents, attention_only.latents, rtol=1e-5, atol=1e-5)
    assert sum(s.get("row_blocks_calls", 0) for s in stats) > 0
    assert not any("row_blocks_off" in s for s in stats)


def _position_bias(module, args, out):
    """Adds each row's position in the block's own sequence: row-wise at one length, but a block run on
    fewer rows gives the chunk's rows other positions."""
    rows = out[0].shape[1]
    return (out[0] + torch.arange(rows, dtype=out[0].dtype)[None, :, None] / rows, *out[1:])


def test_a_block_that_reads_positions_from_its_own_length_keeps_attention_only_reuse():
    world = _sharpened(_world())
    for block in world.model.blocks:  # traced into each compiled block
        block.register_forward_hook(_position_bias)
    trajectory = trajectories.make("random_walk_with_returns", 4 * world.spec.chunk_frames)
    attention_only, _ = _blocks_run(world, trajectory, 4, row_blocks=False)
    refused, stats = _blocks_run(world, trajectory, 4, row_blocks=True)
    torch.testing.assert_close(refused.latents, attention_only.latents, rtol=1e-5, atol=1e-5)
    assert sum(s.get("row_blocks_calls", 0) for s in stats) == 0
    assert any("other values than the whole block" in s.get("row_blocks_off", "") for s in stats)


def _one_graph_short(world, trajectory, chunks: int):
    """Dynamo's recompile limit one graph below what a row_blocks run with full contexts unmasked
    compiles (counted in such a run), as a context manager."""
    before = counters["frames"]["ok"]
    _blocks_run(world, trajectory, chunks, row_blocks=True, mask_full=False)
    return torch._dynamo.config.patch(recompile_limit=counters["frames"]["ok"] - before - 1)


def test_a_call_on_the_chunks_rows_past_dynamos_recompile_limit_turns_the_option_off_not_eager():
    """Past ``recompile_limit`` Dynamo runs a call eagerly, and a block run eagerly on the chunk's rows
    would attend to the chunk's keys alone (0.01 off here, silently). The run's last new graph is
    the full context's unmasked call on the chunk's rows, which the probe chunk never saw: with
    the limit one graph short, that call is checked when its chunk first computes it, fails to
    compile instead of running eagerly, and the blocks run whole from then on, the reason naming
    the limit; every frame equals the attention-only reuse's (unscaled weights: reuse moves
    nothing beyond 1e-5 here)."""
    world = _world()
    trajectory = trajectories.make("random_walk_with_returns", 8 * world.spec.chunk_frames)
    attention_only, _ = _blocks_run(world, trajectory, 8, row_blocks=False, mask_full=False)
    with _one_graph_short(world, trajectory, 8):
        limited, stats = _blocks_run(world, trajectory, 8, row_blocks=True, mask_full=False)
    torch.testing.assert_close(limited.latents, attention_only.latents, rtol=1e-4, atol=1e-4)
    assert sum(s.get("row_blocks_calls", 0) for s in stats) > 0  # on until the full context came
    assert any("recompile_limit" in s.get("row_blocks_off", "") for s in stats)


def test_a_call_first_compiled_at_a_reused_step_past_the_limit_raises_naming_it(monkeypatch):
    """Inputs that the check cannot tell apart (every signature equal here) leave the unmasked call's
    first compile to a reused step; one graph short of the limit, that step raises, naming it."""
    monkeypatch.setattr(row_blocks, "_signature", lambda value: ())
    world = _world()
    trajectory = trajectories.make("random_walk_with_returns", 8 * world.spec.chunk_frames)
    with _one_graph_short(world, trajectory, 8), pytest.raises(
            RuntimeError, match="context.row_blocks: the block's code reached Dynamo's recompile_limit"):
        _blocks_run(world, trajectory, 8, row_blocks=True, mask_full=False)


def test_row_blocks_on_a_kv_cache_model_says_that_it_has_no_context_rows():
    world = hy_worldplay.build(dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=2, steps=4, block_causal=True),
                               form="cached")
    trajectory = trajectories.make("random_walk_with_returns", 2 * world.spec.chunk_frames)
    with pytest.warns(UserWarning, match="context.row_blocks have nothing to act on"):
        _, stats = _blocks_run(world, trajectory, 2, row_blocks=True)
    assert all("has no context rows" in s.get("row_blocks_off", "") for s in stats)


def test_row_blocks_needs_the_context_rows_reused():
    with pytest.raises(ValueError, match="context.row_blocks.*needs context.reuse_rows True or \"auto\", got False"):
        li_compile.Options.from_user({"context": {"row_blocks": True, "reuse_rows": False}})


def test_row_blocks_on_a_whole_model_graph_says_that_it_needs_the_blocks_compiled():
    world = _world(block_causal=True)
    trajectory = trajectories.make("random_walk_with_returns", 3 * world.spec.chunk_frames)
    _, accelerator = _backend_run(world, trajectory, 3, reuse_rows=True, row_blocks=True)
    stats = [c.values for c in accelerator.report().chunks]
    assert any("needs: the context rows' attention alone is reused" in s.get("row_blocks_off", "") for s in stats)
    assert sum(s.get("context_rows_reused", 0) for s in stats) > 0


def _sliced_call_with_a_mask_its_kept_call_had_not(checking: bool) -> ContextRowReuse:
    """A chunk whose first step keeps a call's context keys with no mask; at the next step a block
    call on the chunk's rows alone (``checking``: only compared with the whole block's) brings a key mask."""
    reuse = _reuse(steps=4)
    reuse.keep_kv = True
    reuse.set_step(0)
    q, k, v = _qkv(0)
    reuse.attend(q, k, v, None, None, lambda: _dense(q, k, v))
    reuse.set_step(1)
    cut = RowCut(length=LAYOUT.kv_len, start=ROWS[0], stop=ROWS[1], frames=LAYOUT.frames,
                 context_frames=LAYOUT.context_frames)
    sliced = [without(t, 2, *ROWS) for t in _qkv(1)]
    mask = torch.ones(1, 1, cut.sliced_length, cut.sliced_length, dtype=torch.bool)
    reuse.slicing, reuse.checking = cut, checking
    reuse.attend(*sliced, mask, None, lambda: pytest.fail("a sliced call never computes the site's route"))
    reuse.slicing, reuse.checking = None, False
    return reuse


def test_a_sliced_call_with_a_key_mask_its_kept_call_had_not_loses_the_chunk_unless_only_checked():
    """Run for real, such a call's output is wrong: the chunk is lost (``end_chunk`` raises). Only
    checked, the comparison with the whole block fails instead, and the chunk is fine."""
    _sliced_call_with_a_mask_its_kept_call_had_not(checking=True).end_chunk()
    with pytest.raises(RuntimeError, match="has a key mask its kept call had not"):
        _sliced_call_with_a_mask_its_kept_call_had_not(checking=False).end_chunk()


def test_a_tensor_cut_to_the_chunks_rows_and_given_its_context_back_is_unchanged():
    cut = RowCut(length=LAYOUT.kv_len, start=ROWS[0], stop=ROWS[1], frames=LAYOUT.frames,
                 context_frames=LAYOUT.context_frames)
    for shape, dim in (((2, LAYOUT.kv_len, 8), 1), ((2, 3, LAYOUT.kv_len, 8), 2), ((2, LAYOUT.frames, 8), 1)):
        t = torch.randn(shape)
        part = context_part(t, cut)
        cut_t = cut_tensor(t, cut)
        assert part[0] == dim and cut_t.is_contiguous()
        assert cut_t.shape[dim] == (cut.sliced_length if part[1] == "rows" else LAYOUT.chunk_frames)
        at = cut.start if part[1] == "rows" else 0
        assert torch.equal(put_back(cut_t, dim, at, part[2]), t)
    assert cut_tensor(torch.randn(2, 5, 8), cut).shape == (2, 5, 8)  # no context in it: unchanged


def test_a_block_calls_signature_tells_apart_what_dynamo_compiles_apart():
    """A call whose inputs differ only in strides or in needing a gradient compiles a graph of its
    own, so a check must see it before a reused step runs it."""
    x = torch.randn(2, 6, 4)
    base = row_blocks._signature(((x,), {"scale": 2}))
    assert row_blocks._signature(((x.clone(),), {"scale": 2})) == base
    assert row_blocks._signature(((x.transpose(0, 1).contiguous().transpose(0, 1),), {"scale": 2})) != base
    assert row_blocks._signature(((x.clone().requires_grad_(),), {"scale": 2})) != base
    assert row_blocks._signature(((x,), {"scale": 3})) != base
    assert row_blocks._signature(((x.half(),), {"scale": 2})) != base


@pytest.mark.parametrize("required", [False, True])
def test_an_interrupted_probe_chunk_decides_nothing_and_raises_nothing(required):
    """A probe chunk stopped part-way (Ctrl-C, out of memory) has an incomplete step: the next chunk
    probes again, and the user's exception is the one that propagates."""
    reuse = _unprobed(required=required)
    reuse.begin_chunk(0, 4)
    for step in range(3):  # stopped during step 2, after one of its two layers
        reuse.set_step(step)
        for layer in [0, 1] if step < 2 else [0]:
            q, k, v = _qkv(10 * step + layer, call=layer)
            reuse.attend(q, k, v, None, None, lambda: _dense(q, k, v))
    reuse.end_chunk(failed=True)
    assert reuse.verdict is None and "probes again" in reuse.history[-1].values["context_rows_off"]
    _probe_chunk(reuse, step_dependent=False)
    reuse.end_chunk()
    assert reuse.verdict is True
