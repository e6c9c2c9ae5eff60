"""Element-wise ops: unary ones (activations, casts, Identity, Dropout) and broadcasting ones
(arithmetic, comparisons, logic, Where, PRelu).

What the family shares: channels stay on their axes. A unary op's output has its input's channels;
broadcasting operands' channels on aligned axes are the same channels, so a residual Add links
them, and a stored operand with one entry per channel (a bias, a scale) is sliced with them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import const_tensor
from onnxprune.ops.base import (
    ZERO,
    ChannelWalk,
    Dead,
    OpInfo,
    RunDims,
    Unsupported,
    broadcast_dims,
    same_dims,
)

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip", "Exp", "Log", "Sqrt",
    "Reciprocal", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Identity", "Cast",
    "CastLike", "Dropout", "Not", "IsNaN", "IsInf", "Swish",
)  # fmt: skip
BINARY = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
)  # fmt: skip

# The unary ops whose output dims shape folding follows (those attention and shape arithmetic
# use); the others keep the dims shape inference gave them.
FOLLOWED_UNARY = frozenset(
    {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Dropout", "Cast", "CastLike", "Identity", "Not",
     "Neg", "Sqrt", "Exp", "Abs", "Clip", "HardSwish", "LeakyRelu", "Elu", "Softplus", "Mish",
     "Swish", "Reciprocal", "IsNaN", "IsInf", "Sin", "Cos"}
)  # fmt: skip


# Unary ops that map 0 to 0: a removed channel that is zero stays zero through them.
ZERO_AT_ZERO = frozenset(
    {"Relu", "LeakyRelu", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf", "Softsign", "Mish",
     "ThresholdedRelu", "HardSwish", "Swish", "Sqrt", "Neg", "Abs", "Sign", "Floor", "Ceil",
     "Round", "Sin", "Identity", "Cast", "CastLike", "Dropout"}
)  # fmt: skip
# Binary ops that give 0 when any operand is 0, and when every operand is.
_ZERO_IF_ANY = frozenset({"Mul", "And"})
_ZERO_IF_ALL = frozenset({"Add", "Sub", "Max", "Min", "Sum", "Mean", "Or", "Xor", "PRelu"})


def unary(node: ir.Node, ctx: ChannelWalk) -> None:
    """Element-wise on one tensor: every output has the input's channels on the same axes."""
    for out in node.outputs:
        if out is not None:
            ctx.carry(node.inputs[0], out)


def elementwise(node: ir.Node, ctx: ChannelWalk) -> None:
    """Broadcasting ops: inputs' channels on aligned axes are the same channels.

    A constant operand with that many entries is sliced with them; one with a single entry
    broadcasts. A computed operand without channels there (a model input) freezes them.
    """
    role = {"Add": "shift", "Sub": "shift", "Mul": "scale", "Div": "scale", "PRelu": "scale"}
    inputs = [v for v in node.inputs if v is not None]
    ranks = [ctx.rank(v) for v in inputs]
    if any(r is None for r in ranks):
        if any(ctx.spaces_of(v) for v in inputs):
            raise Unsupported("an operand has unknown rank")
        return
    rank = max(ranks)  # type: ignore[type-var]
    out = node.outputs[0]
    for k in range(rank):
        aligned = [(v, k - (rank - r)) for v, r in zip(inputs, ranks, strict=True) if k >= rank - r]
        found = [ctx.ids(v, a) for v, a in aligned]
        base = next((ids for ids in found if ids is not None and len(ids) > 1), None)
        if base is None:
            # only one-channel spaces here: they carry on unless another operand broadcasts
            # them out to more entries (that axis of the output is then no channel space)
            base = next((ids for ids in found if ids is not None), None)
            if base is not None and all(ctx.dim(v, a) in (1, None) for v, a in aligned):
                ctx.set(out, k, base)
            continue
        for (v, a), ids in zip(aligned, found, strict=True):
            if ids is None:
                if ctx.dim(v, a) == 1:
                    continue
                ids = ctx.space(v, a, role.get(node.op_type, "param"), node)
            if len(ids) == 1 and len(base) > 1:
                continue  # a one-channel space broadcasts; it is never emptied (min keep 1)
            ctx.union(base, ids)
        ctx.set(out, k, base)


def unary_dead(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """The op applied to what the channel holds (0 stays 0 where the op maps 0 to 0)."""
    held = ctx.dead(node.inputs[0])
    if held is None:
        return None
    if held.zero and node.op_type in ZERO_AT_ZERO:
        return ZERO
    rest = tuple(ctx.dead(v) if v is not None else None for v in node.inputs[1:])
    if any(part is None for part, v in zip(rest, node.inputs[1:], strict=True) if v is not None):
        return None
    return Dead(node, (held, *rest))


def elementwise_dead(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """The op applied to what each operand holds in the channel: a product with a zero, a sum
    of zeros, a zero divided or raised to a positive power are zero; other results are the
    expression, the operands without channels taken as they are."""
    op = node.op_type
    parts = [ctx.dead(v) if v is not None else None for v in node.inputs]
    zero = [p is not None and p.zero for p in parts]
    if op in _ZERO_IF_ANY and any(zero):
        return ZERO
    if op == "Div" and zero[0]:
        return ZERO  # a divisor is never zero in a working model (0 / c)
    if op == "Pow" and zero[0] and _positive(node.inputs[1]):
        return ZERO
    if op == "Where" and zero[1:] == [True, True]:
        return ZERO
    if any(p is None for p, v in zip(parts, node.inputs, strict=True) if v is not None):
        return None
    if op in _ZERO_IF_ALL and all(z for z, v in zip(zero, node.inputs, strict=True) if v):
        return ZERO
    return Dead(node, tuple(parts))


def unary_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    return [(0, axis)]


def broadcast_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    """The operands' aligned axes that do not broadcast (a size other than 1)."""
    out_rank = ctx.rank(node.outputs[0])
    if out_rank is None:
        return None
    found = []
    for index, value in enumerate(node.inputs):
        rank = ctx.rank(value)
        if value is None or rank is None:
            return None
        k = axis - (out_rank - rank)
        if k >= 0 and ctx.dim(value, k) != 1:
            found.append((index, k))
    return found or None


def _positive(value: ir.Value | None) -> bool:
    tensor = const_tensor(value)
    return tensor is not None and bool((np.asarray(tensor.numpy()) > 0).all())


def broadcast_output(node: ir.Node, run: RunDims) -> list[int] | None:
    """A broadcasting op's output dims from its operands'."""
    shapes = [run.dims(v) for v in node.inputs if v is not None]
    return None if any(s is None for s in shapes) else broadcast_dims(shapes)  # type: ignore[arg-type]


OPS = (
    *(
        OpInfo(
            op,
            rule=unary,
            output_dims=same_dims if op in FOLLOWED_UNARY else None,
            dead=unary_dead,
            sources=unary_sources,
        )
        for op in UNARY
    ),
    # BitShift's dims are not followed: integer data, never shape arithmetic
    *(
        OpInfo(
            op,
            rule=elementwise,
            output_dims=None if op == "BitShift" else broadcast_output,
            dead=elementwise_dead,
            sources=broadcast_sources,
        )
        for op in BINARY
    ),
)
