"""Normalisations: BatchNormalization, InstanceNormalization, LayerNormalization, Softmax and
LogSoftmax.

What the family shares: the output has the input's shape and channels, and per-channel parameters
(scale, bias, mean, variance) are sliced with the channels they belong to. Channels on an axis the
op normalises over are refused where removing one would change the others' values (Softmax, and
InstanceNormalization's spatial axes), with one known approximation, by design:
LayerNormalization over a pruned axis renormalises over the channels left (as Torch-Pruning does),
so removing an all-zero channel changes its statistics.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.ops.base import (
    ChannelWalk,
    OpInfo,
    Unsupported,
    attr,
    only_axes,
    positive_axis,
    same_dims,
)


def batchnorm(node: ir.Node, ctx: ChannelWalk) -> None:
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Unsupported("training-mode outputs are used")
    x = node.inputs[0]
    c = ctx.space(x, 1, "in", node)
    for value, role in zip(node.inputs[1:5], ("scale", "shift", "shift", "param"), strict=False):
        if value is not None:
            if not ctx.is_const(value):
                raise Unsupported("parameters are computed, not stored")
            ctx.union(c, ctx.space(value, 0, role, node))
    ctx.carry(x, node.outputs[0])


def instancenorm(node: ir.Node, ctx: ChannelWalk) -> None:
    x, scale, bias = node.inputs
    only_axes(ctx, x, {0, 1}, "are normalised over")
    c = ctx.space(x, 1, "in", node)
    ctx.union(c, ctx.space(scale, 0, "scale", node))
    ctx.union(c, ctx.space(bias, 0, "shift", node))
    ctx.carry(x, node.outputs[0])


def layernorm(node: ir.Node, ctx: ChannelWalk) -> None:
    """Normalised axes may be pruned (scale and bias sliced); the statistics then cover the
    channels left. See the module docstring."""
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Unsupported("mean / inverse std outputs are used")
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    start = positive_axis(int(attr(node, "axis", -1)), rank)
    for axis, ids in ctx.spaces_of(x).items():
        if axis < start:
            continue
        for value, role in zip(node.inputs[1:3], ("scale", "shift"), strict=False):
            if value is None:
                continue
            r = ctx.rank(value) or 0
            k = axis - (rank - r)
            if k >= 0 and ctx.dim(value, k) != 1:
                ctx.union(ids, ctx.space(value, k, role, node))
    ctx.carry(x, node.outputs[0])


def softmax(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    opset = ctx.model.opset_imports.get("", 17)
    axis = positive_axis(int(attr(node, "axis", -1 if opset >= 13 else 1)), rank)
    normalised = {axis} if opset >= 13 else set(range(axis, rank))
    if normalised & set(ctx.spaces_of(x)):
        raise Unsupported("normalises over channels")
    ctx.carry(x, node.outputs[0])


OPS = (
    OpInfo("BatchNormalization", rule=batchnorm, output_dims=same_dims),
    OpInfo("InstanceNormalization", rule=instancenorm),
    OpInfo("LayerNormalization", rule=layernorm, output_dims=same_dims),
    OpInfo("Softmax", rule=softmax, output_dims=same_dims),
    OpInfo("LogSoftmax", rule=softmax, output_dims=same_dims),
)
