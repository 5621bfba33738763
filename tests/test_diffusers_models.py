"""Real upstream video transformers (diffusers, optional) through the whole backend, at tiny random
configs of our own on the CPU: every self-attention call is rewritten or reported with its reason,
every attention call of a forward ran in the backend's graphs (``li_compile.audit``), and the output
equals eager, also with every rewritten site forced through the block-sparse kernel at full density
(interpreter, fp32). Skipped when ``diffusers`` is not installed (``pip install -e ".[diffusers]"``)."""

import pytest
import torch

import li_compile
from li_compile.kernels.block_layout import BlockLayout
from li_compile.plan import find_slot

diffusers = pytest.importorskip("diffusers")

FP32 = {"rtol": 1e-5, "atol": 1e-5}
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan():
    return diffusers.WanTransformer3DModel(**TINY_WAN), dict(
        hidden_states=randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]),
        encoder_hidden_states=randn(1, 8, 32, seed=1))


def skyreels_v2_diffusion_forcing():  # one timestep per latent frame
    return diffusers.SkyReelsV2Transformer3DModel(**TINY_WAN), dict(
        hidden_states=randn(1, 4, 3, 8, 8), timestep=torch.tensor([[900.0, 500.0, 100.0]]),
        encoder_hidden_states=randn(1, 8, 32, seed=1), enable_diffusion_forcing=True)


def hunyuan_video():
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
        guidance_embeds=False)
    return model, dict(hidden_states=randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                       encoder_hidden_states=randn(1, 8, 32, seed=1), encoder_attention_mask=torch.ones(1, 8),
                       pooled_projections=randn(1, 16, seed=2))


def hunyuan_video_15():  # HY-WorldPlay's base model
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
        text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v")
    return model, dict(hidden_states=randn(1, 9, 3, 8, 8), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=randn(1, 8, 32, seed=1), encoder_attention_mask=torch.ones(1, 8),
                       encoder_hidden_states_2=randn(1, 6, 24, seed=2), encoder_attention_mask_2=torch.ones(1, 6),
                       image_embeds=torch.zeros(1, 4, 16))


def cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=8)
    return model, dict(hidden_states=randn(1, 3, 4, 8, 8), encoder_hidden_states=randn(1, 8, 32, seed=1),
                       timestep=torch.tensor([500]))


def ltx_video():
    model = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                                 attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                                 caption_channels=32)
    return model, dict(hidden_states=randn(1, 48, 8), encoder_hidden_states=randn(1, 8, 32, seed=1),
                       timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 8), num_frames=3, height=4,
                       width=4)


MODELS = {f.__name__: f for f in (wan, skyreels_v2_diffusion_forcing, hunyuan_video, hunyuan_video_15, cogvideox,
                                   ltx_video)}


def force_full_density(compiled) -> int:
    """Every rewritten site's plan slot visits every key block: the block-sparse kernel runs them all.
    Returns how many slots were set."""
    slots = {s.detail["slot"] for s in li_compile.report(compiled).sites if s.kind == "attention"
             and s.status == "rewritten"}
    for slot in map(find_slot, slots):
        s = slot.signature
        everything = torch.ones(1, 1, s.q_blocks, s.kv_blocks, dtype=torch.bool)
        slot.set_layout(BlockLayout.from_block_mask(everything, block_q=s.block_q, block_k=s.block_k, q_len=s.q_len,
                                                    kv_len=s.kv_len))
    return len(slots)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_diffusers_video_transformer_runs_through_the_backend_exactly(name, sparse_calls):
    model, inputs = MODELS[name]()
    model = model.eval()
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, dynamic=False)
        torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], expected, **FP32)
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert any(s.status == "rewritten" for s in sites)
    assert all(s.status == "rewritten" or s.reason for s in sites)
    assert not li_compile.audit(compiled, **inputs, return_dict=False).unaccelerated
    assert force_full_density(compiled) and not sparse_calls
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], expected, **FP32)
    rewritten = [find_slot(s.detail["slot"]) for s in sites if s.status == "rewritten"]
    assert set(sparse_calls) == {slot.signature.kv_len for slot in rewritten}  # every site ran the kernel
    assert not any(slot.fallbacks for slot in rewritten)


def test_hunyuan_video_15_graph_breaks_keep_the_cache_at_its_call_boundary():
    """Graph breaks in HunyuanVideo 1.5's forward leave no graph that is the model call (its sampler
    site is skipped); ``li_compile.cached`` around the call serves a revisit's first step without
    running the model: the served output is the one stored on the first visit. The model's input
    stacks the noisy latent with conditioning channels, so the compiled call takes them apart."""
    from li_compile.controller.poses import look_at

    model, inputs = hunyuan_video_15()
    model.eval()
    condition, text = inputs["hidden_states"][:, 4:], inputs["encoder_hidden_states"]

    def denoise(latents, timestep, condition, text):
        return model(torch.cat([latents, condition], 1), timestep, text, inputs["encoder_attention_mask"],
                     encoder_hidden_states_2=inputs["encoder_hidden_states_2"],
                     encoder_attention_mask_2=inputs["encoder_attention_mask_2"], image_embeds=inputs["image_embeds"],
                     return_dict=False)

    options = {"inner": "eager", "cache": {"reuse_steps": 1, "stored": "raw"}}
    compiled = torch.compile(denoise, backend="light_interaction", options=options, dynamic=False)
    with pytest.raises(ValueError, match="weights=model"):
        li_compile.cached(compiled, latent="latents", timestep="timestep")  # a function: whose weights?
    dit = li_compile.cached(compiled, latent="latents", timestep="timestep", weights=model)
    runtime = li_compile.accelerator(compiled).denoise
    eye = torch.tensor([[0.01 * f, 0.0, 0.0] for f in range(3)])  # one camera per latent frame
    cameras = look_at(eye, eye + torch.tensor([0.0, 0.0, 5.0]))
    served = []
    for chunk in range(2):
        runtime.begin_chunk(chunk, cameras, None)
        with torch.no_grad():
            served.append(dit(randn(1, 4, 3, 8, 8, seed=chunk), inputs["timestep"], condition, text))
            dit(randn(1, 4, 3, 8, 8, seed=chunk), inputs["timestep"], condition, text)  # the last step computes
        stats = runtime.end_chunk().values
    assert stats["cache"] == "hit" and stats["steps_reused"] == 1 and stats["steps_computed"] == 1
    assert isinstance(served[1], tuple) and torch.equal(served[1][0], served[0][0])
    report = li_compile.report(compiled)
    sampler = [s for s in report.sites if s.kind == "sampler"]
    assert sampler and all(s.status == "skipped" for s in sampler)
    assert "call boundary: li_compile.cached(latent='latents'" in str(report)  # the report says what serves it
