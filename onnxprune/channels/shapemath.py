"""Shape arithmetic as exporters write it (Shape -> Gather -> Div -> Concat -> Reshape), evaluated
in numpy with the model's symbolic dims set to stand-in values.

Evaluating three times, each symbolic dim named alike standing in for the same value within a run
and for different values across runs, tells which entries depend on those dims (the batch, the
sequence) and which just copy one of them; channels.prepare folds the rest into constants, so the
channel rules see stored shapes. How each op's output dims follow from its inputs' is the op
registry's (`ops.output_dims`); this module is the engine that evaluates and propagates them.
"""

from __future__ import annotations

from functools import cache
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnxprune import ops
from onnxprune.ops.base import attr, positive_axis
from onnxprune.ops.shape import resolve_target


class Context(Protocol):
    """What shape arithmetic needs of its caller (`channels.Walk`): the model, shapes and
    constants, and where the stand-ins and evaluations of each run are kept."""

    model: ir.Model
    symbols: dict[object, int]  # symbolic dim -> its index among the stand-ins
    memos: list[dict]  # per run: value -> its evaluation (or None)
    run_dims: dict[int, dict[ir.Value, list[int]]]  # per run: value -> its propagated dims

    def const(self, value: ir.Value | None) -> np.ndarray | None: ...
    def shape(self, value: ir.Value | None) -> list[int | None] | None: ...


# Ops a shape computation is made of; Pow and Sqrt make attention's 1 / sqrt(head_dim) scale.
SHAPE_MATH = frozenset(
    {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Add", "Sub", "Mul",
     "Div", "Mod", "Floor", "Ceil", "Equal", "Where", "ConstantOfShape", "Reshape", "Pow", "Sqrt"}
)  # fmt: skip

# Tensors larger than this are data, not shape arithmetic: never read or evaluated.
MAX_ELEMENTS = 1024

RUNS = 3


# Where each run's stand-ins start: far apart, so that floor division by anything everyday
# (up to thousands) still tells the runs apart.
RUN_STARTS = (10007, 20011, 30011)


@cache
def _primes(start: int, n: int) -> tuple[int, ...]:
    """The first n primes from `start` on."""
    limit = 2 * start
    while True:
        sieve = np.ones(limit, dtype=bool)
        sieve[:2] = False
        for p in range(2, int(limit**0.5) + 1):
            if sieve[p]:
                sieve[p * p :: p] = False
        found = np.flatnonzero(sieve)
        found = found[found >= start]
        if len(found) >= n:
            return tuple(int(p) for p in found[:n])
        limit *= 2


def stand_in(ctx: Context, key: object, run: int) -> int:
    """The value of symbolic dim `key` in evaluation `run`: a large prime, distinct for every
    dim within a run and far apart between runs, so that no floor division or remainder of
    everyday shape arithmetic maps two runs to the same value (7 and 11 both // 7 to 1) and no
    entry equals a dim by chance."""
    index = ctx.symbols.setdefault(key, len(ctx.symbols))
    size = 64 * (index // 64 + 1)  # primes made in blocks, not one call per new dim
    return _primes(RUN_STARTS[run], size)[index]


def dims(ctx: Context, value: ir.Value, run: int) -> list[int] | None:
    """The dims of `value` in one run, symbolic ones as stand-ins; None if the rank is unknown.

    Shape inference names a dim it cannot follow afresh (an attention mask built with Range and
    broadcast against the scores leaves the attention output's batch and sequence as new
    names), so the dims are propagated here, once per run for the whole graph, from the model's
    inputs through the ops that attention and shape arithmetic use; elsewhere the inferred shape
    stands, each name one symbolic dim."""
    table = ctx.run_dims.get(run)
    if table is None:
        table = ctx.run_dims[run] = {}
        _propagate(ctx, run, table)
    found = table.get(value)
    return list(found) if found is not None else declared(ctx, value, run)


def declared(ctx: Context, value: ir.Value, run: int) -> list[int] | None:
    """The inferred dims of `value`, a named symbolic dim as its stand-in (an unnamed one is a
    dim of its own)."""
    static = ctx.shape(value)
    if static is None:
        return None
    shape = value.shape if value.shape is not None else [None] * len(static)
    out = []
    for axis, (d, sym) in enumerate(zip(static, shape, strict=True)):
        if d is not None:
            out.append(d)
        else:
            name = getattr(sym, "value", None)
            out.append(stand_in(ctx, name if name else (id(value), axis), run))
    return out


def _propagate(ctx: Context, run: int, table: dict) -> None:
    memo = ctx.memos[run]
    for node in ctx.model.graph:
        if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0] is None:
            continue
        view = _Run(ctx, run, table, memo)
        if node.inputs:
            # stand-ins are numbered in the order symbolic dims are first met: every node meets
            # its first input's first, whatever its op (and whether ops follows its dims)
            view.dims(node.inputs[0])
        found = ops.output_dims(node, view)
        if found is None:
            continue
        out = node.outputs[0]
        inferred = ctx.shape(out)
        if inferred is not None:
            if len(inferred) != len(found):
                continue
            found = [d if d is not None else f for d, f in zip(inferred, found, strict=True)]
        table[out] = found


