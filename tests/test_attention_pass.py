"""The attention pass: every spelling of attention is rewritten to li::planned_attention and still
matches eager; softmaxes that are not attention, cross-attention and gradient-needing sites are
left alone with a reason; the rewrite adds no graph break and no recompilation."""

import functools
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import li_compile
from li_compile.backend import light_interaction
from li_compile.plan import find_slot

B, H, HKV, LQ, LK, D = 2, 4, 2, 6, 10, 8
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, LQ, LK, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row: there softmax gives NaN and SDPA zeros
    return {
        "q": torch.randn(B, H, LQ, D, generator=g),
        "k": torch.randn(B, H, LK, D, generator=g),
        "v": torch.randn(B, H, LK, D, generator=g),
        "k_gqa": torch.randn(B, HKV, LK, D, generator=g),
        "v_gqa": torch.randn(B, HKV, LK, D, generator=g),
        "bias": torch.randn(LQ, LK, generator=g),
        "keep": keep,
    }


def sites(compiled):
    """Attention sites of the latest compilation (a function compiled in several tests keeps them all)."""
    return [s for s in li_compile.report(compiled).compilations[-1].sites if s.kind == "attention"]


def compile_eager(fn, **kw):
    return torch.compile(fn, backend="light_interaction", options={"inner": "eager"}, **kw)


