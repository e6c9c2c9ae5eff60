"""Graph utilities every stage uses: all graphs of a model, its stored tensors, values by name,
which If/Loop/Scan body holds a node, where an entry of a computed shape vector is stored, and a
deep copy that keeps external data reachable."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxprune.core.tensors import const_tensor


def all_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), main graph first."""
    return [model.graph, *model.graph.subgraphs()]


def iter_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Every stored tensor: initializers and Constant node values, in every graph."""
    for graph in all_graphs(model):
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                yield name, value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
                tensor = node.attributes["value"].value
                yield node.outputs[0].name or node.name, tensor


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy to change freely (a probe, a trial); external tensors still read their files.

    A serialise/deserialise round trip loses where external data lies (the copy would look for
    it in the working folder), so each graph gets its original's base folder back.
    """
    bases = {t.base_dir for _, t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)}
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    copy.meta.update(model.meta)
    if len(bases) == 1:
        base = bases.pop()
        for graph in all_graphs(copy):
            ir.external_data.set_base_dir(graph, base)
    return copy


def values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            found[out.name] = out
    return found


def subgraph_owners(model: ir.Model) -> dict[ir.Node, tuple[ir.Node, str]]:
    """Each node inside an If/Loop/Scan body: (the main-graph node that holds it, which body)."""
    owners: dict[ir.Node, tuple[ir.Node, str]] = {}
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs = list(attr.value)
            else:
                continue
            for sub in graphs:
                for inner in sub.all_nodes():
                    owners[inner] = (node, attr.name)
    return owners


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def infer_shapes(model: ir.Model, *, strict: bool = True) -> bool:
    """onnx shape inference on `model` (in place); whether it changed anything. Where it fails
    (an op it cannot type, a shape it cannot resolve), the model is left as it was, silently:
    the callers read what shapes there are and say what they could not use."""
    with _quiet("onnx_ir.passes.common.shape_inference"):
        return ShapeInferencePass(strict_mode=strict)(model).modified


def concat_piece(value: ir.Value, position: int) -> tuple[ir.Node, int, int] | None:
    """Where entry `position` of a computed shape vector is stored: (the Concat that makes the
    vector, its input holding the entry, the entry's index there), when that input is a stored
    constant. (A rewrite that changes the piece gives a vector other nodes read too a copy.)"""
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    offset = 0
    for index, piece in enumerate(node.inputs):
        shape = None if piece is None else piece.shape
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        if offset <= position < offset + shape[0]:
            return (node, index, position - offset) if const_tensor(piece) is not None else None
        offset += shape[0]
    return None
