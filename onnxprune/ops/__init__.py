"""The op registry: everything onnxprune knows of each op type, one module per op family.

Every stage asks here instead of keeping its own table: finding weights (`weight_inputs`,
`weight_axes`), the channel walk (`channel_rule`, `folded_inputs`), the structured rewrite (the
`Fix` objects rules record), MAC counting (`node_macs`), calibration (`design_of`) and shape
folding (`output_dims`). An op type the registry does not know has no weights, no channel rule
(the walk freezes what it touches, with the reason), no MACs and no design.

Adding an op is one module (or a few lines in the family it belongs to). Declare, in an `OPS`
tuple of `OpInfo` (ops/base.py), only what applies:
- `weight_inputs` and `weight_axes(node, index, rank)`: the inputs that may hold a prunable
  weight, and (out_axis, in_axis) of a stored tensor there;
- `rule(node, walk)`: how channels flow through it, through `ChannelWalk`; raise `Unsupported`
  with the reason where it cannot follow them, never guess; record a `Fix` subclass (its
  `apply(kept, consts)` rewrites attributes or shape constants that count channels);
- `macs(node, dims)`: dense multiply-accumulates at known dims;
- `design(weight, use)` (or `no_design`, the reason there is none): calibration's rows X with
  X @ W.T the output;
- `output_dims(node, run)`: its output's dims in one run of shape folding's stand-ins;
- `folded_inputs`: computed integer inputs the walk needs constant;
- `view(node, index, axes)`: where the op only cuts, places or reshapes a stored tensor into
  pieces, which stored axis each output axis holds (finding weights follows them).
- `dead(node, walk)`: what its output holds in a removed channel (ops/dead.py), which reductions
  over channels need to stay exact;
- `sources(node, axis, walk)`: where an output axis's entries come from, so that a computed
  tensor made of stored ones (RoPE's cos and sin of inv_freq) can get their channels.
Then add the module to `FAMILIES` below and a model using the op to the tests
(tests/test_ops.py checks that every op with a channel rule is exercised).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.ops import (
    conv,
    elementwise,
    indexing,
    matmul,
    normalization,
    quantize,
    recurrent,
    shape,
    spatial,
)
from onnxprune.ops.base import (
    AxisMap,
    ChannelWalk,
    Constants,
    Design,
    Dims,
    Fix,
    Kept,
    OpInfo,
    Rule,
    RunDims,
    Unsupported,
    WeightLike,
    statistic_positions,
)
from onnxprune.ops.recurrent import RECURRENT_OPS, RECURRENT_REASON

__all__ = [
    "MAC_OPS",
    "PRUNABLE_OPS",
    "RECURRENT_OPS",
    "RECURRENT_REASON",
    "REGISTRY",
    "VIEW_OPS",
    "WEIGHT_INPUTS",
    "AxisMap",
    "ChannelWalk",
    "Constants",
    "Design",
    "Dims",
    "Fix",
    "Kept",
    "OpInfo",
    "Rule",
    "RunDims",
    "Unsupported",
    "channel_rule",
    "design_of",
    "folded_inputs",
    "node_macs",
    "op_info",
    "output_dims",
    "statistic_positions",
    "view_axes",
    "weight_axes",
    "weight_inputs",
]

FAMILIES = (conv, matmul, recurrent, normalization, elementwise, quantize, shape, indexing, spatial)


def _registry() -> dict[tuple[str, str], OpInfo]:
    found: dict[tuple[str, str], OpInfo] = {}
    for family in FAMILIES:
        for info in family.OPS:
            key = (info.domain, info.op_type)
            assert key not in found, f"{key} is declared twice"
            found[key] = info
    return found


REGISTRY = _registry()

# The default domain's op types with each fact, in declaration order (the order messages list).
WEIGHT_INPUTS = {
    op: i.weight_inputs for (d, op), i in REGISTRY.items() if not d and i.weight_inputs
}
PRUNABLE_OPS = tuple(op for op in WEIGHT_INPUTS if op not in RECURRENT_OPS)
MAC_OPS = tuple(op for (d, op), i in REGISTRY.items() if not d and i.macs is not None)
# Ops that cut or place pieces of a stored tensor (a weight read through them is found).
VIEW_OPS = tuple(op for (d, op), i in REGISTRY.items() if not d and i.view is not None)


def op_info(node: ir.Node) -> OpInfo | None:
    """The registry's entry for `node`'s op type ("ai.onnx" is the default domain, "")."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    return REGISTRY.get((domain, node.op_type))


