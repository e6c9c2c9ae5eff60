"""Quantization between layers: QuantizeLinear and DequantizeLinear (QDQ models).

What the family shares: both are element-wise, so channels stay on their axes and a zero channel
stays zero (at the zero point in between). How a stored weight's quantization is read (its scale,
zero point and blocks) is `core.quantized`'s; the walk follows a weight's own DequantizeLinear
from the layer that reads it.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.ops.base import ChannelWalk, OpInfo, Unsupported, attr, positive_axis


def quantize_linear(node: ir.Node, ctx: ChannelWalk) -> None:
    """QuantizeLinear and DequantizeLinear between layers (QDQ): element-wise, a zero channel
    stays zero (at the zero point in between). A scale and zero point per index of a channel
    axis are sliced with it; per-tensor ones, or per index of another axis, broadcast. A stored
    weight's DequantizeLinear is left to the layer that reads it (channels.Walk.space)."""
    x = node.inputs[0]
    spaces = ctx.spaces_of(x)
    if not spaces:
        return
    rank = ctx.rank(x)
    shape = ctx.shape(node.inputs[1])
    if rank is None or shape is None:
        raise Unsupported("unknown rank or scale shape")
    if any(d != 1 for d in shape):
        axis = positive_axis(int(attr(node, "axis", 1)), rank)
        if len(shape) != 1 or attr(node, "block_size", 0):
            raise Unsupported("blocked quantization of a tensor with channels")
        if axis in spaces:
            for parameter in node.inputs[1:3]:
                if parameter is not None:
                    ctx.union(spaces[axis], ctx.space(parameter, 0, "param", node))
    ctx.carry(x, node.outputs[0])


OPS = (
    OpInfo("QuantizeLinear", rule=quantize_linear),
    OpInfo("DequantizeLinear", rule=quantize_linear),
)