class _Run:
    """One run's dims and small tensor values, as `ops.output_dims` reads them (ops.RunDims)."""

    def __init__(self, ctx: Context, run: int, table: dict, memo: dict) -> None:
        self.ctx, self.run, self.table, self.memo = ctx, run, table, memo

    def dims(self, value: ir.Value | None) -> list[int] | None:
        if value is None:
            return None
        found = self.table.get(value)
        return list(found) if found is not None else declared(self.ctx, value, self.run)

    def value(self, value: ir.Value) -> np.ndarray | None:
        return shape_value(self.ctx, value, self.run, self.memo)


def _small(value: ir.Value) -> bool:
    """Whether `value` may be shape arithmetic: a static shape of at most MAX_ELEMENTS entries,
    an integer vector (a slice of a shape whose length inference left unknown), or an unknown
    shape."""
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return True
    if len(shape) <= 1 and value.dtype in (ir.DataType.INT64, ir.DataType.INT32):
        return True
    if any(not isinstance(d, int) for d in shape):
        return False
    return int(np.prod(list(shape), dtype=np.int64)) <= MAX_ELEMENTS


def shape_value(ctx: Context, value: ir.Value, run: int, memo: dict) -> np.ndarray | None:
    """A small tensor computed from Shape ops and constants, symbolic dims at their stand-ins."""
    if value in memo:
        return memo[value]
    result = None
    node = value.producer()
    if _small(value):
        const = ctx.const(value)
        if const is not None:
            result = np.asarray(const)
        elif node is not None and node.domain in ("", "ai.onnx"):
            op = node.op_type
            if op == "Shape":
                full = dims(ctx, node.inputs[0], run)
                if full is not None:
                    rank = len(full)
                    start = positive_axis(int(attr(node, "start", 0)), rank)
                    end = positive_axis(int(attr(node, "end", rank)), rank)
                    result = np.array(full[start:end], dtype=np.int64)
            elif op in SHAPE_MATH:
                args = [None if v is None else shape_value(ctx, v, run, memo) for v in node.inputs]
                present = [a for v, a in zip(node.inputs, args, strict=True) if v is not None]
                if present and all(a is not None for a in present) and _defined(ctx, node):
                    result = _shape_math(node, args)
    memo[value] = result
    return result


def _defined(ctx: Context, node: ir.Node) -> bool:
    """Whether the stand-ins can tell what this op makes: a remainder of a symbolic dim (a
    window padding, (7 - H % 7) % 7) takes few values, so three runs can agree by chance; it is
    evaluated only where its dividend is the same in every run."""
    if node.op_type != "Mod":
        return True
    runs = [shape_value(ctx, node.inputs[0], r, ctx.memos[r]) for r in range(RUNS)]
    return all(r is not None and np.array_equal(r, runs[0]) for r in runs)


