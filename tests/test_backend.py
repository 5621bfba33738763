"""The light_interaction backend: registration, signatures, graph breaks, fallbacks, reports."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo.testing

import li_compile
from li_compile.passes import pipeline
from li_compile.reporting import Site


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).softmax(-1)


class WithGraphBreak(TwoLayer):
    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(y.relu())


def test_backend_is_found_in_a_fresh_interpreter_without_importing_li_compile():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        x = torch.randn(3, 4)
        out = torch.compile(m, backend="light_interaction", options={"inner": "eager"})(x)
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)
        assert "li_compile.backend" in sys.modules  # loaded lazily through the entry point
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("dynamic", [None, False])
def test_compiled_module_matches_eager_fullgraph(inner, dynamic):
    torch.manual_seed(0)
    m = TwoLayer()
    x = torch.randn(4, 8)
    compiled = torch.compile(m, backend="light_interaction", fullgraph=True, dynamic=dynamic, options={"inner": inner})
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)


def test_graph_breaks_compile_each_graph_and_report_them():
    torch.manual_seed(0)
    m = WithGraphBreak()
    x = torch.randn(4, 8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("light_interaction")
    compiled = torch.compile(m, backend=counter)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2
    rep = li_compile.report(torch.compile(m, backend="light_interaction"))  # same module: same log
    assert len(rep.compilations) == 2


def test_mode_is_accepted_and_forwarded():
    m = TwoLayer()
    x = torch.randn(4, 8)
    compiled = torch.compile(m, backend="light_interaction", mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)


def test_report_of_a_function_lists_its_compilations():
    def f(x):
        return torch.sin(x) * 2

    compiled = torch.compile(f, backend="light_interaction", options={"inner": "eager"})
    compiled(torch.ones(3))
    rep = li_compile.report(compiled)
    assert len(rep.compilations) == 1
    assert rep.compilations[0].inner == "eager"
    assert "f" in rep.target
    assert "graph(s)" in str(rep)


def test_report_of_a_never_compiled_function_says_so():
    compiled = torch.compile(lambda x: x + 1, backend="light_interaction")
    with pytest.raises(ValueError, match="has not been compiled .* yet"):
        li_compile.report(compiled)
    with pytest.raises(ValueError, match="not compiled by torch.compile"):
        li_compile.report(lambda x: x)


def test_a_failing_pass_falls_back_to_the_original_graph_with_a_reason(monkeypatch):
    def broken_pass(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "call_function":
                node.target = torch.cos  # a half-done rewrite that must never run
                break
        ctx.compilation.sites.append(Site(kind="attention", status="rewritten"))
        raise RuntimeError("cannot prove equivalence")

    monkeypatch.setattr(pipeline, "PASSES", [broken_pass])
    m = TwoLayer()
    x = torch.randn(4, 8)
    compiled = torch.compile(m, backend="light_interaction", options={"inner": "eager"})
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)
    (site,) = li_compile.report(compiled).sites
    assert site.kind == "graph" and site.status == "skipped"
    assert "cannot prove equivalence" in site.reason


def test_passes_see_options_and_record_sites(monkeypatch):
    seen = {}

    def recording_pass(gm, ctx):
        seen["block_q"] = ctx.options.sparsity.block_q
        ctx.compilation.sites.append(Site(kind="attention", status="skipped", reason="test", location="here.py:1"))

    monkeypatch.setattr(pipeline, "PASSES", [recording_pass])
    compiled = torch.compile(TwoLayer(), backend="light_interaction", options={"inner": "eager", "sparsity": {"block_q": 64}})
    compiled(torch.randn(2, 8))
    assert seen == {"block_q": 64}
    text = str(li_compile.report(compiled))
    assert "attention" in text and "skipped" in text and "here.py:1" in text


class VideoAndText(torch.nn.Module):
    """Self-attention over the video tokens and over a separate text sequence (a text refiner)."""

    def forward(self, video, text):
        f = torch.nn.functional.scaled_dot_product_attention
        return f(video, video, video).sum() + f(text, text, text).sum()


def test_a_site_whose_sequence_is_no_video_layout_is_reported_dense():
    from li_compile.sequence import SequenceLayout

    model = VideoAndText()
    compiled = torch.compile(model, backend="light_interaction", dynamic=False,
                             options={"inner": "eager", "context": {"window_min": 1, "window_max": 1}})
    li_compile.accelerator(compiled).configure(memory_k=0, layout=lambda capacity: SequenceLayout(capacity, 1, 2, 2))
    video, text = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 5, 4)  # 2 frames of 2 x 2 tokens; 5 text tokens
    torch.testing.assert_close(compiled(video, text), model(video, text))
    sites = {site.detail["shape"][2]: site for site in li_compile.report(compiled).sites}
    assert sites[8].status == sites[5].status == "rewritten"
    assert sites[8].reason == ""
    assert "runs dense: 5 x 5 tokens is not the video layout at any context capacity" in sites[5].reason
    assert "runs dense: 5 x 5" in str(li_compile.report(compiled))