def scores_softmax_values(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def flat(x):
    return x.reshape(-1, *x.shape[-2:])


# Each spelling computes attention over the inputs() tensors; all must be rewritten.
SPELLINGS = {
    "sdpa": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
    "sdpa_bool_mask": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["keep"]),
    "sdpa_float_mask_and_scale": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["bias"], scale=0.3),
    "sdpa_causal": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True),
    "sdpa_gqa": lambda t: F.scaled_dot_product_attention(t["q"], t["k_gqa"], t["v_gqa"], enable_gqa=True),
    "sdpa_blhd_transposed": lambda t: F.scaled_dot_product_attention(
        *(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (t["q"], t["k"], t["v"]))
    ).transpose(1, 2),
    "sdpa_3d_heads_in_batch": lambda t: F.scaled_dot_product_attention(flat(t["q"]), flat(t["k"]), flat(t["v"])),
    "sdpa_kv_cache_cat": lambda t: F.scaled_dot_product_attention(
        t["q"], torch.cat([t["k"], t["q"]], dim=2), torch.cat([t["v"], t["q"]], dim=2)
    ),
    "matmul_div_scores": lambda t: scores_softmax_values(t["q"], t["k"], t["v"]),
    "matmul_scale_q": lambda t: ((t["q"] * D**-0.5) @ t["k"].mT).softmax(-1) @ t["v"],
    "matmul_scale_k_operator_mul": lambda t: torch.matmul(
        t["q"], (0.25 * t["k"]).transpose(-1, -2)
    ).softmax(dim=-1).matmul(t["v"]),
    "fp32_softmax_cast_back": lambda t: F.softmax(
        (t["q"].half() @ t["k"].half().transpose(-2, -1)).float() * 0.3 + t["bias"].half(), dim=-1, dtype=torch.float32
    ).to(torch.float16) @ t["v"].half(),
    "einsum_bhld": lambda t: torch.einsum(
        "bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", t["q"], t["k"]).mul(0.3).softmax(-1), t["v"]
    ),
    "einsum_blhd": lambda t: torch.einsum(
        "bhij,bjhd->bihd",
        torch.einsum("bihd,bjhd->bhij", t["q"].transpose(1, 2), t["k"].transpose(1, 2)).div(3.0).softmax(-1),
        t["v"].transpose(1, 2),
    ),
    "einsum_ellipsis": lambda t: torch.einsum(
        "...ij,...jd->...id", torch.einsum("...id,...jd->...ij", t["q"], t["k"]).softmax(-1), t["v"]
    ),
    "bmm_heads_in_batch": lambda t: torch.bmm(
        torch.softmax(torch.bmm(flat(t["q"]), flat(t["k"]).transpose(1, 2)) * 0.3, dim=-1), flat(t["v"])
    ).reshape(B, H, LQ, D),
    "baddbmm_with_mask": lambda t: torch.bmm(
        torch.baddbmm(t["bias"].expand(B * H, LQ, LK), flat(t["q"]), flat(t["k"]).mT, alpha=0.3).softmax(-1),
        flat(t["v"]),
    ),
    "baddbmm_beta_zero": lambda t: torch.bmm(
        torch.baddbmm(torch.empty(B * H, LQ, LK), flat(t["q"]), flat(t["k"]).mT, beta=0.0, alpha=0.3).softmax(-1),
        flat(t["v"]),
    ),
    "masked_fill_minus_inf": lambda t: (
        (t["q"] @ t["k"].mT * 0.3).masked_fill(~t["keep"], float("-inf")).softmax(-1) @ t["v"]
    ),
    "where_minus_inf": lambda t: torch.where(t["keep"], t["q"] @ t["k"].mT, float("-inf")).softmax(-1) @ t["v"],
    "bool_and_additive_masks": lambda t: (
        (t["q"] @ t["k"].mT + t["bias"]).masked_fill(t["keep"].logical_not(), float("-inf")).softmax(-1) @ t["v"]
    ),
    "gqa_repeat_interleave": lambda t: scores_softmax_values(
        t["q"], t["k_gqa"].repeat_interleave(H // HKV, dim=1), t["v_gqa"].repeat_interleave(H // HKV, dim=1)
    ),
    "gqa_expand_reshape": lambda t: scores_softmax_values(
        t["q"], *(x[:, :, None].expand(B, HKV, H // HKV, LK, D).reshape(B, H, LK, D) for x in (t["k_gqa"], t["v_gqa"]))
    ),
    "mqa_broadcast_heads": lambda t: scores_softmax_values(t["q"], t["k"][:, :1], t["v"][:, :1]),
    "values_transposed": lambda t: (t["v"].mT @ (t["q"] @ t["k"].mT).softmax(-1).mT).mT,
    "dropout_in_eval": lambda t: F.dropout((t["q"] @ t["k"].mT).softmax(-1), p=0.1, training=False) @ t["v"],
}


def inplace_spelling(t):
    scores = t["q"] @ t["k"].transpose(-2, -1)
    scores *= 0.3
    scores += t["bias"]
    return scores.softmax(dim=-1) @ t["v"]


SPELLINGS["in_place_scale_and_mask"] = inplace_spelling


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_of_attention_is_rewritten_and_matches_eager(name):
    fn, t = SPELLINGS[name], inputs()
    compiled = compile_eager(fn, fullgraph=True)
    with torch.no_grad():
        expected, got = fn(t), compiled(t)
    tol = {"rtol": 1e-2, "atol": 1e-3} if expected.dtype == torch.float16 else FP32
    torch.testing.assert_close(got, expected, **tol)
    assert [(s.status, s.reason) for s in sites(compiled)] == [("rewritten", "")]


@pytest.mark.parametrize("name", ["sdpa_gqa", "gqa_repeat_interleave", "mqa_broadcast_heads", "sdpa"])
def test_shared_key_value_heads_reach_the_op_unrepeated(name):
    compiled = compile_eager(SPELLINGS[name])
    with torch.no_grad():
        compiled(inputs())
    (site,) = sites(compiled)
    assert site.detail["kv_heads"] == {"sdpa": H, "mqa_broadcast_heads": 1}.get(name, HKV)


def softmax_over_queries(t):
    s = t["q"] @ t["q"].mT  # (.., LQ, LQ): the wrong axis also fits the shapes
    return s.softmax(dim=-2) @ t["q"]


def weights_also_returned(t):
    p = (t["q"] @ t["k"].mT).softmax(-1)
    return p @ t["v"], p


NOT_ATTENTION = {
    "softmax_over_the_query_axis": (softmax_over_queries, "sums"),
    "contraction_over_the_query_axis": (lambda t: (t["q"] @ t["q"].mT).softmax(-1).mT @ t["q"], "sums"),
    "softmax_feeding_a_reduction": (lambda t: (t["q"] @ t["k"].mT).softmax(-1).sum(-1), "not a contraction with values"),
    "softmax_of_a_projection": (lambda t: t["q"].softmax(-1) @ t["q"].mT, "not from a contraction"),
    "weights_used_twice": (weights_also_returned, "users"),
    "finite_masked_fill": (
        lambda t: (t["q"] @ t["k"].mT).masked_fill(~t["keep"], -1e9).softmax(-1) @ t["v"],
        "finite value",
    ),
    "scaled_after_the_mask": (lambda t: ((t["q"] @ t["k"].mT + t["bias"]) * 0.3).softmax(-1) @ t["v"], "after a mask"),
    "sdpa_with_dropout": (lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], dropout_p=0.5), "dropout_p"),
    "scores_added_to_themselves": (lambda t: (lambda s: (s + s).softmax(-1) @ t["v"])(t["q"] @ t["k"].mT), "themselves"),
}