def channel_rule(node: ir.Node) -> Rule | None:
    """How channels flow through `node`; None: it freezes every channel it touches."""
    info = op_info(node)
    return None if info is None else info.rule


def weight_inputs(node: ir.Node) -> tuple[int, ...]:
    """The inputs of `node` that may hold a prunable weight."""
    info = op_info(node)
    return () if info is None else info.weight_inputs


def weight_axes(node: ir.Node, index: int, rank: int) -> tuple[int | None, int | None] | None:
    """(out_axis, in_axis) of a stored tensor of `rank` in input `index` as `node` reads it, or
    None if that is no weight slot."""
    info = op_info(node)
    if info is None or info.weight_axes is None or rank < 2:
        return None
    return info.weight_axes(node, index, rank)


def view_axes(node: ir.Node, index: int, axes: AxisMap) -> list[AxisMap] | None:
    """A stored tensor entering `node` at input `index` with axis map `axes`: the axis map of
    each output where the node only rearranges pieces of it (Slice, Concat, Split, Gather of
    stored indices, Unsqueeze, Squeeze); None where it computes something else."""
    info = op_info(node)
    if info is None or info.view is None:
        return None
    return info.view(node, index, list(axes))


def node_macs(node: ir.Node, dims: Dims) -> int | None:
    """Dense multiply-accumulates of one node at `dims`' shapes; None where a shape it needs is
    not known (or the op has no MAC count)."""
    info = op_info(node)
    return None if info is None or info.macs is None else info.macs(node, dims)


def output_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    """`node`'s first output's dims in one run of shape folding; None where the op's are not
    followed (its inferred shape then stands)."""
    info = op_info(node)
    return None if info is None or info.output_dims is None else info.output_dims(node, run)


def folded_inputs(node: ir.Node) -> tuple[int, ...]:
    """Computed integer inputs of `node` that the walk needs constant (folded before it)."""
    info = op_info(node)
    return () if info is None else info.folded_inputs


# Calibration re-solves weights in float and compensation shifts biases in float; a quantized
# layer's new values would leave its quantization grid, so it gets no design: calibration ranks
# it by magnitude and only zeroes it, compensation leaves it as it is.
QUANTIZED_REASON = (
    "quantized weights ({dtype} behind DequantizeLinear) are not calibrated nor compensated: "
    "re-solved values would leave the quantization grid (prune the float model, then quantize)"
)


def design_of(weight: WeightLike) -> tuple[list[Design], str | None]:
    """The designs of every use of a weight, or the reason it has none.

    A weight shared by several nodes has one design per use; their statistics add up (the error
    to minimise is the sum over uses), which needs every use to see the weight the same way.
    """
    if weight.quant is not None:
        return [], QUANTIZED_REASON.format(dtype=weight.dtype.name.lower())
    designs = []
    for use in weight.uses:
        cut = next((op for op in use.via if op in VIEW_OPS), None)
        if cut is not None:
            return [], (
                f"{use.node.op_type} {use.node.name!r} reads pieces of it (through {cut}): "
                "calibration has no design for pieces of a stored tensor"
            )
        info = op_info(use.node)
        rule = None if info is None else info.design
        design = rule(weight, use) if rule is not None else None
        if design is None:
            op = use.node.op_type
            if rule is not None:
                why = f"{op} {use.node.name!r} reads it in a layout calibration does not cover"
            elif info is not None and info.no_design is not None:
                why = info.no_design
            else:
                why = f"{op} has no calibration rule"
            return [], why
        designs.append(design)
    if len({d.layout for d in designs}) > 1:
        return [], "its uses read it in different layouts"
    return designs, None
