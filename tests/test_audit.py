"""The audit: attention calls that ran outside the backend's graphs are counted and located.

Specification: one eager forward of the compiled model counts every SDPA and flex_attention call by
its source line; lines the backend's graphs hold are accounted for, the others (code Dynamo did not
compile) are listed, and the model's report prints the audit.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

import li_compile


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