@pytest.mark.parametrize("name", sorted(NOT_ATTENTION))
def test_softmax_graphs_that_are_not_attention_are_left_alone_with_a_reason(name):
    fn, reason = NOT_ATTENTION[name]
    t = inputs()
    compiled = compile_eager(fn)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = fn(t)
        torch.manual_seed(0)
        got = compiled(t)
    torch.testing.assert_close(got, expected, **FP32)
    found = sites(compiled)
    assert found and all(s.status == "skipped" for s in found)
    assert any(reason in s.reason for s in found), [s.reason for s in found]


@torch.library.custom_op("li_test::write_cache", mutates_args=("cache",))
def write_cache(cache: torch.Tensor, new: torch.Tensor) -> None:
    """A fused KV-cache write, as a custom op that declares what it mutates."""
    cache[:, :, : new.shape[2]].copy_(new)


class CacheWrittenMidSite(torch.nn.Module):
    """Scores against a key (or value) cache buffer, the cache written in place, then the values."""

    def __init__(self, written: str, write: str, keys_t: str = "mT") -> None:
        super().__init__()
        self.written, self.write, self.keys_t = written, write, keys_t
        self.register_buffer("keys", torch.randn(B, H, LK, D))
        self.register_buffer("values", torch.randn(B, H, LK, D))

    def forward(self, q, new):
        keys_t = self.keys.mT if self.keys_t == "mT" else self.keys.swapaxes(-2, -1)
        p = (q @ keys_t * D**-0.5).softmax(-1)
        cache = getattr(self, self.written)
        if self.write == "index_copy_":
            cache.index_copy_(2, torch.arange(2), new)
        elif self.write == "setitem":
            cache[:, :, :2] = new
        elif self.write == "setitem through a swapaxes view":
            cache.swapaxes(-2, -1)[..., :2] = new.swapaxes(-2, -1)
        elif self.write == "mul_ through detach":
            cache.detach().mul_(3.0)
        else:
            write_cache(cache, new)
        return p @ self.values


@pytest.mark.parametrize("keys_t", ["mT", "swapaxes"])
@pytest.mark.parametrize("write", ["index_copy_", "setitem", "setitem through a swapaxes view", "mul_ through detach",
                                   "a mutating custom op"])
@pytest.mark.parametrize("written, status", [("keys", "skipped"), ("values", "rewritten")])
def test_a_cache_written_in_place_between_the_scores_and_the_values_is_read_as_eager_reads_it(written, write, keys_t,
                                                                                             status):
    """The rewritten site runs whole at its output: a write to what the scores read (through any
    view, by any in-place spelling or an op whose schema mutates), made before the output, keeps the
    site as written (the reason names the write); a write to the values only, which eager also reads
    after it, is rewritten."""
    eager, model = CacheWrittenMidSite(written, write, keys_t), CacheWrittenMidSite(written, write, keys_t)
    model.load_state_dict(eager.state_dict())
    compiled = compile_eager(model)
    q, new = torch.randn(B, H, LQ, D), 10 * torch.randn(B, H, 2, D)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, new), eager(q, new), **FP32)
    (site,) = sites(compiled)
    assert site.status == status
    assert status == "rewritten" or "in place between the scores and the output" in site.reason


class RMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope(x, angles):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class DiTBlock(torch.nn.Module):
    """Self-attention over (cache + chunk) with q/k RMSNorm and RoPE, then cross-attention to text."""

    def __init__(self, width=32, heads=4, text_width=16):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = RMSNorm(width // heads), RMSNorm(width // heads)
        self.cross_q = torch.nn.Linear(width, width)
        self.cross_kv = torch.nn.Linear(text_width, 2 * width)
        self.out = torch.nn.Linear(width, width)

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, W) -> (B, H, L, W/H)

    def forward(self, x, cache_k, cache_v, text, angles):
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = rope(self.q_norm(q), angles), rope(self.k_norm(k), angles)
        k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        tk, tv = (self.split(t) for t in self.cross_kv(text).chunk(2, dim=-1))
        scores = self.split(self.cross_q(x)) @ tk.mT / math.sqrt(tk.shape[-1])
        return x + (scores.softmax(-1) @ tv).transpose(1, 2).flatten(2)


def dit_inputs(width=32, heads=4, chunk=6, cached=5):
    g = torch.Generator().manual_seed(1)
    head_dim = width // heads
    return (
        torch.randn(1, chunk, width, generator=g),
        torch.randn(1, heads, cached, head_dim, generator=g),
        torch.randn(1, heads, cached, head_dim, generator=g),
        torch.randn(1, 3, 16, generator=g),
        torch.randn(chunk, head_dim // 2, generator=g),
    )


def test_self_attention_with_cache_norm_and_rope_is_rewritten_cross_attention_left_dense():
    torch.manual_seed(0)
    block, args = DiTBlock().eval(), dit_inputs()
    compiled = compile_eager(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), block(*args), **FP32)
    self_site, cross_site = sites(compiled)
    assert self_site.status == "rewritten" and self_site.detail["shape"] == (1, 4, 6, 11)
    assert cross_site.status == "skipped" and cross_site.reason.startswith("cross-attention")
    assert "left dense" in cross_site.reason and "test_attention_pass.py" in cross_site.location


class ContextAttention(torch.nn.Module):
    """The chunk ``x`` attends to keys and values projected from ``kv_from(context, x)``."""

    def __init__(self, kv_from, width=32, heads=4):
        super().__init__()
        self.kv_from, self.heads = kv_from, heads
        self.norm = torch.nn.LayerNorm(width)
        self.shift = torch.nn.Parameter(torch.randn(width))  # broadcast over tokens: not a token stream
        self.positions = torch.nn.Parameter(torch.randn(1, 16, width))  # one per context and chunk token
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, context):
        kv = self.kv_from(self, context, x)
        return F.scaled_dot_product_attention(self.split(self.q(self.norm(x) + self.shift)), self.split(self.k(kv)),
                                              self.split(self.v(kv)))


def the_site_of(block, *args):
    """``block`` compiled (eager inner, one graph) equals it run eagerly on ``args`` (fp32); its one site."""
    compiled = compile_eager(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), block(*args), **FP32)
    (site,) = sites(compiled)
    return site


KEY_STREAMS = {  # where the keys come from -> whether the site is self-attention over the chunk
    "context_and_chunk_concatenated_before_the_projection": (lambda m, context, x: torch.cat([context, x], 1), True),
    "the_chunk_before_the_queries_norm": (lambda m, context, x: x, True),
    "the_chunk_shifted_and_cast": (lambda m, context, x: (x + m.shift).float(), True),
    "context_tokens_shifted_as_the_queries_are": (lambda m, context, x: m.norm(context) + m.shift, False),
    "context_and_chunk_with_positions_added_after": (lambda m, context, x: torch.cat([context, x], 1) + m.positions, True),
    "the_chunk_cast_like_the_context": (lambda m, context, x: context[:, :6].to(x), False),
}


