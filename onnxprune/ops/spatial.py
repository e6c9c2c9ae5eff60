"""Spatial ops and reductions: pools, Pad, Resize/Upsample and the Reduce ops.

What the family shares: they work along the spatial (or reduced) axes and leave the channel axis
alone, so channels carry through; one that would mix, pad, resize or average over channels is
refused. Pad's pads and Resize's sizes, when computed from Shape ops, are folded to constants
before the walk; Resize's sizes name the channel count, rewritten after removal.
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
    const_ints,
    only_axes,
    positive_axis,
    stored_ints,
)

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_SUMS = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")
REDUCES = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSumExp", *REDUCE_SUMS)


@dataclass(eq=False)
class SizesFix(Fix):
    """Resize's stored sizes: the entries of channel axes get the count kept."""

    positions: tuple[int, ...]  # entries of the sizes input
    ids: tuple[np.ndarray, ...]  # the channels of the input axis each entry sizes
    kind = "sizes"

    def apply(self, kept: Kept, consts: Constants) -> None:
        array = stored_ints(self.node, 3)
        for position, ids in zip(self.positions, self.ids, strict=True):
            array[position] = kept.kept_of(ids)
        consts.replace(self.node, 3, array)


def pool(node: ir.Node, ctx: ChannelWalk) -> None:
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise Unsupported("its indices output counts channels")
    only_axes(ctx, node.inputs[0], {0, 1}, "are pooled over")
    ctx.carry(node.inputs[0], node.outputs[0])


def pad(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    pads = const_ints(ctx, node, 1, "pads")
    if rank is None or pads is None:
        raise Unsupported("unknown pads")
    axes = const_ints(ctx, node, 3, "axes") or list(range(rank))
    axes = [positive_axis(a, rank) for a in axes]
    for j, axis in enumerate(axes):
        if axis in ctx.spaces_of(x) and (pads[j] or pads[j + len(axes)]):
            raise Unsupported("pads the channel axis")
    ctx.carry(x, node.outputs[0])


def resize(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    spaces = ctx.spaces_of(x)
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    opset = ctx.model.opset_imports.get("", 17)
    scale_index = 1 if node.op_type == "Upsample" or opset < 11 else 2
    scales = const_floats(ctx, node, scale_index, "scales")
    sizes = const_ints(ctx, node, 3, "sizes") if node.op_type == "Resize" and opset >= 11 else None
    axes = attr(node, "axes", None)
    axes = [positive_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    for axis in spaces:
        if axis not in axes:
            continue
        j = axes.index(axis)
        if scales and scales[j] != 1.0:
            raise Unsupported("resizes the channel axis")
        if sizes and sizes[j] != ctx.dim(x, axis):
            raise Unsupported("resizes the channel axis")
    if sizes and spaces:
        resized = [a for a in spaces if a in axes]
        ctx.fix(
            SizesFix(node, tuple(axes.index(a) for a in resized), tuple(spaces[a] for a in resized))
        )
    ctx.carry(x, node.outputs[0])


def const_floats(ctx: ChannelWalk, node: ir.Node, index: int, name: str) -> list[float] | None:
    """Floats given as an input constant (newer opsets) or an attribute (older ones)."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = ctx.const(node.inputs[index])
        if array is None:
            raise Unsupported(f"input {index} is computed, not a constant")
        return [float(v) for v in np.asarray(array).reshape(-1)]
    value = attr(node, name, None)
    return None if value is None else [float(v) for v in value]


def reduce(node: ir.Node, ctx: ChannelWalk) -> None:
    """Reducing other axes keeps channels. Summing over channels drops them (a zero adds
    nothing); a mean or max over channels depends on their count and freezes."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    axes = const_ints(ctx, node, 1, "axes")
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            ctx.carry(x, node.outputs[0])
            return
        axes = list(range(rank))
    reduced = {positive_axis(a, rank) for a in axes}
    keep = attr(node, "keepdims", 1)
    mapping = {}
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            out_axis += 1 if keep else 0
            continue
        mapping[axis] = out_axis
        out_axis += 1
    if reduced & set(ctx.spaces_of(x)) and node.op_type not in REDUCE_SUMS:
        raise Unsupported("reduces over channels")
    ctx.carry(x, node.outputs[0], {a: mapping[a] for a in ctx.spaces_of(x) if a in mapping})


OPS = (
    *(OpInfo(op, rule=pool) for op in POOLS),
    OpInfo("Pad", rule=pad, folded_inputs=(1,)),
    OpInfo("Resize", rule=resize, folded_inputs=(3,)),
    OpInfo("Upsample", rule=resize),
    *(OpInfo(op, rule=reduce) for op in REDUCES),
)
