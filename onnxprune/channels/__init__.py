"""Channel groups: which channel indices of which tensors must be removed together.

`prepare` readies a model (shapes inferred, exporters' shape arithmetic folded: prepare.py, as
onnx-ir passes), `build` walks it once with the op registry's channel rules and resolves the
channel classes (walk.py), and the result is a `ChannelGraph` (graph.py): members to slice,
fixes to apply, layers, groups, attention heads and the weights no layer reaches. shapemath.py
evaluates the shape arithmetic both need.
"""

from __future__ import annotations

from onnxprune.channels.graph import (
    ROLES,
    ChannelGraph,
    Group,
    Heads,
    Layer,
    Member,
    Unreached,
    components,
    group_layers,
    stored_values,
    zeroed,
)
from onnxprune.channels.prepare import (
    FoldConstantsPass,
    FoldShapeArithmeticPass,
    PrepareChannelsPass,
    RefreshShapesPass,
    RegroupReshapesPass,
    SetStaticDimsPass,
    SkipShapeGuardsPass,
    StoreWeightViewsPass,
    prepare,
)
from onnxprune.channels.walk import (
    MAX_CHANNELS,
    Walk,
    build,
    cache_inputs,
    check_removable,
    freeze_layers,
    freeze_tensors,
)
from onnxprune.core.graphs import concat_piece
from onnxprune.ops import Fix, Unsupported

__all__ = [
    "MAX_CHANNELS",
    "ROLES",
    "ChannelGraph",
    "Fix",
    "FoldConstantsPass",
    "FoldShapeArithmeticPass",
    "Group",
    "Heads",
    "Layer",
    "Member",
    "PrepareChannelsPass",
    "RefreshShapesPass",
    "RegroupReshapesPass",
    "SetStaticDimsPass",
    "SkipShapeGuardsPass",
    "StoreWeightViewsPass",
    "Unreached",
    "Unsupported",
    "Walk",
    "build",
    "cache_inputs",
    "check_removable",
    "components",
    "concat_piece",
    "freeze_layers",
    "freeze_tensors",
    "group_layers",
    "prepare",
    "stored_values",
    "zeroed",
]