class MixedQueries(torch.nn.Module):
    """Queries that mix in the keys' stream (``x + other``, or ``cat([other, x])``) over keys of ``other``."""

    def __init__(self, mix, width=32, heads=4):
        super().__init__()
        self.mix, self.heads = mix, heads
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, other):
        q_in = x + other if self.mix == "add" else torch.cat([other, x], 1)
        return F.scaled_dot_product_attention(self.split(self.q(q_in)), self.split(self.k(other)), self.split(self.v(other)))


@pytest.mark.parametrize("mix", ["add", "cat"])
def test_queries_that_mix_in_the_keys_stream_are_still_cross_attention(mix):
    g = torch.Generator().manual_seed(0)
    site = the_site_of(MixedQueries(mix).eval(), torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g))
    assert site.status == "skipped" and site.reason.startswith("cross-attention")


@pytest.mark.parametrize("name", sorted(KEY_STREAMS))
def test_keys_that_contain_the_queries_tokens_are_self_attention_keys_of_other_tokens_are_not(name):
    """Token streams are traced through ``torch.cat`` and row-wise ops (norms, casts, elementwise
    arithmetic with broadcast operands): keys projected from a concatenation holding the queries'
    hidden states, or from those hidden states before the queries' norm, make a self-attention site;
    keys from the context alone stay cross-attention, left dense."""
    kv_from, is_self = KEY_STREAMS[name]
    g = torch.Generator().manual_seed(0)
    site = the_site_of(ContextAttention(kv_from).eval(), torch.randn(1, 6, 32, generator=g),
                       torch.randn(1, 10, 32, generator=g))
    if is_self:
        assert site.status == "rewritten", site.reason
    else:
        assert site.status == "skipped" and site.reason.startswith("cross-attention")


class SharedEmbedding(torch.nn.Module):
    """``x`` attends to another stream of as many tokens; both add one per-token embedding."""

    def __init__(self, width=32, heads=4, tokens=6):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Parameter(torch.randn(1, tokens, width))
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, other):
        q_in, kv_in = x + self.embed, other + self.embed
        return F.scaled_dot_product_attention(self.split(self.q(q_in)), self.split(self.k(kv_in)), self.split(self.v(kv_in)))


def test_a_per_token_embedding_added_to_two_streams_does_not_make_them_one():
    """Keys from another stream that shares the queries' position or camera embedding (one graph
    node, full-shape) stay cross-attention: a sum of two full-shape tensors is a stream of its own."""
    g = torch.Generator().manual_seed(0)
    site = the_site_of(SharedEmbedding().eval(), torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g))
    assert site.status == "skipped" and site.reason.startswith("cross-attention")


def test_sites_that_need_gradients_are_left_alone():
    block, args = DiTBlock(), dit_inputs()
    compiled = compile_eager(block)
    compiled(*args).sum().backward()  # still trains: the pass left the graph differentiable
    assert block.qkv.weight.grad is not None
    assert all(s.status == "skipped" for s in sites(compiled))
    assert any("inference-only" in s.reason for s in sites(compiled))


def test_dynamic_shapes_are_specialized_to_the_calls_shape_and_rewritten():
    """``dynamic=True``: the symbolic graph compiles a static copy for the call's shape
    (``li_compile.specialize``), whose site is rewritten."""
    t = inputs()
    compiled = compile_eager(SPELLINGS["sdpa"], dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(t), SPELLINGS["sdpa"](t), **FP32)
    (site,) = sites(compiled)
    assert site.status == "rewritten"


