"""Matrix products: Gemm, MatMul and Einsum.

What the family shares: a contraction over the last axis of the left operand, so a stored
operand's contracted axis holds input channels and its other axis output channels; between two
computed tensors (attention's Q K^T and its product with V) the contracted axes are one channel
space and the others carry over. Gemm honours transA/transB (and alpha, which scales the rows
calibration builds), MatMul flattens every leading axis into rows. Einsum has a channel rule only:
its weights are not found as prunable weights.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxprune.ops.base import (
    ChannelWalk,
    Dead,
    Design,
    Dims,
    OpInfo,
    RunDims,
    Unsupported,
    UseLike,
    WeightLike,
    attr,
    attr_float,
    attr_int,
    broadcast_dims,
    broadcast_exact,
    input_at,
)
from onnxprune.ops.dead import keeps_zero, makes_zero


# -- weights ---------------------------------------------------------------------------------------
def gemm_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """A stored Gemm operand [2-D]: B' = B (or B^T with transB) is [in, out]; a stored A'
    (A, or A^T with transA) is [out, in], its rows the outputs."""
    if rank != 2:
        return None
    if index == 1:
        return (0, 1) if attr_int(node, "transB", 0) else (1, 0)
    if index == 0:
        return (1, 0) if attr_int(node, "transA", 0) else (0, 1)
    return None


def matmul_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """A stored MatMul operand: on the right [..., in, out], on the left [..., out, in]."""
    if index == 1:
        return rank - 1, rank - 2
    if index == 0:
        return rank - 2, rank - 1
    return None


# -- channels --------------------------------------------------------------------------------------
def gemm(node: ir.Node, ctx: ChannelWalk) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if not ctx.is_const(w) or ctx.is_const(a):
        raise Unsupported("only activation x stored weight is pruned")
    ka = 0 if attr(node, "transA", 0) else 1
    kw = 1 if attr(node, "transB", 0) else 0
    o = ctx.space(w, 1 - kw, "out", node)
    ctx.union(ctx.space(a, ka, "in", node), ctx.space(w, kw, "in", node))
    out = node.outputs[0]
    ctx.set(out, 1, o)
    rows = ctx.ids(a, 1 - ka)
    if rows is not None:
        ctx.set(out, 0, rows)
    if c is not None:
        if not ctx.is_const(c):
            raise Unsupported("bias is computed, not stored")
        cshape = ctx.shape(c) or []
        if cshape and cshape[-1] == len(o) and len(o) > 1:
            ctx.union(o, ctx.space(c, len(cshape) - 1, "bias", node))
        if len(cshape) == 2 and cshape[0] != 1:
            raise Unsupported("a full-matrix bias is not pruned")


def matmul(node: ir.Node, ctx: ChannelWalk) -> None:
    """x @ W with W stored: W's rows are input channels, its columns output channels. Between two
    computed tensors (attention), the contracted axes are one space and the rest carry over."""
    a, b = node.inputs
    ra, rb = ctx.rank(a), ctx.rank(b)
    out = node.outputs[0]
    ro = ctx.rank(out)
    if ra is None or rb is None or ra < 2 or rb < 2:
        raise Unsupported("unknown or vector rank")
    ro = max(ra, rb) if ro is None else ro
    if ctx.is_const(b) and rb == 2 and not ctx.is_const(a):
        ctx.union(ctx.space(a, ra - 1, "in", node), ctx.space(b, 0, "in", node))
        ctx.set(out, ro - 1, ctx.space(b, 1, "out", node))
        for axis, ids in ctx.spaces_of(a).items():
            if axis < ra - 1:
                ctx.set(out, axis + ro - ra, ids)
        return
    if ctx.is_const(a) or ctx.is_const(b):
        raise Unsupported("a stored left operand or batched stored weight is not pruned")
    ka, kb = ctx.ids(a, ra - 1), ctx.ids(b, rb - 2)
    if ka is not None or kb is not None:
        ctx.union(ctx.space(a, ra - 1, "in", node), ctx.space(b, rb - 2, "in", node))
    rows, cols = ctx.ids(a, ra - 2), ctx.ids(b, rb - 1)
    if rows is not None:
        ctx.set(out, ro - 2, rows)
    if cols is not None:
        ctx.set(out, ro - 1, cols)
    for v, r in ((a, ra), (b, rb)):
        for axis, ids in ctx.spaces_of(v).items():
            if axis < r - 2:
                ctx.set(out, axis + ro - r, ids)


def einsum(node: ir.Node, ctx: ChannelWalk) -> None:
    """Each letter is one space: its axes in every operand are linked, and it carries into the
    output when the output names it; a summed letter only links (a zero channel adds nothing)."""
    equation = str(attr(node, "equation", "")).replace(" ", "")
    if "->" not in equation or "." in equation:
        raise Unsupported(f"equation {equation!r} is implicit or uses an ellipsis")
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(node.inputs) or any(len(set(t)) != len(t) for t in [*terms, rhs]):
        raise Unsupported(f"equation {equation!r} repeats a letter within an operand")
    for letter in dict.fromkeys(lhs.replace(",", "")):
        places = [
            (v, t.index(letter)) for v, t in zip(node.inputs, terms, strict=True) if letter in t
        ]
        if all(ctx.ids(v, a) is None for v, a in places):
            continue
        spaces = [ctx.space(v, a, "in", node) for v, a in places if ctx.dim(v, a) != 1]
        if not spaces:
            continue
        for ids in spaces[1:]:
            ctx.union(spaces[0], ids)
        if letter in rhs:
            ctx.set(node.outputs[0], rhs.index(letter), spaces[0])


def matmul_dead(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """A layer's removed output channels are zero; between two computed tensors, a product with
    a removed channel that is zero is zero."""
    if any(ctx.is_const(v) for v in node.inputs):
        return makes_zero(node, ctx)
    return keeps_zero(node, ctx)


def matmul_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    """Between two computed tensors: the output's rows are the left operand's, its columns the
    right one's (Optimum's RoPE: inv_freq [b, d/2, 1] @ positions [b, 1, s])."""
    a, b = node.inputs
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(node.outputs[0])
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        return None
    if axis == ro - 2:
        return [(0, ra - 2)]
    if axis == ro - 1:
        return [(1, rb - 1)]
    return None


# -- multiply-accumulates --------------------------------------------------------------------------
def matmul_macs(node: ir.Node, dims: Dims) -> int | None:
    a, b = dims(input_at(node, 0)), dims(input_at(node, 1))
    if a is None or b is None or not a or not b:
        return None
    a = (1, *a) if len(a) == 1 else a  # a vector on the left is one row
    b = (*b, 1) if len(b) == 1 else b  # on the right, one column
    batch = broadcast_exact(a[:-2], b[:-2])
    if batch is None or a[-1] != b[-2]:
        return None
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def gemm_macs(node: ir.Node, dims: Dims) -> int | None:
    a, b = dims(input_at(node, 0)), dims(input_at(node, 1))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else a
    n = b[0] if attr(node, "transB", 0) else b[1]
    return m * k * n  # C (the bias) is an addition, not a multiply-accumulate


# -- calibration design ----------------------------------------------------------------------------
def matrix_design(
    weight: WeightLike,
    use: UseLike,
    activation: ir.Value,
    transpose_rows: bool,
    out_axis: int,
    op: str,
    scale: float = 1.0,
) -> Design:
    """A rank-2 weight used as W [out, in] (axes from the use), rows of the activation's last
    axis (or of its second-to-last when the weight stands on the left of the product).

    `scale` (Gemm's alpha) multiplies the rows, so rows @ W.T is still the layer's output."""
    out_axis_w, in_axis_w = use.out_axis, use.in_axis
    assert out_axis_w is not None and in_axis_w is not None
    n_out, n_in = weight.shape[out_axis_w], weight.shape[in_axis_w]
    transposed = (out_axis_w, in_axis_w) == (1, 0)

    def to_matrix(w: np.ndarray) -> np.ndarray:
        return (w.T if transposed else w)[None]

    def from_matrix(m: np.ndarray) -> np.ndarray:
        return m[0].T if transposed else m[0]

    def rows(x: np.ndarray, sample: bool = False) -> list[np.ndarray]:
        if transpose_rows and x.ndim > 1:  # a vector on the right of W @ v is one row
            x = np.swapaxes(x, -1, -2)
        # the width from the activation, not the weight: a pruned layer's rows are paired with
        # the dense model's, which still has the removed channels
        x = x.reshape(1, -1, x.shape[-1])
        return [x * np.asarray(scale, dtype=x.dtype) if scale != 1.0 else x]

    return Design(
        activation=activation,
        groups=1,
        out_features=n_out,
        in_features=n_in,
        signature=(op, transpose_rows, scale),
        rows=rows,
        to_matrix=to_matrix,
        from_matrix=from_matrix,
        out_axis=out_axis,
        layout=("matrix", transposed),
    )


def gemm_design(weight: WeightLike, use: UseLike) -> Design | None:
    node = use.node
    if len(weight.shape) != 2 or use.out_axis is None or use.in_axis is None:
        return None
    alpha = attr_float(node, "alpha", 1.0)
    if use.input_index == 1:  # Y = alpha A' B' (+ beta C): rows of A' (A, or A^T with transA)
        transposed = bool(attr_int(node, "transA", 0))
        return matrix_design(weight, use, node.inputs[0], transposed, 1, "Gemm", alpha)
    # a constant A: its rows are the outputs; the inputs are the columns of B'
    transposed = not attr_int(node, "transB", 0)
    return matrix_design(weight, use, node.inputs[1], transposed, 0, "Gemm-left", alpha)


def matmul_design(weight: WeightLike, use: UseLike) -> Design | None:
    if len(weight.shape) != 2 or use.out_axis is None or use.in_axis is None:
        return None
    node = use.node
    if use.input_index == 1:
        return matrix_design(weight, use, node.inputs[0], False, -1, "MatMul")
    return matrix_design(weight, use, node.inputs[1], True, -2, "MatMul-left")


# -- output dims for shape folding -----------------------------------------------------------------
def matmul_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    y = run.dims(node.inputs[1])
    if y is None or len(x) < 2 or len(y) < 2:
        return None
    return [*broadcast_dims([x[:-2], y[:-2]]), x[-2], y[-1]]


def gemm_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    y = run.dims(node.inputs[1])
    if y is None or len(x) != 2 or len(y) != 2:
        return None
    return [x[1 if attr(node, "transA", 0) else 0], y[0 if attr(node, "transB", 0) else 1]]


OPS = (
    OpInfo(
        "Gemm",
        weight_inputs=(0, 1),
        weight_axes=gemm_axes,
        rule=gemm,
        macs=gemm_macs,
        design=gemm_design,
        output_dims=gemm_dims,
        dead=makes_zero,
    ),
    OpInfo(
        "MatMul",
        weight_inputs=(0, 1),
        weight_axes=matmul_axes,
        rule=matmul,
        macs=matmul_macs,
        design=matmul_design,
        output_dims=matmul_dims,
        dead=matmul_dead,
        sources=matmul_sources,
    ),
    OpInfo("Einsum", rule=einsum, dead=keeps_zero),
)
