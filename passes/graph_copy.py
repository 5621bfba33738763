"""A working copy of an FX graph or graph module, so a pass can fail without touching the original."""

from __future__ import annotations

from torch import fx


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy of ``graph`` (same owning module and tracer; new nodes)."""
    new_graph = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    output = new_graph.graph_copy(graph, val_map={}, return_output_node=True)
    if isinstance(output, tuple):  # graph_copy returns (value, output_node) when asked for the node
        output = output[0]
    new_graph.output(output)
    return new_graph


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with a copy of its graph (``copy_graph``): same attributes and class name."""
    return fx.GraphModule(gm, copy_graph(gm.graph), class_name=type(gm).__name__)
