"""Convolutions: Conv and ConvTranspose.

What the family shares: a stored weight at input 1 whose first two axes are the output and input
channels (Conv [C_out, C_in / groups, *kernel], ConvTranspose the other way round, [C_in,
C_out / groups, *kernel]), channels on axis 1 of the activations, and groups that tie a group's
input and output channels together.

Calibration sees both as matrix products: Conv through im2col patches that honour strides, pads
(explicit or auto_pad), dilations and groups; ConvTranspose through the patches of the stride-1
convolution it equals (the input with zeros between its samples, padded per pads,
output_padding, output_shape or auto_pad; the kernel flipped, its in/out axes swapped). Columns
are ordered (kernel position, channel): M consecutive columns are M consecutive input channels
at one kernel position, so an N:M pattern along the input-channel axis is a pattern over
consecutive columns, as it is for Gemm and MatMul.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.ops.base import (
    ChannelWalk,
    Constants,
    Design,
    Dims,
    Fix,
    Kept,
    OpInfo,
    Unsupported,
    UseLike,
    WeightLike,
    attr_int,
    attr_ints,
    attr_str,
    input_at,
    only_axes,
    statistic_positions,
)
from onnxprune.ops.dead import makes_zero

# Elements of im2col patches built at once; bounds the temporary memory of a Conv's rows.
PATCH_ELEMENTS = 1 << 24


# -- weights ---------------------------------------------------------------------------------------
def conv_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """Conv's weight [C_out, C_in / groups, *kernel]: output axis 0, input axis 1."""
    return (0, 1) if index == 1 else None


def conv_transpose_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """ConvTranspose's weight [C_in, C_out / groups, *kernel]: output axis 1, input axis 0."""
    return (1, 0) if index == 1 else None


# -- channels --------------------------------------------------------------------------------------
@dataclass(eq=False)
class GroupFix(Fix):
    """A grouped convolution's `group` attribute: the number of whole groups kept."""

    groups: np.ndarray  # one id per group
    kind = "group"

    def apply(self, kept: Kept, consts: Constants) -> None:
        self.node.attributes["group"] = ir.AttrInt64("group", kept.kept_of(self.groups))


def conv(node: ir.Node, ctx: ChannelWalk) -> None:
    """Conv and ConvTranspose. Grouped ones prune whole groups: a group's input and output
    channels become one class, so depthwise Conv ties its input and output channels."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not ctx.is_const(w) or (b is not None and not ctx.is_const(b)):
        raise Unsupported("weight or bias is computed, not stored")
    wshape = ctx.shape(w)
    assert wshape is not None
    groups = attr_int(node, "group", 1)
    transposed = node.op_type == "ConvTranspose"
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    only_axes(ctx, x, {1}, "other than 1 would be mixed by a convolution")
    xi = ctx.space(x, 1, "in", node)
    if groups == 1:
        o = ctx.space(w, out_axis, "out", node)
        ctx.union(xi, ctx.space(w, in_axis, "in", node))
    elif transposed:
        # W is [C_in, C_out / groups, ...]: its rows are the input channels, group by group, and
        # its second axis, shared by every group, is never cut. Output channel j belongs to group
        # j // (C_out / groups); a group goes whole: its input rows, outputs and bias entries.
        c = len(xi)
        if c % groups:
            raise Unsupported(f"{c} input channels do not divide into {groups} groups")
        per_group = xi.reshape(groups, c // groups)
        gid = per_group[:, 0]
        ctx.union(per_group.reshape(-1), np.repeat(gid, c // groups))
        ctx.union(xi, ctx.space(w, 0, "in", node))
        o = np.repeat(gid, wshape[1])
        ctx.fix(GroupFix(node, gid))
    else:
        c = len(xi)
        m = wshape[0]
        if c % groups or m % groups:
            raise Unsupported(f"{c} in / {m} out channels do not divide into {groups} groups")
        per_group = xi.reshape(groups, c // groups)
        gid = per_group[:, 0]
        ctx.union(per_group.reshape(-1), np.repeat(gid, c // groups))
        o = ctx.space(w, 0, "out", node)
        ctx.union(o, np.repeat(gid, m // groups))
        ctx.fix(GroupFix(node, gid))
    if b is not None:
        ctx.union(o, ctx.space(b, 0, "bias", node))
    ctx.set(node.outputs[0], 1, o)


# -- multiply-accumulates --------------------------------------------------------------------------
def conv_output(x: tuple[int, ...], w: tuple[int, ...], node: ir.Node) -> tuple[int, ...] | None:
    """A Conv's output dims from its input and weight dims and its attributes."""
    spatial = len(x) - 2
    if spatial < 0 or len(w) != len(x):
        return None
    kernel = attr_ints(node, "kernel_shape", list(w[2:]))
    strides = attr_ints(node, "strides", [1] * spatial)
    dilations = attr_ints(node, "dilations", [1] * spatial)
    pads = attr_ints(node, "pads", [0] * 2 * spatial)
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if not len(kernel) == len(strides) == len(dilations) == spatial or len(pads) != 2 * spatial:
        return None
    out = [x[0], w[0]]
    for i in range(spatial):
        span = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = -(-x[2 + i] // strides[i])
        elif auto_pad == "VALID":
            size = (x[2 + i] - span) // strides[i] + 1
        else:
            size = (x[2 + i] + pads[i] + pads[i + spatial] - span) // strides[i] + 1
        if size <= 0:
            return None
        out.append(size)
    return tuple(out)


def conv_macs(node: ir.Node, dims: Dims) -> int | None:
    w = dims(input_at(node, 1))
    if w is None or len(w) < 3:
        return None
    out = dims(node.outputs[0])
    if out is None:
        x = dims(input_at(node, 0))
        out = None if x is None else conv_output(x, w, node)
    # every output element: a dot product over (C_in / groups) x kernel
    return None if out is None else math.prod(out) * math.prod(w[1:])


def conv_transpose_macs(node: ir.Node, dims: Dims) -> int | None:
    x, w = dims(input_at(node, 0)), dims(input_at(node, 1))
    if x is None or w is None or len(x) < 3 or len(w) != len(x):
        return None
    # every input element is scattered into (C_out / groups) x kernel outputs, whatever the stride
    return math.prod(x) * math.prod(w[1:])


# -- calibration design ----------------------------------------------------------------------------
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
            split_pad(max((math.ceil(size / s) - 1) * s + (k - 1) * dil + 1 - size, 0), auto_pad)
            for size, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True)
        ]
    return explicit_pads(pads, len(kernel), auto_pad)


