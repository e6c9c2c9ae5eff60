"""Per-op design matrices: how one use of a weight turns its input activation into rows X.

For every use of a weight the table below gives a `Design`: the weight as matrices W [G, O, K]
(G groups, O output features per group, K input features per group) and, for a batch of the
layer's input activation, rows X [G, n, K] such that X[g] @ W[g].T is the layer's output for
group g (bias left out). Conv uses im2col patches honouring strides, pads (explicit or auto_pad),
dilations and groups; ConvTranspose the patches of the stride-1 convolution it equals (the input
with zeros between its samples, padded per pads, output_padding, output_shape or auto_pad; the
kernel flipped, its in/out axes swapped); Gemm honours transA/transB; MatMul flattens every
leading dimension.
Calibration statistics (X^T X, row sums) and every reconstruction work in this layout, so the
solvers never need to know which op they serve.

Conv and ConvTranspose columns are ordered (kernel position, channel): M consecutive columns are M
consecutive input channels at one kernel position, so an N:M pattern along the input-channel axis
is a pattern over consecutive columns, as it is for Gemm and MatMul.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.weights import RECURRENT_OPS, Use, Weight

# Elements of im2col patches built at once; bounds the temporary memory of a Conv's rows.
PATCH_ELEMENTS = 1 << 24


def statistic_positions(k: int) -> int:
    """Output positions per sample a Conv's statistics use: 8 rows per input feature, at least
    1024 (ResNet-50's stem, 147 inputs at 112x112 = 12,544 positions, keeps 1,176; a 28x28 map
    keeps all). Fewer rows than that estimate X^T X no worse than the samples themselves allow."""
    return max(8 * k, 1024)


@dataclass(frozen=True)
class Design:
    """One use of a weight seen as a (grouped) matrix product.

    `signature` identifies designs that give the same rows from the same activation, so layers
    that read one tensor the same way (attention's Q, K and V) share one set of statistics.
    """

    activation: ir.Value  # the layer's input that X is built from
    groups: int
    out_features: int  # per group
    in_features: int  # per group
    signature: tuple
    # activation -> chunks of X [G, n, K]; sample=True: the rows statistics use (a Conv keeps at
    # most STATISTIC_POSITIONS(K) output positions per sample)
    rows: Callable[..., list[np.ndarray]]
    to_matrix: Callable[[np.ndarray], np.ndarray]  # stored weight -> [G, O, K]
    from_matrix: Callable[[np.ndarray], np.ndarray]  # [G, O, K] -> stored layout
    out_axis: int  # axis of the node's output that carries the G*O output features (bias axis)
    layout: tuple  # what to_matrix does; uses of one shared weight must agree on it


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return [int(v) for v in attr.value] if attr is not None else list(default)


def _float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.value) if attr is not None else default


def _str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def conv_pads(
    spatial: tuple[int, ...],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    auto_pad: str,
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, resolving auto_pad as the ONNX Conv spec does."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return [
            _split_pad(max((math.ceil(size / s) - 1) * s + (k - 1) * dil + 1 - size, 0), auto_pad)
            for size, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True)
        ]
    return _explicit_pads(pads, len(kernel), auto_pad)


def _split_pad(total: int, auto_pad: str) -> tuple[int, int]:
    """A total padding as (begin, end): the odd one at the end for SAME_UPPER, else at the start
    (SAME_LOWER, and ConvTranspose's output_shape without auto_pad)."""
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def _explicit_pads(pads: list[int], d: int, auto_pad: str) -> list[tuple[int, int]]:
    """(begin, end) per axis from `pads` ([begins..., ends...]); none for VALID or when absent."""
    if auto_pad == "VALID":
        return [(0, 0)] * d
    pads = pads or [0] * (2 * d)
    return [(pads[i], pads[i + d]) for i in range(d)]


def conv_rows(
    x: np.ndarray,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    auto_pad: str,
    groups: int,
    cap: int | None = None,
) -> list[np.ndarray]:
    """im2col of a Conv input [N, C, *spatial]: chunks of rows [G, n, K*C/G], a few samples each.

    Row order is (sample, output position); column order (kernel position, channel of the group).
    `cap`: at most this many output positions per sample, the same fixed-seed subset for every
    sample (statistics of layers with far more positions than inputs need not see them all).
    """
    n_samples, channels, *spatial = x.shape
    pad = conv_pads(tuple(spatial), kernel, strides, dilations, pads, auto_pad)
    padded_dims = [s + b + e for s, (b, e) in zip(spatial, pad, strict=True)]
    out_dims = [
        (p - dil * (k - 1) - 1) // s + 1
        for p, k, s, dil in zip(padded_dims, kernel, strides, dilations, strict=True)
    ]
    positions = math.prod(out_dims)
    k_total = math.prod(kernel)
    per_sample = positions * k_total * channels
    step = max(1, PATCH_ELEMENTS // max(1, per_sample))
    c_group = channels // groups
    chosen = None
    if cap is not None and positions > cap:
        chosen = np.sort(np.random.default_rng(positions).choice(positions, cap, replace=False))
    chunks = []
    for start in range(0, n_samples, step):
        part = x[start : start + step]
        padded = np.pad(part, [(0, 0), (0, 0), *pad]) if any(b or e for b, e in pad) else part
        taken = []
        for offsets in itertools.product(*(range(k) for k in kernel)):
            index = tuple(
                slice(o * dil, o * dil + s * (od - 1) + 1, s)
                for o, dil, s, od in zip(offsets, dilations, strides, out_dims, strict=True)
            )
            taken.append(padded[(slice(None), slice(None), *index)])
        patches = np.stack(taken, axis=1)  # [n, K, C, *out]
        n = patches.shape[0]
        patches = patches.reshape(n, k_total, groups, c_group, positions)
        if chosen is not None:
            patches = patches[..., chosen]
        kept = patches.shape[-1]
        # -> [G, n, positions, K, Cg] -> [G, n*positions, K*Cg]
        rows = patches.transpose(2, 0, 4, 1, 3).reshape(groups, n * kept, k_total * c_group)
        chunks.append(rows)
    return chunks


def _conv(weight: Weight, use: Use) -> Design | None:
    node = use.node
    shape = weight.shape
    if use.input_index != 1 or use.out_axis != 0 or use.in_axis != 1 or "Transpose" in use.via:
        return None
    groups = _int(node, "group", 1)
    out_channels, c_group, *kernel = shape
    if not kernel or out_channels % groups:
        return None
    d = len(kernel)
    strides = _ints(node, "strides", [1] * d)
    dilations = _ints(node, "dilations", [1] * d)
    pads = _ints(node, "pads", [0] * (2 * d))
    auto_pad = _str(node, "auto_pad", "NOTSET")
    o_group = out_channels // groups
    k_total = math.prod(kernel)

    def to_matrix(w: np.ndarray) -> np.ndarray:
        w = w.reshape(groups, o_group, c_group, k_total)
        return w.transpose(0, 1, 3, 2).reshape(groups, o_group, k_total * c_group)

    def from_matrix(m: np.ndarray) -> np.ndarray:
        m = m.reshape(groups, o_group, k_total, c_group).transpose(0, 1, 3, 2)
        return m.reshape(shape)

    return Design(
        activation=node.inputs[0],
        groups=groups,
        out_features=o_group,
        in_features=k_total * c_group,
        signature=(
            "Conv",
            tuple(kernel),
            tuple(strides),
            tuple(dilations),
            tuple(pads),
            auto_pad,
            groups,
        ),
        rows=lambda x, sample=False: conv_rows(
            x,
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
            groups,
            statistic_positions(k_total * c_group) if sample else None,
        ),
        to_matrix=to_matrix,
        from_matrix=from_matrix,
        out_axis=1,
        layout=("conv", groups),
    )


def conv_transpose_pads(
    spatial: tuple[int, ...],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    auto_pad: str,
    output_padding: list[int],
    output_shape: list[int],
) -> list[tuple[int, int]]:
    """(begin, end) padding of a ConvTranspose per spatial axis, as the ONNX spec resolves it.

    An explicit output_shape (or SAME_UPPER/SAME_LOWER, whose output is input * stride) sets the
    total padding, full output - wanted output, split with the odd one at the end for SAME_UPPER
    and at the start otherwise; output_shape overrides pads. VALID pads nothing. ONNX Runtime
    (1.31) pads the same way; the reference implementation ignores output_shape's padding rule
    unless auto_pad is SAME_*.
    """
    wanted: list[int] | None = None
    if output_shape:
        wanted = list(output_shape)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [size * s for size, s in zip(spatial, strides, strict=True)]
    if wanted is not None:
        return [
            _split_pad(s * (size - 1) + extra + (k - 1) * dil + 1 - want, auto_pad)
            for size, k, s, dil, extra, want in zip(
                spatial, kernel, strides, dilations, output_padding, wanted, strict=True
            )
        ]
    return _explicit_pads(pads, len(kernel), auto_pad)


def conv_transpose_rows(
    x: np.ndarray,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    auto_pad: str,
    output_padding: list[int],
    output_shape: list[int],
    groups: int,
    cap: int | None = None,
) -> list[np.ndarray]:
    """Rows of a ConvTranspose input [N, C, *spatial]: im2col of the stride-1 convolution it is.

    A transposed convolution is a stride-1 convolution (same dilations and groups, kernel flipped
    along every spatial axis, its in/out axes swapped) of the input with stride - 1 zeros between
    neighbouring samples, padded by dilation * (kernel - 1) - pad_begin at the start and
    dilation * (kernel - 1) - pad_end + output_padding at the end (negative: cropped). That input
    is built only for the few samples `conv_rows` takes at once (PATCH_ELEMENTS), never for the
    whole batch, and handed to it; rows, columns and the `cap` subset are as there.
    """
    n_samples, channels, *spatial = x.shape
    pad = conv_transpose_pads(
        tuple(spatial), kernel, strides, dilations, pads, auto_pad, output_padding, output_shape
    )
    reach = [dil * (k - 1) for k, dil in zip(kernel, dilations, strict=True)]
    begin = [r - b for r, (b, _) in zip(reach, pad, strict=True)]
    sizes = [
        (size - 1) * s + 1 + lo + r - e + extra
        for size, s, lo, r, (_, e), extra in zip(
            spatial, strides, begin, reach, pad, output_padding, strict=True
        )
    ]
    positions = math.prod(max(0, p - r) for p, r in zip(sizes, reach, strict=True))
    step = max(1, PATCH_ELEMENTS // max(1, positions * math.prod(kernel) * channels))
    # where the input's samples land in the zero-stuffed, padded input (those that land inside)
    target, source = [], []
    for size, s, lo, p in zip(spatial, strides, begin, sizes, strict=True):
        first = max(0, -(lo // s))
        last = min(size - 1, (p - 1 - lo) // s)
        target.append(slice(lo + first * s, lo + last * s + 1, s) if last >= first else slice(0))
        source.append(slice(first, last + 1) if last >= first else slice(0))
    d = len(kernel)
    chunks = []
    for start in range(0, n_samples, step):
        part = x[start : start + step]
        stuffed = np.zeros((part.shape[0], channels, *(max(0, p) for p in sizes)), part.dtype)
        stuffed[(slice(None), slice(None), *target)] = part[(slice(None), slice(None), *source)]
        chunks.extend(
            conv_rows(stuffed, kernel, [1] * d, dilations, [0] * (2 * d), "NOTSET", groups, cap)
        )
    return chunks


def _conv_transpose(weight: Weight, use: Use) -> Design | None:
    """ConvTranspose: weight [C, O/G, *kernel], rows of the stride-1 convolution it equals
    (`conv_transpose_rows`), the matrix the flipped kernel [G, O/G, kernel position * C/G].

    Strides, pads, output_padding, output_shape, auto_pad, dilations and groups are honoured.
    No design (None) for a weight reached through a Transpose, a kernel_shape that is not the
    weight's, pads given together with auto_pad (an invalid node), and SAME_UPPER/SAME_LOWER
    where input * stride is longer than the whole transposed output (negative padding: ONNX
    Runtime then clamps the padding to zero and gives a shorter output than the spec's).
    """
    node = use.node
    shape = weight.shape
    if use.input_index != 1 or use.out_axis != 1 or use.in_axis != 0 or "Transpose" in use.via:
        return None
    groups = _int(node, "group", 1)
    in_channels, o_group, *kernel = shape
    if not kernel or groups < 1 or in_channels % groups:
        return None
    d = len(kernel)
    if _ints(node, "kernel_shape", kernel) != kernel:
        return None
    strides = _ints(node, "strides", [1] * d)
    dilations = _ints(node, "dilations", [1] * d)
    pads = _ints(node, "pads", [])
    auto_pad = _str(node, "auto_pad", "NOTSET")
    output_padding = _ints(node, "output_padding", [0] * d)
    output_shape = _ints(node, "output_shape", [])
    if len(strides) != d or len(dilations) != d or len(output_padding) != d:
        return None
    if pads and (len(pads) != 2 * d or (auto_pad != "NOTSET" and any(pads))):
        return None
    if output_shape and len(output_shape) != d:
        return None
    if (
        not output_shape
        and auto_pad in ("SAME_UPPER", "SAME_LOWER")
        and any(
            extra + (k - 1) * dil + 1 < s
            for k, s, dil, extra in zip(kernel, strides, dilations, output_padding, strict=True)
        )
    ):
        return None
    c_group = in_channels // groups
    k_total = math.prod(kernel)
    spatial_axes = tuple(range(3, 3 + d))

    def to_matrix(w: np.ndarray) -> np.ndarray:
        w = np.flip(w.reshape(groups, c_group, o_group, *kernel), spatial_axes)
        w = w.transpose(0, 2, *spatial_axes, 1)  # [G, O/G, *kernel, C/G]
        return w.reshape(groups, o_group, k_total * c_group)

    def from_matrix(m: np.ndarray) -> np.ndarray:
        m = m.reshape(groups, o_group, *kernel, c_group)
        m = np.flip(m.transpose(0, d + 2, 1, *range(2, d + 2)), spatial_axes)
        return m.reshape(shape)

    return Design(
        activation=node.inputs[0],
        groups=groups,
        out_features=o_group,
        in_features=k_total * c_group,
        signature=(
            "ConvTranspose",
            tuple(kernel),
            tuple(strides),
            tuple(dilations),
            tuple(pads),
            auto_pad,
            tuple(output_padding),
            tuple(output_shape),
            groups,
        ),
        rows=lambda x, sample=False: conv_transpose_rows(
            x,
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
            output_padding,
            output_shape,
            groups,
            statistic_positions(k_total * c_group) if sample else None,
        ),
        to_matrix=to_matrix,
        from_matrix=from_matrix,
        out_axis=1,
        layout=("conv-transpose", groups),
    )


def _matrix_design(
    weight: Weight,
    use: Use,
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


def _gemm(weight: Weight, use: Use) -> Design | None:
    node = use.node
    if len(weight.shape) != 2 or use.out_axis is None or use.in_axis is None:
        return None
    alpha = _float(node, "alpha", 1.0)
    if use.input_index == 1:  # Y = alpha A' B' (+ beta C): rows of A' (A, or A^T with transA)
        transposed = bool(_int(node, "transA", 0))
        return _matrix_design(weight, use, node.inputs[0], transposed, 1, "Gemm", alpha)
    # a constant A: its rows are the outputs; the inputs are the columns of B'
    transposed = not _int(node, "transB", 0)
    return _matrix_design(weight, use, node.inputs[1], transposed, 0, "Gemm-left", alpha)


def _matmul(weight: Weight, use: Use) -> Design | None:
    if len(weight.shape) != 2 or use.out_axis is None or use.in_axis is None:
        return None
    node = use.node
    if use.input_index == 1:
        return _matrix_design(weight, use, node.inputs[0], False, -1, "MatMul")
    return _matrix_design(weight, use, node.inputs[1], True, -2, "MatMul-left")


# One rule per op: how a use of a weight reads its input. An op without a rule gets no
# calibration statistics, and its weights fall back to magnitude.
DESIGNS: dict[str, Callable[[Weight, Use], Design | None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


# Calibration re-solves weights in float and compensation shifts biases in float; a quantized
# layer's new values would leave its quantization grid, so it gets no design: calibration ranks
# it by magnitude and only zeroes it, compensation leaves it as it is.
QUANTIZED_REASON = (
    "quantized weights ({dtype} behind DequantizeLinear) are not calibrated nor compensated: "
    "re-solved values would leave the quantization grid (prune the float model, then quantize)"
)


def design_of(weight: Weight) -> tuple[list[Design], str | None]:
    """The designs of every use of a weight, or the reason it has none.

    A weight shared by several nodes has one design per use; their statistics add up (the error
    to minimise is the sum over uses), which needs every use to see the weight the same way.
    """
    if weight.quant is not None:
        return [], QUANTIZED_REASON.format(dtype=weight.dtype.name.lower())
    designs = []
    for use in weight.uses:
        rule = DESIGNS.get(use.node.op_type)
        design = rule(weight, use) if rule is not None else None
        if design is None:
            op = use.node.op_type
            if rule is not None:
                why = f"{op} {use.node.name!r} reads it in a layout calibration does not cover"
            elif op in RECURRENT_OPS:
                why = (
                    f"{op} weights are not calibrated (a recurrent layer reads its own state "
                    "step by step: no design X with X @ W its output)"
                )
            else:
                why = f"{op} has no calibration rule"
            return [], why
        designs.append(design)
    if len({d.layout for d in designs}) > 1:
        return [], "its uses read it in different layouts"
    return designs, None