@pytest.mark.parametrize("name", ["sdpa_gqa", "fp32_softmax_cast_back", "einsum_blhd", "baddbmm_with_mask"])
def test_inductor_compiles_the_rewritten_graph_and_matches_eager(name):
    fn, t = SPELLINGS[name], inputs()
    compiled = torch.compile(fn, backend="light_interaction", fullgraph=True)
    with torch.no_grad():
        expected, got = fn(t), compiled(t)
    tol = {"rtol": 1e-2, "atol": 1e-3} if expected.dtype == torch.float16 else FP32
    torch.testing.assert_close(got, expected, **tol)
    assert [s.status for s in sites(compiled)] == ["rewritten"]


def test_the_rewrite_adds_no_graph_break_and_no_recompilation_across_plan_changes():
    block, args = DiTBlock().eval(), dit_inputs()
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        functools.partial(light_interaction, options={"inner": "eager"})
    )
    compiled = torch.compile(block, backend=counter)
    with torch.no_grad():
        compiled(*args)
        slot = find_slot(sites(compiled)[0].detail["slot"])
        with torch.compiler.set_stance("fail_on_recompile"):
            for step in range(3):
                slot.key_keep[:, : step + 1] = False  # drop the oldest cached keys, in place
                slot.is_dense = step % 2 == 1
                compiled(*args)
            slot.clear()
            torch.testing.assert_close(compiled(*args), block(*args), **FP32)
    assert counter.frame_count == 1
    explained = torch._dynamo.explain(block)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_with_sparsity_disabled_attention_is_left_to_the_inner_compiler_with_the_reason():
    fn, t = SPELLINGS["sdpa"], inputs()
    compiled = torch.compile(fn, backend="light_interaction", options={"inner": "eager", "sparsity": {"enabled": False}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(t), fn(t), **FP32)
    (site,) = sites(compiled)
    assert site.status == "skipped" and "sparsity.enabled is False" in site.reason


def test_automatic_dynamic_shapes_still_rewrite_every_site():
    """``dynamic`` unset (torch.compile's None): a second shape makes Dynamo's automatic dynamic
    shapes kick in; that symbolic graph is specialized per shape, so its site is rewritten too."""
    def attend(q):
        return F.scaled_dot_product_attention(q, q, q)

    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        for length in (8, 12, 16):
            q = torch.randn(1, 2, length, 4)
            torch.testing.assert_close(compiled(q), attend(q), **FP32)
    statuses = [s.status for s in li_compile.report(compiled).sites]
    assert statuses == ["rewritten"] * 3, statuses  # 8 static, 12 and 16 from the symbolic graph


def test_an_empty_head_dim_is_left_as_written_with_the_reason():
    def attend(q):
        return F.scaled_dot_product_attention(q, q, q)

    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        compiled(torch.randn(1, 2, 8, 0))
    (site,) = sites(compiled)
    assert site.status == "skipped" and "head dim or sequence length 0" in site.reason


def test_weights_rounded_to_half_on_float_inputs_are_left_as_written():
    """A cast of the softmax weights to fp16 before the values product, on fp32 inputs, changes the
    result (about 2e-3): the rewrite, which computes in q's dtype, must not drop it."""
    def attend(q, k, v):
        weights = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return (weights.half() @ v.half()).float()

    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), rtol=0, atol=0)
    assert [s.status for s in sites(compiled)] == ["skipped"]
    assert "rounds the attention to torch.float16" in sites(compiled)[0].reason


def test_a_float32_bias_on_a_half_site_is_left_as_written_not_rounded():
    """fp16 q, k, v with fp32 scores and an fp32 additive bias: eager adds the bias in fp32; the
    rewrite computes in q's dtype and would round a bias of ~3000 to fp16 steps of 2 (error 0.3)."""
    def attend(q, k, v, bias):
        return ((q @ k.mT).float() * 0.25 + bias).softmax(-1).half() @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g).half() for _ in range(3))
    bias = torch.randn(1, 1, 32, 32, generator=g) * 20 + 3000
    compiled = compile_eager(attend, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, bias), attend(q, k, v, bias), rtol=0, atol=0)
    (site,) = sites(compiled)
    assert site.status == "skipped" and "would round it to torch.float16" in site.reason
