"""Normalisations: BatchNormalization, InstanceNormalization, LayerNormalization and the RMS
norms (RMSNormalization, and ONNX Runtime's SimplifiedLayerNormalization,
SkipLayerNormalization and SkipSimplifiedLayerNormalization), Softmax and LogSoftmax.

What the family shares: the output has the input's shape and channels, and per-channel parameters
(scale, bias, mean, variance) are sliced with the channels they belong to. Channels on an axis the
op normalises over are refused where removing one would change the others' values (Softmax, and
InstanceNormalization's spatial axes). A LayerNorm or RMS norm over channels stays exact: its
statistics are taken over the original width with the removed channels as the zeros they hold
(`NormFix` pads its input back with zeros and slices its output), so the channels kept get the
values they had. Where a removed channel would not be zero at its input (a shift the walk cannot
see through), the statistics cover the channels left instead, an approximation the report warns
of. The spelt-out forms (ReduceMean / Sub / Pow / Sqrt / Div) are exact through the reductions'
own rule (ops/spatial.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.ops.base import (
    ChannelWalk,
    Constants,
    Fix,
    Kept,
    OpInfo,
    Unsupported,
    attr,
    only_axes,
    positive_axis,
    same_dims,
)
from onnxprune.ops.dead import fresh_name, makes_zero, reroute


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


@dataclass(eq=False)
class NormFix(Fix):
    """A LayerNorm or RMS norm over channel axes: the inputs that carry the channels are padded
    back to the original width with zeros (what the removed channels held), the scale, bias and
    skip bias with zeros too, and the outputs sliced to the channels kept. The statistics are
    then the original ones (the mean and variance over the original width), exactly; the op
    stays one fused node. `exact` False: the statistics cover the channels left (approximate)."""

    axes: tuple[int, ...]  # the channel axes of the input
    ids: tuple[np.ndarray, ...]  # the channels of each
    exact: bool
    shapes: tuple[tuple[int | None, ...] | None, ...]  # of each input, as the walk saw them
    kind = "norm"

    def apply(self, kept: Kept, consts: Constants) -> None:
        node = self.node
        graph = node.graph
        rank = len(self.shapes[0]) if self.shapes[0] is not None else None
        extra = [len(ids) - kept.kept_of(ids) for ids in self.ids]
        if not self.exact or graph is None or rank is None or not any(extra):
            return
        name = node.name or node.op_type
        made: list[ir.Node] = []
        for index, (value, shape) in enumerate(zip(node.inputs, self.shapes, strict=True)):
            if value is None or shape is None:
                continue
            r = len(shape)
            pads = np.zeros(2 * r, dtype=np.int64)
            for axis, n in zip(self.axes, extra, strict=True):
                k = axis - (rank - r)
                if k >= 0 and shape[k] != 1:
                    pads[r + k] = n
            if not pads.any():
                continue
            pad = ir.Node("", "Pad", [value, None], name=fresh_name(graph, f"{name}_pad_{index}"))
            consts.replace(pad, 1, pads)
            made.append(pad)
            node.replace_input_with(index, pad.outputs[0])
        graph.insert_before(node, made)
        for position, out in enumerate(node.outputs):
            if out is None or (not out.uses() and not out.is_graph_output()):
                continue
            if position not in (0, 3):  # the normalised output and a skip norm's sum
                continue
            label = fresh_name(graph, f"{name}_slice_{position}")
            piece = ir.Node("", "Slice", [out, None, None, None], name=label)
            consts.replace(piece, 1, np.zeros(len(self.axes), dtype=np.int64))
            ends = [len(ids) - n for ids, n in zip(self.ids, extra, strict=True)]
            consts.replace(piece, 2, np.array(ends, dtype=np.int64))
            consts.replace(piece, 3, np.array(self.axes, dtype=np.int64))
            graph.insert_after(node, piece)
            reroute(graph, out, piece.outputs[0], {piece})
            out.shape = None  # the full width again: shape inference tells


def _norm(
    node: ir.Node, ctx: ChannelWalk, start: int, carried: tuple[int, ...], params: dict[int, str]
) -> None:
    """Channels on the normalised axes (from `start` on) of the `carried` inputs (one space:
    x, and a skip added to it) and the `params` inputs (role by input, right-aligned) are one;
    they carry into outputs 0 and, where given, the input+skip sum (output 3)."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    for index in carried[1:]:
        other = node.inputs[index] if index < len(node.inputs) else None
        if other is not None:
            for axis, ids in ctx.spaces_of(other).items():
                ctx.union(ctx.space(x, axis, "in", node), ids)
            for axis, ids in ctx.spaces_of(x).items():
                ctx.union(ids, ctx.space(other, axis, "in", node))
    axes = []
    for axis, ids in sorted(ctx.spaces_of(x).items()):
        if axis < start:
            continue
        axes.append(axis)
        for index, role in params.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            r = ctx.rank(value) or 0
            k = axis - (rank - r)
            if k >= 0 and ctx.dim(value, k) != 1:
                ctx.union(ids, ctx.space(value, k, role, node))
    ctx.carry(x, node.outputs[0])
    if len(node.outputs) > 3 and node.outputs[3] is not None:
        ctx.carry(x, node.outputs[3])
    if axes:
        held = [ctx.dead(node.inputs[i]) for i in carried if i < len(node.inputs)]
        exact = all(h is not None and h.zero for h in held)
        if exact and ctx.model.opset_imports.get("", 1) < 11:
            exact = False  # Pad and Slice with their sizes as inputs: opset 11 on
        spaces = ctx.spaces_of(x)
        shapes = tuple(None if (s := ctx.shape(v)) is None else tuple(s) for v in node.inputs)
        ctx.fix(NormFix(node, tuple(axes), tuple(spaces[a] for a in axes), exact, shapes))


