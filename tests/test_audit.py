"""The audit: attention calls that ran outside the backend's graphs are counted and located.

Specification: one eager forward of the compiled model counts every SDPA, flex_attention and
nn.MultiheadAttention call by its source line; lines the backend's graphs hold are accounted for,
the others (code Dynamo did not compile, calls opaque to the passes) are listed, and the model's
report prints the audit. Sites and calls are located by one rule: the innermost frame outside torch
and li_compile's machinery (the reference worlds are user code).
"""

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import li_compile
from li_compile.reporting import user_location
from li_compile.worlds import hy_worldplay, trajectories
from li_compile.worlds.pipeline import generate


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv(x).unflatten(-1, (3, 2, 8)).transpose(1, 3).unbind(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*self.heads(x)).transpose(1, 2).flatten(2)


class EagerAttention(Attention):
    @torch._dynamo.disable  # a frame Dynamo skips: its attention runs eagerly, unseen by the backend
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flex_attention(*self.heads(x)).transpose(1, 2).flatten(2)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.compiled_blocks = nn.ModuleList([Attention(), Attention()])
        self.eager_block = EagerAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.compiled_blocks:
            x = x + block(x)
        return x + self.eager_block(x)


def test_the_audit_lists_the_attention_calls_no_graph_holds_and_the_report_prints_it():
    torch.manual_seed(0)
    model, x = Model(), torch.randn(1, 128, 16)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    result = li_compile.audit(compiled, x)
    assert sum(result.calls.values()) == 3
    ((line, count),) = result.unaccelerated.items()
    assert count == 1 and line.startswith("test_audit.py:") and line.endswith("in forward")
    assert "1 of 3 attention call(s) of one forward ran unaccelerated" in str(li_compile.report(compiled))


def test_a_model_compiled_whole_has_nothing_unaccelerated():
    model, x = Attention(), torch.randn(1, 16, 16)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        compiled(x)
    result = li_compile.audit(compiled, x)
    assert result.calls and not result.unaccelerated and "all 1 attention call(s)" in str(result)


def test_a_call_at_a_skipped_site_ran_in_the_backends_graphs_but_as_written():
    """With sparsity off every site is skipped: the calls are in the backend's graphs (nothing
    unaccelerated by a graph break) but left as written, and the audit says so."""
    model, x = Attention(), torch.randn(1, 16, 16)
    compiled = torch.compile(model, backend="light_interaction",
                             options={"inner": "eager", "sparsity": {"enabled": False}})
    with torch.no_grad():
        compiled(x)
    result = li_compile.audit(compiled, x)
    assert not result.unaccelerated and sum(result.as_written.values()) == 1
    assert "1 of them at skipped sites, left as written" in str(result)


CAUSAL = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 128, 128, device="cpu")


class FlexAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flex_attention(*self.heads(x), block_mask=CAUSAL).transpose(1, 2).flatten(2)


def test_a_rewritten_flex_site_is_located_at_the_users_line_and_its_call_counts_as_accelerated():
    """The innermost frames of a flex call are inside torch: the site and the audit both name the
    user's line (``user_location``)."""
    model, x = FlexAttention(), torch.randn(1, 128, 16)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        compiled(x)
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert site.status == "rewritten" and site.location.startswith("test_audit.py:")
    assert not li_compile.audit(compiled, x).unaccelerated


def test_the_reference_worlds_are_user_code_so_their_attention_is_all_accounted_for():
    """li_compile/worlds/ holds model code: its attention lines are the user's lines, for the sites
    (hy_worldplay.py, layers.py) and for the audit alike."""
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], depth=1, steps=1)
    world = hy_worldplay.build(spec, seed=0)
    world = world.compile(lambda m: torch.compile(m, backend="light_interaction", dynamic=False,
                                                  options={"inner": "eager"}))
    trajectory = trajectories.make("loop", spec.chunk_frames * 2, chunk_frames=spec.chunk_frames)
    acc = li_compile.accelerator(world.model)
    acc.configure(memory_k=spec.memory, fov_y_deg=trajectory.fov_y_deg, layout=world.layout,
                  revisit_inputs=world.revisit_inputs)
    calls = []
    world.model._orig_mod.register_forward_pre_hook(
        lambda module, args, kwargs: None if calls else calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        generate(world, trajectory, accelerator=acc)
    locations = {s.location for s in li_compile.report(world.model).sites if s.kind == "attention"}
    assert {loc.split(":")[0] for loc in locations} == {"hy_worldplay.py", "layers.py"}
    ((args, kwargs),) = calls
    result = li_compile.audit(world.model, *args, **kwargs)
    assert result.calls and not result.unaccelerated


class MultiheadBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


def test_nn_multihead_attention_is_a_skipped_site_and_its_call_ran_unaccelerated():
    """Dynamo keeps ``F.multi_head_attention_forward`` as one node the passes cannot see into: the
    report names it with the fix, and the audit counts its call as unaccelerated."""
    model, x = MultiheadBlock().eval(), torch.randn(1, 24, 16)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    (site,) = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert site.status == "skipped" and "F.scaled_dot_product_attention" in site.reason
    result = li_compile.audit(compiled, x)
    ((line, count),) = result.unaccelerated.items()
    assert count == 1 and line == site.location and line.startswith("test_audit.py:")


def test_the_users_frame_is_the_innermost_outside_torch_and_li_compiles_machinery():
    package = os.path.dirname(li_compile.__file__)
    torch_dir = os.path.dirname(torch.__file__)
    stack = [("/home/me/run.py", 3, "<module>"), (f"{package}/worlds/layers.py", 259, "forward"),
             (f"{torch_dir}/nn/modules/module.py", 1775, "_call_impl"), (f"{package}/passes/attention.py", 80, "f")]
    assert user_location(stack) == "layers.py:259 in forward"
    assert user_location(stack[:1]) == "run.py:3 in <module>"
    assert user_location(stack[2:]) is None
