"""Blocks traced once (``torch.compiler.nested_compile_region``): their attention is still rewritten.

Specifications: Dynamo hands the backend one body for all calls of a nested block; the attention
pass rewrites that body once (also a body called from another body), every call runs it, and the
result equals eager (a world with nested blocks: ``test_regions.py``); a failing pass leaves the body as written; ``nest_repeated_blocks``
marks only lists of enough blocks of one class, never changes the class itself, and warns where
Dynamo would trace every call again (no shorter warm-up there).
"""

import pytest
import torch
from torch import nn

import li_compile
from li_compile import repeated_blocks
from li_compile.passes import nested_regions
from li_compile.repeated_blocks import nest_repeated_blocks


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).transpose(1, 3).unbind(2)  # (B, 2 heads, L, d)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.out(y)


class Stack(nn.Module):
    def __init__(self, depth: int, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _bodies(monkeypatch) -> list:
    """The bodies the attention pass was handed, recorded as it runs."""
    seen = []
    original = nested_regions.rewrite_nested

    def spy(gm, rewrite):
        seen.extend(nested_regions.nested_bodies(gm))
        return original(gm, rewrite)

    monkeypatch.setattr("li_compile.passes.attention.rewrite_nested", spy)
    return seen


@torch.no_grad()
def test_a_nested_block_is_rewritten_once_and_every_call_equals_eager(monkeypatch):
    torch.manual_seed(0)
    model, x = Stack(5), torch.randn(2, 24, 16)
    expected = model(x)
    assert nest_repeated_blocks(model) == ["blocks"]
    bodies = _bodies(monkeypatch)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert len(bodies) == 1  # five calls of one body
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert [s.status for s in sites] == ["rewritten"]


class NestedBlock(Block):
    forward = torch.compiler.nested_compile_region(Block.forward)


class Pair(nn.Module):
    """A nested region calling two nested blocks: bodies within a body."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first, self.second = NestedBlock(width), NestedBlock(width)

    @torch.compiler.nested_compile_region
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@torch.no_grad()
def test_attention_in_a_body_within_a_body_is_rewritten_and_equals_eager():
    torch.manual_seed(0)
    model, x = nn.Sequential(*(Pair(16) for _ in range(3))), torch.randn(2, 24, 16)
    expected = model(x)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    sites = [s for s in li_compile.report(compiled).sites if s.kind == "attention"]
    assert [s.status for s in sites] == ["rewritten"]


@torch.no_grad()
def test_a_failing_pass_leaves_the_body_as_written(monkeypatch):
    torch.manual_seed(0)
    model, x = Stack(4), torch.randn(2, 24, 16)
    expected = model(x)
    nest_repeated_blocks(model)

    def broken(gm, match, slot, density):
        raise RuntimeError("rewrite failed on purpose")

    monkeypatch.setattr("li_compile.passes.attention.rewrite_site", broken)
    compiled = torch.compile(model, backend="light_interaction", options={"inner": "eager"}, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    (graph_site,) = [s for s in li_compile.report(compiled).sites if s.kind == "graph"]
    assert graph_site.status == "skipped" and "rewrite failed on purpose" in graph_site.reason


def test_only_lists_of_enough_blocks_of_one_class_are_nested():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(8) for _ in range(4))
            self.short = nn.ModuleList(Block(8) for _ in range(3))
            self.mixed = nn.ModuleList([Block(8), nn.Linear(8, 8), Block(8), Block(8)])

    model, other = Mixed(), Block(8)
    assert nest_repeated_blocks(model) == ["blocks"]
    assert all(type(b) is not Block and isinstance(b, Block) for b in model.blocks)
    assert all(type(b) is Block for b in model.short) and type(other) is Block  # the class itself is untouched
    assert nest_repeated_blocks(model) == ["blocks"] and type(model.blocks[0]) is type(model.blocks[1])  # idempotent


def test_marking_warns_where_dynamo_traces_every_call_again(monkeypatch):
    """torch 2.11 has no reuse of a traced region: marking would lengthen warm-up, and says so."""
    monkeypatch.setattr(repeated_blocks, "dynamo_reuses_regions", lambda: False)
    with pytest.warns(UserWarning, match="makes warm-up longer"):
        assert nest_repeated_blocks(Stack(4)) == ["blocks"]