def layernorm(node: ir.Node, ctx: ChannelWalk) -> None:
    """LayerNormalization, RMSNormalization, SimplifiedLayerNormalization: over the axes from
    `axis` on; exact after removal (`NormFix`)."""
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Unsupported("mean / inverse std outputs are used")
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    start = positive_axis(int(attr(node, "axis", -1)), rank)
    _norm(node, ctx, start, (0,), {1: "scale", 2: "shift"})


def skip_layernorm(node: ir.Node, ctx: ChannelWalk) -> None:
    """ONNX Runtime's SkipLayerNormalization and SkipSimplifiedLayerNormalization: input + skip
    (+ bias) normalised over the last axis; the sum may be an output too."""
    if any(o is not None and o.uses() for o in node.outputs[1:3]):
        raise Unsupported("mean / inverse std outputs are used")
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    # gamma, beta and the bias added before normalising (the simplified form has no beta)
    params = {2: "scale", 3: "shift", 4: "shift"}
    _norm(node, ctx, rank - 1, (0, 1), params)


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


MICROSOFT = "com.microsoft"
# Outputs with the input's shape, where ONNX's shape inference does not know the op: the skip
# norms give the input + skip sum as their fourth output.
SAME_SHAPE_OUTPUTS = {"SkipLayerNormalization": (0, 3), "SkipSimplifiedLayerNormalization": (0, 3)}

OPS = (
    OpInfo("BatchNormalization", rule=batchnorm, output_dims=same_dims, dead=makes_zero),
    OpInfo("InstanceNormalization", rule=instancenorm, dead=makes_zero),
    OpInfo("LayerNormalization", rule=layernorm, output_dims=same_dims, dead=makes_zero),
    OpInfo("RMSNormalization", rule=layernorm, output_dims=same_dims, dead=makes_zero),
    *(
        OpInfo(op, domain, rule=rule, output_dims=same_dims, dead=makes_zero)
        for domain, op, rule in (
            # ONNX Runtime registers SimplifiedLayerNormalization in the default domain
            ("", "SimplifiedLayerNormalization", layernorm),
            (MICROSOFT, "SimplifiedLayerNormalization", layernorm),
            (MICROSOFT, "SkipLayerNormalization", skip_layernorm),
            (MICROSOFT, "SkipSimplifiedLayerNormalization", skip_layernorm),
        )
    ),
    OpInfo("Softmax", rule=softmax, output_dims=same_dims),
    OpInfo("LogSoftmax", rule=softmax, output_dims=same_dims),
)
