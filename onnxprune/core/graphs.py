"""Graph utilities every stage uses: all graphs of a model, its stored tensors, values by name,
which If/Loop/Scan body holds a node, where an entry of a computed shape vector is stored, a
deep copy that keeps external data reachable, and what the model's opset allows."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import onnx
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


DEFAULT_DOMAINS = ("", "ai.onnx")


def dynamic_dims(model: ir.Model) -> int:
    """Dims held as -1 (older exporters' "dynamic", as storage.wellformed reads them from a file)
    made symbolic in a model built in memory: a graph input's or output's named
    `<value>_dim<axis>`, any other value's left unknown. Returns how many changed."""
    changed = 0
    for graph in all_graphs(model):
        ends = {id(v) for v in (*graph.inputs, *graph.outputs)}
        values = [*graph.inputs, *graph.outputs, *(o for n in graph for o in n.outputs)]
        for value in values:
            shape = value.shape
            if shape is None or not any(isinstance(d, int) and d < 0 for d in shape):
                continue
            dims = [
                (f"{value.name}_dim{axis}" if id(value) in ends else None)
                if isinstance(d, int) and d < 0
                else d
                for axis, d in enumerate(shape)
            ]
            value.shape = ir.Shape(dims)
            changed += 1
    return changed


def opset_version(model: ir.Model) -> int | None:
    """The model's version of the default ONNX domain (None where it imports none)."""
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    return None if version is None else int(version)


@functools.lru_cache(maxsize=4096)
def _schema(op_type: str, version: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return None


def has_attribute(model: ir.Model, op_type: str, name: str) -> bool:
    """Whether `op_type` takes attribute `name` at the model's opset (Reshape's allowzero only
    from 14, Split's split until 18): what a rewrite may write."""
    version = opset_version(model)
    schema = None if version is None else _schema(op_type, version)
    return schema is not None and name in schema.attributes


def opset_problems(model: ir.Model) -> list[str]:
    """Nodes of the default domain, in every graph, that the model's own opset lacks: an op
    that does not exist yet at that version, an attribute its schema there does not take, more
    inputs than it accepts. The one check every written model passes (`storage.io.save_model`):
    a rewrite must never write what the model's opset cannot read (ONNX Runtime refuses it)."""
    version = opset_version(model)
    if version is None:
        return []
    problems = []
    for node in model.graph.all_nodes():
        if node.domain not in DEFAULT_DOMAINS:
            continue
        label = f"{node.op_type} {node.name or (node.outputs[0].name if node.outputs else '')!r}"
        schema = _schema(node.op_type, version)
        if schema is None:
            problems.append(f"{label}: no {node.op_type} at opset {version}")
            continue
        unknown = sorted(set(node.attributes) - set(schema.attributes))
        if unknown:
            problems.append(f"{label}: attribute {unknown[0]!r} does not exist at opset {version}")
        if len(node.inputs) > schema.max_input:
            problems.append(
                f"{label}: {len(node.inputs)} inputs, opset {version} takes {schema.max_input}"
            )
    return problems
