"""Remove the channels a ChannelPlan selects: slice every member tensor, recompute the attributes
and shape constants that count channels (each a `Fix` its op's channel rule recorded: ops/),
set the new dims, and re-run shape inference.

Sliced tensors are lazy (computed from the original when the saver or the checker reads them), as
in the unstructured rewrite, so no second copy of the model's weights is held at once. Shape
constants that a fix changes are replaced by new initializers for that node alone: exporters share
one shape constant between many nodes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.channels import ChannelGraph
from onnxprune.core.graphs import infer_shapes
from onnxprune.core.tensors import const_tensor
from onnxprune.ops import Kept
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.rewrite.unstructured import Rewritten


class RemovalPlan(Kept, Protocol):
    """What the rewrite reads of a plan (`selection.channels.ChannelPlan`): the channel graph
    and which classes go. A protocol, so that rewriting imports no selection."""

    graph: ChannelGraph


def store_tensor(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    """Swap the stored tensor of an initializer or of a Constant node's output."""
    tensor.name = value.name
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        node.attributes["value"] = ir.AttrTensor("value", tensor)
    else:
        value.const_value = tensor
    value.shape = ir.Shape(list(tensor.shape))


def _slice_members(plan: RemovalPlan) -> None:
    masks: dict[ir.Value, dict[int, np.ndarray]] = {}
    for member in plan.graph.members:
        masks.setdefault(member.value, {})[member.axis] = ~plan.removed[member.ids]
    for value, axes in masks.items():
        if all(mask.all() for mask in axes.values()):
            continue
        source = const_tensor(value)
        assert source is not None
        shape = [int(d) for d in source.shape]
        for axis, mask in axes.items():
            shape[axis] = int(mask.sum())

        store_tensor(value, SlicedTensor(source, axes, shape))


class SlicedTensor(Rewritten):
    """A stored tensor with the removed channels taken out along some axes, computed from the
    original when read (no second copy of the model's weights is held)."""

    __slots__ = ()

    def __init__(
        self, source: ir.TensorProtocol, axes: dict[int, np.ndarray], shape: list[int]
    ) -> None:
        def compute() -> ir.Tensor:
            array = source.numpy()
            for axis, mask in axes.items():
                array = np.compress(mask, array, axis=axis)
            return ir.Tensor(np.ascontiguousarray(array), dtype=source.dtype)

        super().__init__(compute, dtype=source.dtype, shape=ir.Shape(shape))
        self.source = source


def _set_dims(plan: RemovalPlan) -> None:
    """New static dims for every activation that carries channels."""
    for value, spaces in plan.graph.spaces.items():
        if value.shape is None or const_tensor(value) is not None:
            continue
        dims = list(value.shape)
        changed = False
        for axis, ids in spaces.items():
            kept = plan.kept_of(ids)
            if axis < len(dims) and kept != len(ids):
                dims[axis] = kept
                changed = True
        if changed:
            value.shape = ir.Shape(dims)


def apply_channel_plan(model: ir.Model, plan: RemovalPlan) -> ir.Model:
    """Remove the planned channels from `model` (in place); returns `model`."""
    RemoveChannelsPass(plan)(model)
    return model


class RemoveChannelsPass(ir.passes.InPlacePass):
    """Remove the channels a plan selects: slice every member, fix the attributes and shape
    constants that count channels, set the new dims, infer shapes again."""

    def __init__(self, plan: RemovalPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.plan.removed.any():
            return ir.passes.PassResult(model, modified=False)
        _remove(model, self.plan)
        return ir.passes.PassResult(model, modified=True)


def _remove(model: ir.Model, plan: RemovalPlan) -> None:
    _slice_members(plan)
    consts = NodeConstants(model)
    for fix in plan.graph.fixes:
        fix.apply(plan, consts)
    _set_dims(plan)
    RemoveUnusedNodesPass()(model)  # the shape constants the fixes replaced
    infer_shapes(model)
