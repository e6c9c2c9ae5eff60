"""Shape arithmetic as older exporters write it (Shape -> Gather -> Div -> Concat -> Reshape),
evaluated in numpy with the model's symbolic dims set to a stand-in value.

Evaluating twice with different stand-ins tells which entries depend on those dims (the batch);
channels.prepare folds the rest into constants, so the channel rules see stored shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from onnxprune.channels import Walk


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# Integer ops a shape computation is made of.
SHAPE_MATH = frozenset(
    {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Add", "Sub", "Mul",
     "Div", "Floor", "Ceil", "Equal", "Where", "ConstantOfShape", "Reshape"}
)  # fmt: skip


def shape_value(ctx: Walk, value: ir.Value, unknown: int, memo: dict) -> np.ndarray | None:
    """An integer tensor computed from Shape ops and constants, unknown dims set to `unknown`."""
    if value in memo:
        return memo[value]
    result = None
    const = ctx.const(value)
    node = value.producer()
    if const is not None:
        result = np.asarray(const)
    elif node is not None and node.domain in ("", "ai.onnx"):
        op = node.op_type
        if op == "Shape":
            dims = ctx.shape(node.inputs[0])
            if dims is not None:
                full = np.array([unknown if d is None else d for d in dims], dtype=np.int64)
                rank = len(dims)
                start = _axis(int(_attr(node, "start", 0)), rank)
                result = full[start : _axis(int(_attr(node, "end", rank)), rank)]
        elif op in SHAPE_MATH:
            args = [None if v is None else shape_value(ctx, v, unknown, memo) for v in node.inputs]
            present = [a for v, a in zip(node.inputs, args, strict=True) if v is not None]
            if present and all(a is not None for a in present):
                result = _shape_math(node, args)
    memo[value] = result
    return result


def _shape_math(node: ir.Node, args: list) -> np.ndarray | None:
    """One integer op of a shape computation, in numpy; `args` None where an input is absent."""
    op = node.op_type
    a = args[0]
    if op in ("Cast", "Identity", "Floor", "Ceil"):
        return a
    if op == "Equal":
        return np.equal(a, args[1])
    if op == "Where":
        return np.where(a, args[1], args[2])
    if op == "Reshape":
        return np.reshape(a, [int(t) for t in args[1]])
    if op == "ConstantOfShape":
        fill = _attr(node, "value", None)
        value = fill.numpy().reshape(-1)[0] if fill is not None else np.float32(0)
        return np.full([int(t) for t in a], value)
    if op in ("Add", "Sub", "Mul", "Div"):
        b = args[1]
        if op == "Div":
            return np.floor_divide(a, b) if a.dtype.kind in "iu" else np.floor(a / b)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
    if op == "Gather":
        return np.take(a, args[1], axis=int(_attr(node, "axis", 0)))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(x) for x in args], axis=int(_attr(node, "axis", 0)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "axes", None)
        if op == "Unsqueeze":
            return np.expand_dims(a, tuple(int(x) for x in np.asarray(axes).reshape(-1)))
        return np.squeeze(a) if axes is None else np.squeeze(a, tuple(int(x) for x in axes))
    if op == "Slice" and len(args) >= 3 and all(x is not None for x in args[:3]):
        if len(args) > 3 or a.ndim != 1:
            return None
        return a[int(args[1][0]) : int(args[2][0])]
    return None


# Stand-ins for the symbolic dims: large primes, so that no floor division or remainder of
# everyday shape arithmetic maps two of them to the same value (7 and 11 both // 7 to 1).
STAND_INS = (10007, 20011, 30011)


def _runs(ctx: Walk, value: ir.Value) -> list[np.ndarray] | None:
    runs = [shape_value(ctx, value, u, {}) for u in STAND_INS]
    if any(r is None for r in runs) or len({np.shape(r) for r in runs}) != 1:
        return None
    return [np.asarray(r) for r in runs]


def static_value(ctx: Walk, value: ir.Value) -> np.ndarray | None:
    """A computed integer tensor, if it does not depend on the model's symbolic dims."""
    runs = _runs(ctx, value)
    if runs is None or not all(np.array_equal(runs[0], r) for r in runs[1:]):
        return None
    return runs[0]


def entries(ctx: Walk, value: ir.Value) -> list[int | None] | None:
    """A computed 1-D integer tensor entry by entry: None where it depends on symbolic dims."""
    runs = _runs(ctx, value)
    if runs is None:
        return None
    flat = [r.reshape(-1) for r in runs]
    return [
        int(flat[0][i]) if all(int(f[i]) == int(flat[0][i]) for f in flat) else None
        for i in range(len(flat[0]))
    ]


def static_target(ctx: Walk, node: ir.Node) -> list[int] | None:
    """A Reshape's computed target as a constant: its output dims with every dim that follows
    the unknown ones (the batch) written -1; None unless exactly that is possible."""
    x = node.inputs[0]
    outs = []
    for unknown in STAND_INS:
        target = shape_value(ctx, node.inputs[1], unknown, {})
        shape = ctx.shape(x)
        if target is None or shape is None:
            return None
        dims = [unknown if d is None else d for d in shape]
        target = [int(t) for t in np.asarray(target).reshape(-1)]
        if not _attr(node, "allowzero", 0):
            target = [dims[i] if t == 0 and i < len(dims) else t for i, t in enumerate(target)]
        if target.count(-1) == 1:
            known = int(np.prod([t for t in target if t != -1], dtype=np.int64))
            target[target.index(-1)] = int(np.prod(dims, dtype=np.int64)) // max(1, known)
        outs.append(target)
    if len({len(o) for o in outs}) != 1:
        return None
    static = [column[0] if len(set(column)) == 1 else -1 for column in zip(*outs, strict=True)]
    return static if static.count(-1) <= 1 else None
