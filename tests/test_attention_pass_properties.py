"""Property tests of the attention pass: random attention modules (spelling x layout x mask x GQA x
KV cache x scale x softmax precision x dtype x shape) compiled through the backend match eager and
are reported rewritten; random softmax graphs that are not attention are never rewritten and stay
correct."""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import li_compile

# 50 graphs per property in CI; LI_HYPOTHESIS_PROFILE=thorough (conftest) raises it to 1,000
THOROUGH = settings.default.max_examples >= 1000
PROPERTY = settings(max_examples=1000 if THOROUGH else 50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}
SOFTMAXES = {
    "torch.softmax": lambda s, **kw: torch.softmax(s, dim=-1, **kw),
    "F.softmax": lambda s, **kw: F.softmax(s, dim=-1, **kw),
    "Tensor.softmax": lambda s, **kw: s.softmax(-1, **kw),
}


def compiled_sites(fn, *args):
    """Compile ``fn`` through the backend (eager inner: this tests the rewrite), run it, and
    return its output and the attention sites the pass reported."""
    torch._dynamo.reset()  # every example is a new closure of the same code: no cache limit hits
    compiled = torch.compile(fn, backend="light_interaction", options={"inner": "eager"}, fullgraph=True)
    with torch.no_grad():
        out = compiled(*args)
    return out, [s for s in li_compile.report(compiled).compilations[-1].sites if s.kind == "attention"]


@st.composite
def attention_cases(draw):
    spelling = draw(st.sampled_from(["sdpa", "matmul", "einsum", "bmm", "baddbmm"]))
    case = {
        "spelling": spelling,
        "layout": draw(st.sampled_from(["bhld", "blhd", "flat"])),
        "mask": draw(st.sampled_from([None, "additive", "keep", "drop", "causal"])),
        "groups": draw(st.sampled_from([1, 2])),
        "gqa_via": draw(st.sampled_from(["repeat_interleave", "expand", "sdpa"])),
        "kv_cache": draw(st.integers(0, 5)),
        "scale_on": draw(st.sampled_from(["scores_mul", "scores_div", "q", "k"])),
        "scale": draw(st.sampled_from([None, 0.2, 1.0])),
        "upcast": draw(st.booleans()) and spelling != "sdpa",
        "softmax": draw(st.sampled_from(sorted(SOFTMAXES))),
        "dtype": draw(st.sampled_from([torch.float32, torch.float16])),
        "batch": draw(st.integers(1, 2)),
        "kv_heads": draw(st.integers(1, 2)),
        "q_len": draw(st.integers(1, 9)),
        "kv_len": draw(st.integers(1, 9)),
        "head_dim": draw(st.sampled_from([4, 8, 16])),
        "seed": draw(st.integers(0, 2**16)),
    }
    return case


