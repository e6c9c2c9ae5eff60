"""Remove the channels a ChannelPlan selects: slice every member tensor, recompute the attributes
and shape constants that count channels, set the new dims, and re-run shape inference.

Sliced tensors are lazy (computed from the original when the saver or the checker reads them), as
in the unstructured rewrite, so no second copy of the model's weights is held at once. Shape
constants that a fix changes are replaced by new initializers for that node alone: exporters share
one shape constant between many nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.channels import Fix, concat_piece
from onnxprune.core.graphs import infer_shapes
from onnxprune.core.tensors import const_tensor
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.rewrite.unstructured import Rewritten
from onnxprune.selection.channels import ChannelPlan


def store_tensor(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    """Swap the stored tensor of an initializer or of a Constant node's output."""
    tensor.name = value.name
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        node.attributes["value"] = ir.AttrTensor("value", tensor)
    else:
        value.const_value = tensor
    value.shape = ir.Shape(list(tensor.shape))


def _slice_members(plan: ChannelPlan) -> None:
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


def _kept(plan: ChannelPlan, value: ir.Value, axis: int) -> int:
    return plan.kept_of(plan.graph.spaces[value][axis])


def _ints_input(node: ir.Node, index: int) -> np.ndarray:
    tensor = const_tensor(node.inputs[index])
    assert tensor is not None, f"{node.name}: input {index} is no constant"
    return np.array(tensor.numpy(), copy=True).reshape(-1)


def _fix_group(plan: ChannelPlan, fix: Fix, consts: NodeConstants) -> None:
    fix.node.attributes["group"] = ir.AttrInt64("group", plan.kept_of(fix.ids["groups"]))


def _fix_split(plan: ChannelPlan, fix: Fix, consts: NodeConstants) -> None:
    node, axis = fix.node, fix.data["axis"]
    sizes = np.array([_kept(plan, out, axis) for out in node.outputs], dtype=np.int64)
    node.attributes.pop("num_outputs", None)
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])
    else:
        consts.replace(node, 1, sizes)


def _fix_slice(plan: ChannelPlan, fix: Fix, consts: NodeConstants) -> None:
    node, j = fix.node, fix.data["position"]
    keep = ~plan.removed[fix.ids["in"]]
    for index, bound in ((1, fix.data["start"]), (2, fix.data["end"])):
        array = _ints_input(node, index)
        array[j] = int(np.count_nonzero(keep[:bound]))
        consts.replace(node, index, array)


def _fix_gather(plan: ChannelPlan, fix: Fix, consts: NodeConstants) -> None:
    node = fix.node
    keep = ~plan.removed[fix.ids["in"]]
    tensor = const_tensor(node.inputs[1])
    assert tensor is not None
    indices = np.asarray(tensor.numpy()) % len(keep)
    position = np.cumsum(keep) - 1
    j = fix.data["carrier"]
    new = position[indices].astype(indices.dtype)
    if j is not None:  # drop the removed channels along the axis that carries them
        line = keep[indices[tuple(slice(None) if i == j else 0 for i in range(indices.ndim))]]
        new = np.compress(line, new, axis=j)
    consts.replace(node, 1, np.ascontiguousarray(new))


def _fix_shape(plan: ChannelPlan, fix: Fix, consts: NodeConstants, index: int, align: bool) -> None:
    """Reshape/Expand target shapes and Resize sizes: literal dims of channel axes get the count
    kept. Expand aligns its target to the right and leaves 1s (broadcast) alone. A computed
    Reshape target has its channel counts stored in pieces of the Concat that makes it."""
    node = fix.node
    if const_tensor(node.inputs[index]) is None:
        for axis in fix.data["axes"]:
            found = concat_piece(node.inputs[index], axis)
            assert found is not None, f"{node.name}: target entry {axis} is not stored"
            concat, piece, entry = found
            array = _ints_input(concat, piece)
            array[entry] = _kept(plan, node.outputs[0], axis)
            consts.replace(concat, piece, array)
        return
    array = _ints_input(node, index)
    out = node.outputs[0]
    rank = len(out.shape) if out.shape is not None else len(array)
    for axis in fix.data["axes"]:
        position = axis - (rank - len(array)) if align else axis
        if 0 <= position < len(array) and array[position] > (1 if align else 0):
            array[position] = _kept(plan, out, axis)
    consts.replace(node, index, array)


def _fix_sizes(plan: ChannelPlan, fix: Fix, consts: NodeConstants) -> None:
    node = fix.node
    array = _ints_input(node, 3)
    for position, axis in fix.data["entries"]:
        array[position] = _kept(plan, node.inputs[0], axis)
    consts.replace(node, 3, array)


FIXES: dict[str, Callable[[ChannelPlan, Fix, NodeConstants], None]] = {
    "group": _fix_group,
    "split": _fix_split,
    "slice": _fix_slice,
    "gather": _fix_gather,
    "reshape": lambda p, f, c: _fix_shape(p, f, c, 1, align=False),
    "expand": lambda p, f, c: _fix_shape(p, f, c, 1, align=True),
    "sizes": _fix_sizes,
}


def _set_dims(plan: ChannelPlan) -> None:
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


def apply_channel_plan(model: ir.Model, plan: ChannelPlan) -> ir.Model:
    """Remove the planned channels from `model` (in place); returns `model`."""
    RemoveChannelsPass(plan)(model)
    return model


class RemoveChannelsPass(ir.passes.InPlacePass):
    """Remove the channels a plan selects: slice every member, fix the attributes and shape
    constants that count channels, set the new dims, infer shapes again."""

    def __init__(self, plan: ChannelPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.plan.removed.any():
            return ir.passes.PassResult(model, modified=False)
        _remove(model, self.plan)
        return ir.passes.PassResult(model, modified=True)


def _remove(model: ir.Model, plan: ChannelPlan) -> None:
    _slice_members(plan)
    consts = NodeConstants(model)
    for fix in plan.graph.fixes:
        FIXES[fix.kind](plan, fix, consts)
    _set_dims(plan)
    RemoveUnusedNodesPass()(model)  # the shape constants the fixes replaced
    infer_shapes(model)