def _shape_math(node: ir.Node, args: list) -> np.ndarray | None:
    """One op of a shape computation, in numpy; `args` None where an input is absent."""
    op = node.op_type
    a = args[0]
    if op == "Identity" or (op in ("Floor", "Ceil") and a.dtype.kind != "f"):
        return a
    if op in ("Floor", "Ceil"):
        return np.floor(a) if op == "Floor" else np.ceil(a)
    if op == "Cast":
        return a.astype(ir.DataType(int(attr(node, "to", 1))).numpy())
    if op == "Sqrt":
        return np.sqrt(a)
    if op == "Equal":
        return np.equal(a, args[1])
    if op == "Where":
        return np.where(a, args[1], args[2])
    if op == "Reshape":
        target = [int(t) for t in args[1]]
        target = [a.shape[i] if t == 0 and i < a.ndim else t for i, t in enumerate(target)]
        return np.reshape(a, target)
    if op == "ConstantOfShape":
        fill = attr(node, "value", None)
        value = fill.numpy().reshape(-1)[0] if fill is not None else np.float32(0)
        return np.full([int(t) for t in a], value)
    if op in ("Add", "Sub", "Mul", "Div", "Pow", "Mod"):
        b = args[1]
        if op == "Div":
            out = np.floor_divide(a, b) if a.dtype.kind in "iu" else a / b
        elif op == "Mod" and attr(node, "fmod", 0):
            out = np.fmod(a, b)
        else:
            ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power}
            out = ops.get(op, np.mod)(a, b)
        return np.asarray(out).astype(a.dtype)
    if op == "Gather":
        return np.take(a, args[1], axis=int(attr(node, "axis", 0)))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(x) for x in args], axis=int(attr(node, "axis", 0)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = args[1] if len(args) > 1 and args[1] is not None else attr(node, "axes", None)
        if op == "Unsqueeze":
            return np.expand_dims(a, tuple(int(x) for x in np.asarray(axes).reshape(-1)))
        return np.squeeze(a) if axes is None else np.squeeze(a, tuple(int(x) for x in axes))
    if op == "Slice" and len(args) >= 3 and all(x is not None for x in args[:3]) and a.ndim == 1:
        axes, steps = (args[i] if len(args) > i else None for i in (3, 4))
        if axes is not None and [int(x) for x in axes] not in ([0], [-1]):
            return None
        if steps is not None and [int(x) for x in steps] != [1]:
            return None
        return a[int(args[1][0]) : int(args[2][0])]
    return None


def _runs(
    ctx: Context, value: ir.Value, memos: list[dict] | None = None
) -> list[np.ndarray] | None:
    memos = memos or ctx.memos
    runs = [shape_value(ctx, value, r, memos[r]) for r in range(RUNS)]
    if any(r is None for r in runs) or len({np.shape(r) for r in runs}) != 1:
        return None
    return [np.asarray(r) for r in runs]


def static_value(
    ctx: Context, value: ir.Value, memos: list[dict] | None = None
) -> np.ndarray | None:
    """A computed tensor, if it does not depend on the model's symbolic dims."""
    runs = _runs(ctx, value, memos)
    if runs is None or not all(np.array_equal(runs[0], r) for r in runs[1:]):
        return None
    return runs[0]


def evaluable(ctx: Context, value: ir.Value, memos: list[dict]) -> bool:
    """Whether `value` is shape arithmetic at all (static or not)."""
    return shape_value(ctx, value, 0, memos[0]) is not None


def entries(ctx: Context, value: ir.Value) -> list[int | None] | None:
    """A computed 1-D integer tensor entry by entry: None where it depends on symbolic dims."""
    runs = _runs(ctx, value)
    if runs is None:
        return None
    flat = [r.reshape(-1) for r in runs]
    return [
        int(flat[0][i]) if all(int(f[i]) == int(flat[0][i]) for f in flat) else None
        for i in range(len(flat[0]))
    ]


def static_target(
    ctx: Context, node: ir.Node, memos: list[dict] | None = None
) -> tuple[list[int], bool] | None:
    """A Reshape's computed target as a constant, and whether it copies input dims (entries 0,
    which need allowzero 0). An entry that is a symbolic dim of the input at the same position is
    written 0 (the batch and sequence of [B, S, 768] -> [B, S, 12, 64]); at most one other entry
    may depend on the symbolic dims, written -1; None unless exactly that is possible."""
    memos = memos or ctx.memos
    x = node.inputs[0]
    allowzero = bool(attr(node, "allowzero", 0))
    outs, ins = [], []
    for run in range(RUNS):
        target = shape_value(ctx, node.inputs[1], run, memos[run])
        shape = dims(ctx, x, run)
        if target is None or shape is None or np.asarray(target).ndim != 1:
            return None
        target = resolve_target(shape, [int(t) for t in np.asarray(target)], allowzero)
        outs.append(target)
        ins.append(shape)
    if len({len(o) for o in outs}) != 1:
        return None
    columns = list(zip(*outs, strict=True))
    static = [column[0] if len(set(column)) == 1 else None for column in columns]
    # a literal 0 with allowzero set would become a copy if allowzero were cleared
    copies = not (allowzero and 0 in static)
    result = []
    for i, column in enumerate(columns):
        if static[i] is not None:
            result.append(static[i])
        elif (
            copies and i < len(ins[0]) and all(c == s[i] for c, s in zip(column, ins, strict=True))
        ):
            result.append(0)
        else:
            result.append(-1)
    if result.count(-1) > 1:
        return None
    return result, any(r == 0 and static[i] is None for i, r in enumerate(result))