def build_attention(c):
    """(fn, args) computing attention as the case spells it; fn takes (q, k, v, cache_k, cache_v, mask)."""
    g = torch.Generator().manual_seed(c["seed"])
    b, hkv, groups, d, dtype = c["batch"], c["kv_heads"], c["groups"], c["head_dim"], c["dtype"]
    heads, lq, lk = hkv * groups, c["q_len"], c["kv_len"] + c["kv_cache"]
    flat = c["layout"] == "flat" or c["spelling"] in ("bmm", "baddbmm")
    sdpa_gqa = c["spelling"] == "sdpa" and c["gqa_via"] == "sdpa" and c["layout"] == "bhld" and groups > 1
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(d)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rand(b, heads, lq, d), rand(b, hkv, c["kv_len"], d), rand(b, hkv, c["kv_len"], d)
    cache_k, cache_v = rand(b, hkv, c["kv_cache"], d), rand(b, hkv, c["kv_cache"], d)
    mask = None
    if c["mask"] == "additive":
        mask = torch.randn(lq, lk, generator=g).to(dtype)  # a finer mask is left as written (test_attention_pass)
    elif c["mask"] in ("keep", "drop"):
        keep = torch.rand(lq, lk, generator=g) > 0.4
        keep[:, 0] = True  # every query sees a key: fully masked rows are not attention's business
        mask = keep if c["mask"] == "keep" else ~keep

    def fn(q, k, v, cache_k, cache_v, mask):
        if c["kv_cache"]:
            k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
        if groups > 1 and not sdpa_gqa:
            if c["gqa_via"] == "expand":
                k, v = (x[:, :, None].expand(b, hkv, groups, lk, d).reshape(b, heads, lk, d) for x in (k, v))
            else:
                k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        if c["spelling"] == "sdpa":
            return sdpa(q, k, v, mask)
        return handwritten(q, k, v, mask)

    def sdpa(q, k, v, mask):
        if c["mask"] == "drop":
            mask = ~mask
        kw = {"attn_mask": mask, "is_causal": c["mask"] == "causal", "scale": c["scale"], "enable_gqa": sdpa_gqa}
        if c["layout"] == "blhd":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # a (B, L, H, D) model transposes in and out
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)
        if c["layout"] == "flat":
            q, k, v = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, **kw)

    def handwritten(q, k, v, mask):
        if c["scale_on"] == "q":
            q = q * scale
        elif c["scale_on"] == "k":
            k = k * scale
        if flat:
            q, k, v = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        s = contract_scores(q, k, scale if c["spelling"] == "baddbmm" and c["scale_on"].startswith("scores") else 1.0)
        if c["upcast"]:
            s = s.float()
        if c["scale_on"] == "scores_mul" and c["spelling"] != "baddbmm":
            s = s * scale
        elif c["scale_on"] == "scores_div" and c["spelling"] != "baddbmm":
            s = s / (1 / scale)
        if c["mask"] == "additive":
            s = s + mask
        elif c["mask"] == "keep":
            s = torch.where(mask, s, float("-inf"))
        elif c["mask"] == "drop":
            s = s.masked_fill(mask, float("-inf"))
        elif c["mask"] == "causal":
            s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
        p = SOFTMAXES[c["softmax"]](s, dtype=torch.float32).to(v.dtype) if c["upcast"] else SOFTMAXES[c["softmax"]](s)
        return contract_values(p, v)

    def contract_scores(q, k, alpha):
        if c["spelling"] == "bmm":
            return torch.bmm(q, k.transpose(1, 2))
        if c["spelling"] == "baddbmm":
            return torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), q, k.mT, beta=0, alpha=alpha)
        if c["layout"] == "blhd" and c["spelling"] == "einsum":
            return torch.einsum("bihd,bjhd->bhij", q.transpose(1, 2), k.transpose(1, 2))
        if c["spelling"] == "einsum":
            return torch.einsum("...id,...jd->...ij", q, k)
        if c["layout"] == "blhd":
            return q.transpose(1, 2).transpose(1, 2) @ k.transpose(1, 2).permute(0, 2, 3, 1)
        return q @ k.transpose(-2, -1)

    def contract_values(p, v):
        if c["spelling"] in ("bmm", "baddbmm"):
            return torch.bmm(p, v)
        if c["layout"] == "blhd" and c["spelling"] == "einsum":
            return torch.einsum("bhij,bjhd->bihd", p, v.transpose(1, 2))
        if c["spelling"] == "einsum":
            return torch.einsum("...ij,...jd->...id", p, v)
        return torch.matmul(p, v)

    return fn, (q, k, v, cache_k, cache_v, mask)


@PROPERTY
@given(attention_cases())
def test_random_attention_modules_are_rewritten_and_match_eager(case):
    fn, args = build_attention(case)
    with torch.no_grad():
        expected = fn(*args)
    out, sites = compiled_sites(fn, *args)
    torch.testing.assert_close(out, expected, **TOLERANCE[case["dtype"]])
    assert [(s.status, s.reason) for s in sites] == [("rewritten", "")]


NOT_ATTENTION = {
    # softmax over the query axis (square scores, so the shapes still fit)
    "softmax_over_queries": lambda q, k, v, x: (q @ k.mT).softmax(dim=-2) @ v,
    # the weights contract over the query axis
    "contraction_over_queries": lambda q, k, v, x: (q @ k.mT).softmax(-1).mT @ v,
    # the weights feed something other than a contraction with values
    "weights_reduced": lambda q, k, v, x: (q @ k.mT).softmax(-1).sum(-1, keepdim=True) * v,
    "weights_activated": lambda q, k, v, x: torch.relu((q @ k.mT).softmax(-1) - 0.1) @ v,
    "weights_returned_too": lambda q, k, v, x: (lambda p: (p @ v, p.mean()))((q @ k.mT).softmax(-1)),
    # the softmax input is no query-key contraction
    "softmax_of_an_input": lambda q, k, v, x: x.softmax(-1) @ v,
    "scores_times_a_tensor": lambda q, k, v, x: ((q @ k.mT) * x).softmax(-1) @ v,
    # a "mask" that broadcasts the scores to a bigger shape
    "mask_enlarging_scores": lambda q, k, v, x: ((q @ k.mT) + x.expand(3, *x.shape)[:, None, None]).softmax(-1) @ v,
    "finite_fill": lambda q, k, v, x: (q @ k.mT).masked_fill(x > 0, -1e4).softmax(-1) @ v,
}


@PROPERTY
@given(
    name=st.sampled_from(sorted(NOT_ATTENTION)),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    heads=st.integers(1, 3),
    length=st.integers(2, 7),
    head_dim=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_random_non_attention_softmax_graphs_are_never_rewritten(name, dtype, heads, length, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, length, head_dim, generator=g).to(dtype) for _ in range(3))
    x = torch.randn(length, length, generator=g).to(dtype)
    fn = NOT_ATTENTION[name]
    with torch.no_grad():
        expected = fn(q, k, v, x)
    out, sites = compiled_sites(fn, q, k, v, x)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    assert sites and all(s.status == "skipped" and s.reason for s in sites)
