"""The ``trained_ar`` world (issue 18): a block-causal HY-WorldPlay-style DiT that runs with the context
re-processed at every step (``form="full"``) or from a per-chunk KV cache (``form="cached"``), and
the verified loading of trained weights. CPU, fp32, random initial weights (no trained file needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import li_compile
from li_compile.worlds import hy_worldplay, trajectories
from li_compile.worlds.hy_worldplay import block_causal_mask
from li_compile.worlds.pipeline import generate
from li_compile.worlds.trained import (
    TRAINED_AR_SPEC, load_trained, load_trained_ar, load_weights, sha256_of, untrained,
)
from training.recipe import export_weights

# the trained_ar preset shrunk in space and depth for the CPU; block-causal, PRoPE, 12 context frames as shipped
SMALL = dataclasses.replace(TRAINED_AR_SPEC, name="trained_ar/test", latent_h=8, latent_w=8, depth=2, heads=2)


def _chunk_inputs(spec, valid):
    """Random inputs of one model call in the full form: ``(x, sigma, kwargs)``."""
    g = torch.Generator().manual_seed(0)
    slots, chunk = spec.context_frames, spec.chunk_frames
    return torch.randn(1, chunk, *spec.latent_shape, generator=g), torch.tensor(0.7), {
        "context": torch.randn(1, slots, *spec.latent_shape, generator=g),
        "context_valid": valid,
        "camera": torch.randn(1, slots + chunk, 12, generator=g) * 0.3,
        "actions": torch.randn(1, slots + chunk, 6, generator=g),
        "text": torch.randn(1, spec.text_tokens, spec.text_dim, generator=g),
    }


def test_the_preset_meets_the_issue_sizes_and_its_weights_fit_in_20_mb():
    spec = TRAINED_AR_SPEC
    assert spec.tokens_per_frame >= 16 * 16 and spec.chunk_frames == 4 and spec.context_frames >= 12
    assert spec.head_dim >= 32 and spec.prope_unit is not None and spec.block_causal
    params = sum(p.numel() for p in untrained(spec, form="full").model.parameters())
    assert 2 * params <= 20e6  # stored as float16


@pytest.mark.parametrize("valid", [None, "some_padding", "all_padding"])
def test_one_call_gives_the_same_velocity_in_both_forms(valid):
    slots = SMALL.context_frames
    mask = {None: None, "some_padding": torch.arange(slots)[None] >= 3, "all_padding": torch.zeros(1, slots, dtype=torch.bool)}[valid]
    x, sigma, inputs = _chunk_inputs(SMALL, mask)
    dit = untrained(SMALL, form="full").model
    full = dit(x, sigma, **inputs)
    cached = dit.forward_via_cache(x, sigma, **inputs)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_generation_gives_the_same_frames_in_both_forms():
    trajectory = trajectories.make("loop", 5 * SMALL.chunk_frames)
    full = generate(untrained(SMALL, form="full"), trajectory, decode=False)
    cached = generate(untrained(SMALL, form="cached"), trajectory, decode=False)
    assert len(cached.selections[-1].frames) == SMALL.context_frames  # a full context: 8 recent + 4 memory
    torch.testing.assert_close(cached.latents, full.latents, rtol=1e-5, atol=1e-5)


def test_context_tokens_never_attend_to_the_chunk():
    valid = torch.tensor([[False, True, True]])
    mask = block_causal_mask(valid, batch=1, slots=3, chunk=2, tokens_per_frame=4, device=torch.device("cpu"))
    frames = mask[0, 0, ::4, ::4]  # one token per frame: (query frame, key frame)
    assert not frames[:3, 3:].any()  # context queries, chunk keys
    assert frames[3:].tolist() == [[False, True, True, True, True]] * 2  # chunk: valid context and the chunk
    assert frames[:3, :3].tolist() == [[False, True, True]] * 3


def test_the_chunk_changes_nothing_the_context_computes():
    """Block-causal: the KV cache depends on the context alone, whatever the chunk holds."""
    x, sigma, inputs = _chunk_inputs(SMALL, None)
    dit = untrained(SMALL, form="full").model
    slots = SMALL.context_frames
    kv = dit.encode_context(inputs["context"], None, inputs["camera"][:, :slots], inputs["actions"][:, :slots], inputs["text"])
    assert kv.shape == (SMALL.depth, 2, 1, SMALL.heads, slots * SMALL.tokens_per_frame, SMALL.head_dim)
    other = dit.forward_cached(torch.randn_like(x), sigma, kv, None, inputs["camera"][:, slots:],
                               inputs["actions"][:, slots:], inputs["text"])
    assert not torch.allclose(other, dit(x, sigma, **inputs))  # the chunk matters to the chunk ...
    torch.testing.assert_close(dit.forward_cached(x, sigma, kv, None, inputs["camera"][:, slots:],
                                                  inputs["actions"][:, slots:], inputs["text"]),
                               dit(x, sigma, **inputs), rtol=1e-5, atol=1e-5)  # ... and the cache is reusable


def test_a_bidirectional_world_has_no_cached_form():
    with pytest.raises(ValueError, match="block_causal=True"):
        hy_worldplay.build("tiny", form="cached")
    with pytest.raises(ValueError, match="form must be one of"):
        untrained(SMALL, form="kv")


@pytest.mark.parametrize("form, modules", [("full", ("model",)), ("cached", ("model", "encoder"))])
def test_the_backend_rewrites_the_self_attention_of_both_forms(form, modules):
    world = untrained(dataclasses.replace(SMALL, window=2, memory=2), form=form)
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options={"inner": "eager"}))
    trajectory = trajectories.make("loop", 2 * world.spec.chunk_frames)
    with torch.no_grad():
        torch.testing.assert_close(generate(compiled, trajectory, decode=False).latents,
                                   generate(world, trajectory, decode=False).latents, rtol=1e-4, atol=1e-5)
    for name in modules:
        sites = [s for s in li_compile.report(getattr(compiled, name)).sites if s.kind == "attention"]
        rewritten = [s for s in sites if s.status == "rewritten"]
        assert len(rewritten) >= world.spec.depth, f"{name}: {[(s.status, s.reason) for s in sites]}"
        if name == "model" and form == "cached":  # chunk queries over cached context plus chunk keys
            tokens = world.spec.tokens_per_frame
            shapes = {s.detail["shape"][2:] for s in rewritten}
            assert (world.spec.chunk_frames * tokens, world.layout().context_frames * tokens
                    + world.spec.chunk_frames * tokens) in shapes


def _exported(tmp_path, spec=SMALL):
    path = tmp_path / "w.pt"
    export_weights(untrained(spec, form="full").model.state_dict(), path)
    return path


def test_trained_weights_load_in_either_form_and_verify_their_hash(tmp_path):
    path = _exported(tmp_path)
    world = load_trained(path=path, spec=SMALL, sha256=sha256_of(path))
    assert isinstance(world, hy_worldplay.HYWorldPlayCached) and world.spec.block_causal
    full = load_trained(path=path, spec=SMALL, form="full")
    trajectory = trajectories.make("loop", 3 * SMALL.chunk_frames)
    torch.testing.assert_close(generate(world, trajectory).frames, generate(full, trajectory).frames)


def test_weights_with_another_hash_are_refused(tmp_path):
    path = _exported(tmp_path)
    with pytest.raises(ValueError, match=f"expected {'0' * 64}"):
        load_weights(path, sha256="0" * 64)


def test_non_finite_weights_are_refused(tmp_path):
    weights = untrained(SMALL, form="full").model.state_dict()
    weights["patch_in.weight"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="non-finite.*patch_in.weight"):
        load_weights(tmp_path / "nan.pt")


def test_shipped_weights_need_a_recorded_hash(tmp_path, monkeypatch):
    from li_compile.worlds import trained

    path = _exported(tmp_path)
    monkeypatch.setattr(trained, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(trained, "CHECKSUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(ValueError, match="no SHA-256 record"):
        load_weights(path)
    (tmp_path / "SHA256SUMS").write_text(f"{sha256_of(path)}  w.pt\n")
    assert load_weights(path).keys() == untrained(SMALL, form="full").model.state_dict().keys()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_weights(path)


def test_missing_trained_ar_weights_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="training/run_trained_ar.sh"):
        load_trained_ar(path=tmp_path / "hy_trained_ar.pt")
