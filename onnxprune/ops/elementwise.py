"""Element-wise ops: unary ones (activations, casts, Identity, Dropout) and broadcasting ones
(arithmetic, comparisons, logic, Where, PRelu).

What the family shares: channels stay on their axes. A unary op's output has its input's channels;
broadcasting operands' channels on aligned axes are the same channels, so a residual Add links
them, and a stored operand with one entry per channel (a bias, a scale) is sliced with them.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.ops.base import ChannelWalk, OpInfo, RunDims, Unsupported, broadcast_dims, same_dims

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
     "Swish", "Reciprocal"}
)  # fmt: skip


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


def broadcast_output(node: ir.Node, run: RunDims) -> list[int] | None:
    """A broadcasting op's output dims from its operands'."""
    shapes = [run.dims(v) for v in node.inputs if v is not None]
    return None if any(s is None for s in shapes) else broadcast_dims(shapes)  # type: ignore[arg-type]


OPS = (
    *(
        OpInfo(op, rule=unary, output_dims=same_dims if op in FOLLOWED_UNARY else None)
        for op in UNARY
    ),
    # BitShift's dims are not followed: integer data, never shape arithmetic
    *(
        OpInfo(op, rule=elementwise, output_dims=None if op == "BitShift" else broadcast_output)
        for op in BINARY
    ),
)