def split_pad(total: int, auto_pad: str) -> tuple[int, int]:
    """A total padding as (begin, end): the odd one at the end for SAME_UPPER, else at the start
    (SAME_LOWER, and ConvTranspose's output_shape without auto_pad)."""
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def explicit_pads(pads: list[int], d: int, auto_pad: str) -> list[tuple[int, int]]:
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


def conv_design(weight: WeightLike, use: UseLike) -> Design | None:
    node = use.node
    shape = weight.shape
    if use.input_index != 1 or use.out_axis != 0 or use.in_axis != 1 or "Transpose" in use.via:
        return None
    groups = attr_int(node, "group", 1)
    out_channels, c_group, *kernel = shape
    if not kernel or out_channels % groups:
        return None
    d = len(kernel)
    strides = attr_ints(node, "strides", [1] * d)
    dilations = attr_ints(node, "dilations", [1] * d)
    pads = attr_ints(node, "pads", [0] * (2 * d))
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
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
            split_pad(s * (size - 1) + extra + (k - 1) * dil + 1 - want, auto_pad)
            for size, k, s, dil, extra, want in zip(
                spatial, kernel, strides, dilations, output_padding, wanted, strict=True
            )
        ]
    return explicit_pads(pads, len(kernel), auto_pad)


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


def conv_transpose_design(weight: WeightLike, use: UseLike) -> Design | None:
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
    groups = attr_int(node, "group", 1)
    in_channels, o_group, *kernel = shape
    if not kernel or groups < 1 or in_channels % groups:
        return None
    d = len(kernel)
    if attr_ints(node, "kernel_shape", kernel) != kernel:
        return None
    strides = attr_ints(node, "strides", [1] * d)
    dilations = attr_ints(node, "dilations", [1] * d)
    pads = attr_ints(node, "pads", [])
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    output_padding = attr_ints(node, "output_padding", [0] * d)
    output_shape = attr_ints(node, "output_shape", [])
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


OPS = (
    OpInfo(
        "Conv",
        weight_inputs=(1,),
        weight_axes=conv_axes,
        rule=conv,
        macs=conv_macs,
        design=conv_design,
        dead=makes_zero,
    ),
    OpInfo(
        "ConvTranspose",
        weight_inputs=(1,),
        weight_axes=conv_transpose_axes,
        rule=conv,
        macs=conv_transpose_macs,
        design=conv_transpose_design,
        dead=makes_zero,
    ),
)
