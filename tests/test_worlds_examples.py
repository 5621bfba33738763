"""Specifications of the examples' shared tools: metrics, table, and one end-to-end example run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import li_compile

from li_compile.worlds import hy_worldplay, matrix_game3, report_tools, trajectories
from li_compile.worlds.fidelity import trained_truth
from li_compile.worlds.report_tools import (
    PSNR_CAP_DB, dense_setup, format_table, frame_psnr, light_interaction_setup, parse_args, psnr, run_example, ssim,
    timed_run, truth_scores,
)

JSON_KEYS = {
    "speedup", "recompiles_after_warmup", "cache_hits", "memory_frames_pruned", "attention_density_mean",
    "psnr_db_vs_dense", "min_psnr_db", "min_frame_psnr_db", "time_dense_s", "time_li_s", "chunks", "tokens_per_frame",
}


def test_psnr_is_capped_for_equal_pictures_and_exact_otherwise():
    a = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert psnr(a, a) == PSNR_CAP_DB
    assert math.isclose(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)), 20.0, rel_tol=1e-5)


def test_ssim_is_one_for_equal_pictures_and_drops_with_noise():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=gen)
    noisy = (a + 0.2 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    assert math.isclose(ssim(a, a), 1.0, rel_tol=1e-5)
    assert ssim(a, noisy) < 0.9


def test_table_has_a_header_and_one_line_per_chunk():
    row = {"chunk": 0, "dense_ms": 1.0, "light_ms": 2.0, "window": 2, "memory_kept": 3, "memory_pruned": 1,
           "density": 0.5, "cache_hits": 1, "cache_near_hits": 0, "psnr_db": 30.0, "ssim": 0.9}
    lines = format_table([row, {**row, "chunk": 1}]).splitlines()
    assert len(lines) == 3 and "PSNR" in lines[0] and lines[2].split()[0] == "1"


def test_example_writes_the_summary_json_and_pictures(tmp_path):
    summary = run_example(hy_worldplay, "loop", ["--chunks", "3", "--out", str(tmp_path), "--json", str(tmp_path / "s.json")])
    record = json.loads((tmp_path / "s.json").read_text())
    assert JSON_KEYS <= set(record) and record["chunks"] == 3 and len(record["per_chunk"]) == 3
    assert record["tokens_per_frame"] == hy_worldplay.PRESETS["tiny"].tokens_per_frame
    assert record["recompiles_after_warmup"] == 0
    assert summary["psnr_db_vs_dense"] >= 25  # same policy, same weights: the backend changes nothing visible
    for row in record["per_chunk"]:  # the worst frame of a chunk is never better than the chunk as a whole
        assert row["min_frame_psnr_db"] <= row["psnr_db"] + 1e-9
    assert record["min_frame_psnr_db"] == min(row["min_frame_psnr_db"] for row in record["per_chunk"])
    for picture in ("timeline.png", "frames.png", "block_layout.png"):
        assert (tmp_path / picture).stat().st_size > 0


def test_the_blocks_flag_compiles_only_the_blocks_and_lets_them_run_on_the_chunks_rows():
    summary = run_example(hy_worldplay, "loop", ["--chunks", "3", "--blocks", "--options",
                                                  '{"cache": {"enabled": false}, "context": {"row_blocks": true}}'])
    assert summary["row_blocks_calls"] > 0 and not summary["row_blocks_off"]
    assert summary["recompiles_after_warmup"] == 0
    assert summary["psnr_db_vs_dense"] >= 25


def test_matrix_game_runs_in_upstreams_form_by_default_and_in_its_kv_cache_form_by_the_form_flag():
    """Upstream's form re-runs the context with the chunk at every step, so its context rows are
    reused between steps; the KV-cache form's queries are the chunk's alone."""
    options = ["--options", '{"cache": {"enabled": false}}']
    for form, reused in (([], True), (["--form", "cached"], False)):
        summary = run_example(matrix_game3, "loop", ["--chunks", "3", *form, *options])
        assert (summary["context_rows_reused"] > 0) == reused and summary["recompiles_after_warmup"] == 0
        assert summary["psnr_db_vs_dense"] >= 25
    with pytest.raises(SystemExit):  # a world without forms has no --form
        parse_args("x", "loop", ["--form", "full"])


def test_the_preset_flag_offers_each_worlds_own_presets():
    """``--preset trained`` exists for the HY-WorldPlay-style world only (the one with trained weights)."""

    assert parse_args("x", "loop", ["--preset", "trained"], hy_worldplay.PRESET_NAMES).preset == "trained"
    with pytest.raises(SystemExit):
        parse_args("x", "loop", ["--preset", "trained"], matrix_game3.PRESET_NAMES)


def test_the_options_flag_takes_backend_options_as_json_and_rejects_bad_ones(capsys):
    args = parse_args("x", "loop", ["--options", '{"sparsity": {"density": 0.5}}'])
    assert args.options == {"sparsity": {"density": 0.5}}
    assert parse_args("x", "loop", []).options == {}
    for bad, why in (("{not json", "not JSON"), ("[1]", "JSON object"), ('{"context": {"keep": 1}}', "context.keep")):
        with pytest.raises(SystemExit):
            parse_args("x", "loop", ["--options", bad])
        assert why in capsys.readouterr().err


TRUTH_KEYS = {"psnr_db_dense_vs_truth", "psnr_db_li_vs_truth", "psnr_db_repeat_last_vs_truth", "ssim_dense_vs_truth",
              "ssim_li_vs_truth"}


def test_trained_runs_start_from_the_true_first_chunk_and_score_generated_frames_against_truth():
    world = hy_worldplay.build("trained")
    f = world.spec.chunk_frames
    trajectory = trajectories.make("loop", 2 * f, seed=0, chunk_frames=f)
    truth, prefix = trained_truth(world, trajectory, seed=0)
    torch.testing.assert_close(world.decode(prefix), truth[:f], atol=1e-6, rtol=0)
    run = timed_run(dense_setup(world), trajectory, 2, 0, prefix)
    torch.testing.assert_close(run.generation.latents[:f], prefix, atol=1e-5, rtol=0)
    scores = truth_scores(run.generation, run.generation, truth)
    assert set(scores) == TRUTH_KEYS
    assert scores["psnr_db_dense_vs_truth"] == scores["psnr_db_li_vs_truth"]
    assert scores["psnr_db_dense_vs_truth"] == pytest.approx(frame_psnr(run.generation.frames[f:], truth[f:2 * f]))
    repeat = truth[f - 1].expand(f, -1, -1, -1)
    assert scores["psnr_db_repeat_last_vs_truth"] == pytest.approx(frame_psnr(repeat, truth[f:2 * f]))


def test_trained_example_reports_fidelity_against_ground_truth(tmp_path):
    args = ["--preset", "trained", "--chunks", "2", "--json", str(tmp_path / "s.json")]
    # what is scored, not how it compiles or selects: eager, one context capacity (one graph to trace)
    run_example(hy_worldplay, "loop", args + ["--options", '{"inner": "eager", "context": {"enabled": false}}'])
    record = json.loads((tmp_path / "s.json").read_text())
    assert JSON_KEYS | TRUTH_KEYS <= set(record) and record["recompiles_after_warmup"] == 0
    assert all(math.isfinite(record[k]) for k in TRUTH_KEYS)


def test_the_cuda_harness_runs_blocks_on_the_chunks_rows_with_full_contexts_unmasked(monkeypatch):
    """The GPU benchmark's ``--blocks --ablations all_row_blocks`` route (full contexts unmasked,
    forced here): warm-up compiles every graph the blocks need on the chunk's rows (no recompile in
    the timed run), the unmasked full context's call, which the probe chunk never saw, passes its
    check and runs on the chunk's rows, and the frames equal the attention-only reuse's."""
    monkeypatch.setattr(report_tools, "full_context_masked", lambda world: False)
    world = hy_worldplay.build("tiny", seed=0)
    f = world.spec.chunk_frames
    trajectory = trajectories.make("random_walk_with_returns", 8 * f, seed=0, chunk_frames=f)
    options = {"inner": "eager", "cache": {"enabled": False}}
    attention_only = timed_run(light_interaction_setup(world, options, blocks=True), trajectory, 8, 0)
    rows = timed_run(light_interaction_setup(world, {**options, "context": {"row_blocks": True}}, blocks=True),
                     trajectory, 8, 0)
    assert rows.recompiles == 0 and not any(s["row_blocks_off"] for s in rows.stats)
    assert rows.stats[-1]["row_blocks_calls"] > 0  # the last chunks' context is full: unmasked
    torch.testing.assert_close(rows.generation.latents, attention_only.generation.latents, rtol=1e-5, atol=1e-5)


def test_the_cuda_harness_runs_full_contexts_unmasked_with_every_graph_warmed_up(monkeypatch):
    """On CUDA (``full_context_masked`` False; forced here) a light_interaction run has one graph per
    capacity bucket and one more, unmasked, for a full context at the largest bucket: warm-up
    compiles exactly those (no recompile in the timed run) and the run raises a recompile limit
    lower than that (else Dynamo would run the model eagerly: no cache hit), the denoising cache
    still hits, and the frames equal the masked run's."""
    from torch._dynamo.utils import counters

    world = hy_worldplay.build("tiny", seed=0)  # Matrix-Game's encoder path: tests/test_worlds.py (mask_full)
    f = world.spec.chunk_frames
    trajectory = trajectories.make("loop", 10 * f, seed=0, chunk_frames=f)
    options = {"inner": "eager"}
    setup = light_interaction_setup(world, options)
    frames = [counters["frames"]["ok"]]
    masked = timed_run(setup, trajectory, 10, 0)
    frames.append(counters["frames"]["ok"])
    monkeypatch.setattr(report_tools, "full_context_masked", lambda world: False)
    with torch._dynamo.config.patch(recompile_limit=2):
        unmasked = timed_run(light_interaction_setup(world, options), trajectory, 10, 0)
    frames.append(counters["frames"]["ok"])
    buckets = li_compile.accelerator(setup.world.model).controller.warm_up_buckets()
    assert len(buckets) > 1 and frames[1] - frames[0] == len(buckets)  # one graph per bucket ...
    assert frames[2] - frames[1] == 1  # ... and the unmasked one, at the largest bucket only
    assert unmasked.recompiles == 0 and unmasked.kernel_autotunes == 0
    hits = [[s["cache_hits"] for s in run.stats] for run in (masked, unmasked)]
    assert hits[0] == hits[1] and sum(hits[1]) > 0
    torch.testing.assert_close(unmasked.generation.latents, masked.generation.latents, rtol=1e-5, atol=1e-5)


