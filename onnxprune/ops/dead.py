"""What a removed channel holds where it is read, and the nodes that compute it.

The zero-channel invariant: a channel whose producers' weights and biases (and its shifts and
scales) are zero is zero right after them. Ops that only move entries keep it zero; element-wise
ops may make it a constant (Sigmoid: 0.5) or a value of the other channels (a LayerNorm spelt
out subtracts the mean: the removed channel holds -mean there). A reduction over channels (a
mean, a variance, a sum) stays exact after removal only if it still counts each removed channel
as what it held, so the walk works that value out as an expression (`Dead`), one rule per op
(`OpInfo.dead`), and a fix adds it back (`emit`) where it is not zero.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.ops.base import ZERO, ChannelWalk, Constants, Dead


def as_is(value: ir.Value) -> Dead:
    """A tensor that carries no channel: each removed channel sees it as it is (broadcast)."""
    return Dead(value=value)


def makes_zero(node: ir.Node, ctx: ChannelWalk) -> Dead:
    """A layer (or a normalisation) whose removed output channels have zero weights, bias,
    scale and shift: they are zero."""
    return ZERO


def keeps_zero(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """An op that moves, picks or pools entries: zero where every input carrying channels holds
    zero (a removed channel that is not zero would be moved about with it: not followed)."""
    for value in node.inputs:
        if value is None or not ctx.spaces_of(value):
            continue
        held = ctx.dead(value)
        if held is None or not held.zero:
            return None
    return ZERO


def emit(held: Dead, before: ir.Node, consts: Constants) -> ir.Value:
    """Nodes that compute `held` (not zero), inserted before `before`: copies of the expression's
    nodes, each removed-channel input a scalar 0 of that input's type, each broadcast tensor
    used as it is. Returns the value they compute (it broadcasts like the channel's tensor)."""
    assert not held.zero
    graph = before.graph
    assert graph is not None
    made: dict[int, ir.Value] = {}

    def build(expr: Dead) -> ir.Value:
        if expr.value is not None:
            return expr.value
        if id(expr) in made:
            return made[id(expr)]
        source = expr.node
        assert source is not None
        inputs: list[ir.Value | None] = []
        zeros: list[int] = []
        for i, part in enumerate(expr.inputs):
            if part is None:
                inputs.append(None)
            elif part.zero:
                inputs.append(None)
                zeros.append(i)
            else:
                inputs.append(build(part))
        attributes = [ir.Attr(a.name, a.type, a.value) for a in source.attributes.values()]
        node = ir.Node(
            source.domain,
            source.op_type,
            inputs,
            attributes,
            num_outputs=1,
            name=fresh_name(graph, f"{source.name or source.op_type}_removed"),
        )
        for i in zeros:
            original = source.inputs[i]
            dtype = original.dtype if original is not None and original.dtype else None
            consts.replace(node, i, np.zeros((), dtype.numpy() if dtype else np.float32))
        graph.insert_before(before, node)
        made[id(expr)] = node.outputs[0]
        return node.outputs[0]

    return build(held)


def fresh_name(graph: ir.Graph, base: str) -> str:
    """A node name no node of `graph` has (ONNX Runtime refuses two nodes of one name)."""
    taken = {node.name for node in graph}
    name, count = base, 1
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    return name


def reroute(graph: ir.Graph, value: ir.Value, new: ir.Value, keep: set[ir.Node]) -> None:
    """Every reader of `value` but the nodes in `keep` reads `new` instead (a model output too,
    under the old name)."""
    for user, index in list(value.uses()):
        if user not in keep:
            user.replace_input_with(index, new)
    if value.is_graph_output():
        position = list(graph.outputs).index(value)
        name = value.name
        value.name = f"{name}_before_pruning"
        new.name = name
        graph.outputs[position] = new
