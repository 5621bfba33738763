"""A diffusers video transformer as a world (``li_compile.worlds.diffusers_world``, optional
``diffusers``): padded context slots never reach the chunk's output, the world compiled with the
backend equals eager (fp32), and the example drives both upstream classes through the chunk loop
with the cache acting on revisits. Skipped when ``diffusers`` is not installed."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

import li_compile
from li_compile.module_cache import CachedCalls
from li_compile.worlds.report_tools import sharing_weights

diffusers = pytest.importorskip("diffusers")
from li_compile.worlds import diffusers_world  # noqa: E402  (needs diffusers)

FP32 = {"rtol": 1e-5, "atol": 1e-5}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_world.py"


def chunk_inputs(world, seed=0, padded=2):
    """``(x, sigma, context, context_valid)`` of one chunk with the first ``padded`` slots empty."""
    spec, gen = world.spec, torch.Generator().manual_seed(seed)
    x = torch.randn(1, spec.chunk_frames, *spec.latent_shape, generator=gen)
    context = torch.randn(1, spec.context_frames, *spec.latent_shape, generator=gen)
    valid = torch.ones(1, spec.context_frames, dtype=torch.bool)
    valid[0, :padded] = False
    return x, torch.tensor(0.6), context, valid


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("model", sorted(diffusers_world.MODELS))
def test_padded_context_slots_never_reach_the_chunk(model, copied):
    """The key mask reaches the upstream self-attention, in the world's model and in a deep copy of
    it (what ``--blocks`` runs compile: ``sharing_weights``): new content in a padded slot leaves the
    chunk's velocity unchanged; in a valid slot, or with the mask off, it changes it."""
    world = diffusers_world.build("tiny", model=model)
    denoiser = sharing_weights(world.model) if copied else world.model
    x, sigma, context, valid = chunk_inputs(world)
    other = context.clone()
    other[0, 0] += 1.0  # slot 0 is padding
    with torch.no_grad():
        out = denoiser(x, sigma, context, valid, world.text)
        assert out.shape == x.shape
        torch.testing.assert_close(out, world.model(x, sigma, context, valid, world.text), **FP32)
        torch.testing.assert_close(denoiser(x, sigma, other, valid, world.text), out, **FP32)
        assert not torch.allclose(denoiser(x, sigma, other, None, world.text),
                                  denoiser(x, sigma, context, None, world.text), **FP32)
        moved = context.clone()
        moved[0, -1] += 1.0  # the last slot holds a frame
        assert not torch.allclose(denoiser(x, sigma, moved, valid, world.text), out, **FP32)


@pytest.mark.parametrize("model", sorted(diffusers_world.MODELS))
def test_the_world_compiled_with_the_backend_equals_eager(model):
    """Compiled with light_interaction (its accelerator told the world's layout), the denoiser gives
    eager's velocity on a padded context; HunyuanVideo 1.5, whose forward breaks its graph, is called
    through the cache at its call boundary and still names its accelerator."""
    world = diffusers_world.build("tiny", model=model)
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options={"inner": "eager"},
                                                     dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    accelerator.configure(memory_k=world.spec.memory, layout=world.layout, revisit_inputs=world.revisit_inputs)
    assert isinstance(compiled.model, CachedCalls) == (model == "hunyuan_video_15")
    x, sigma, context, valid = chunk_inputs(world, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled.model(x, sigma, context, valid, world.text),
                                   world.model(x, sigma, context, valid, world.text), **FP32)
    sites = li_compile.report(compiled.model).sites
    attention = [s for s in sites if s.kind == "attention"]
    assert attention and all(s.status in ("rewritten", "skipped") and (s.status == "rewritten" or s.reason)
                             for s in attention)


def run_example(monkeypatch, tmp_path, model, options='{"inner": "eager"}'):
    import json

    out = tmp_path / f"{model}.json"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--model", model, "--chunks", "10", "--options",
                                      options, "--json", str(out)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", sorted(diffusers_world.MODELS))
def test_the_example_drives_the_upstream_class_through_the_chunk_loop(monkeypatch, tmp_path, model):
    """``examples/diffusers_world.py --model M``: 0 recompiles, memory frames pruned by the
    controller, cache hits on the loop's revisits, and chunks computed by the backend equal dense."""
    record = run_example(monkeypatch, tmp_path, model)
    assert record["world"] == "diffusers/tiny" and record["chunks"] == 10
    assert record["recompiles_after_warmup"] == 0
    assert record["memory_frames_pruned"] > 0 and record["cache_hits"] > 0
    computed = [row for row in record["per_chunk"] if row["cache_hits"] == 0]
    assert computed and min(row["psnr_db"] for row in computed) >= 40  # fp32: rounding only


def test_context_rows_are_never_reused_where_one_timestep_conditions_the_whole_sequence(monkeypatch, tmp_path):
    """Wan conditions every token, the context's included, on the chunk's timestep: under
    ``context.reuse_rows="auto"`` the probe chunk finds the context's keys changing between steps and
    nothing is reused (computed chunks equal dense); with ``True`` the probe chunk raises."""
    record = run_example(monkeypatch, tmp_path, "wan", '{"inner": "eager", "context": {"reuse_rows": "auto"}}')
    assert record["context_rows_reused"] == 0
    assert any("depend on the step" in reason for reason in record["context_rows_off"])
    computed = [row for row in record["per_chunk"] if row["cache_hits"] == 0]
    assert computed and min(row["psnr_db"] for row in computed) >= 40
    with pytest.raises(ValueError, match="reuse_rows=True: in chunk .* depend on the step"):
        run_example(monkeypatch, tmp_path, "wan", '{"inner": "eager", "context": {"reuse_rows": true}}')