def test_the_benchmark_names_a_commit_whose_files_were_changed_as_such(tmp_path, monkeypatch):
    """A copied working tree whose git history is older than its files (the device machine's) must
    not be reported as the commit its history ends at."""
    import subprocess

    from benchmarks.end_to_end import _commit

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LI_COMMIT", raising=False)
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _commit() == head
    (tmp_path / "f.py").write_text("a = 2\n")
    assert _commit() == f"{head}+changes"
    monkeypatch.setenv("LI_COMMIT", "abc1234")
    assert _commit() == "abc1234"


def test_the_flops_projections_count_a_block_as_attention_plus_its_row_wise_layers():
    """``benchmarks/context_reuse_projection.py``'s block (``4 N^2 D`` attention, ``(8 + 4 r) N D^2``
    linear layers, ``4 N T D + 4 N D^2`` cross-attention) and ``benchmarks/matrix_game_forms.py``'s
    chunks: a chunk of hits only costs one step in three, the full form's dense chunk more than the
    KV-cache form's (its context runs at every step, attending to the chunk too)."""
    from benchmarks.context_reuse_projection import Dims, block_flops, miss_cost
    from benchmarks.matrix_game_forms import MG_FULL, dense_chunk_flops, projected

    dims = Dims(tokens=4, width=8, text=2, chunk=1, steps=3, mlp_ratio=4.0, heads=1, head_dim=8, depth=1)
    n, d = 12, 8
    assert block_flops(dims, n, n) == 4 * n * n * d + 24 * n * d * d + 4 * n * 2 * d + 4 * n * d * d
    assert block_flops(dims, 4, n) < block_flops(dims, 4, n, n) < block_flops(dims, n, n)  # fewer rows, fewer FLOPs
    assert projected(32, 32, False) == pytest.approx(MG_FULL.steps)
    assert projected(0, 32, True) == pytest.approx(1 / miss_cost(matrix_game3.PRESETS["full"].context_frames, True,
                                                                 MG_FULL))
    assert 1 < dense_chunk_flops("full") / dense_chunk_flops("cached") < 2
