"""Refuse a malformed model before any work, with one line that names the problem.

Runs on the parsed protobuf, before onnx-ir builds its graph: onnx-ir accepts a node reading a
name nothing produces (it invents a graph input), drops sparse initializers and reads tensors
whose storage is shorter than their dims claim, and everything after it would then fail deep in
the work with a traceback, or write a broken model. The own checks are cheap: names, dims, and
the length of each data field, never the values. Then onnx.checker with strict shape inference
runs on a copy of the graph, so nothing the output's check would refuse gets past the load.

What is copied: `len(tensor.raw_data)` is answered by protobuf (upb) with a copy of the bytes,
one tensor at a time, and the checker works on a copy of the message; both hold only what
wire.py left in the message (small initializers, Constant values, subgraph tensors). The big
main-graph payloads stay in the file; their lengths come in `payloads`.

ONNX requires nodes in topological order, but ONNX Runtime runs any acyclic order, so only real
cycles are refused, and an acyclic model is put in order for onnx-ir and the checker.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import onnx
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from onnx import AttributeProto, TensorProto

from onnxprune.errors import ModelLoadError

# More elements than this in one tensor is no model: its bytes would not fit a 64-bit offset.
MAX_BYTES = 2**63 - 1
# The default ONNX domain has two spellings.
DEFAULT_DOMAINS = ("", "ai.onnx")

Payloads = Mapping[str, tuple[int, int]]


def _types(*names: str) -> frozenset[int]:
    """TensorProto data types by name, those this onnx knows."""
    return frozenset(getattr(TensorProto, n) for n in names if hasattr(TensorProto, n))


# Bits per element in raw_data (onnx.proto: sub-byte types packed, complex as two floats).
_BITS_BY_NAME = {
    "FLOAT": 32, "INT32": 32, "UINT32": 32, "COMPLEX64": 64, "COMPLEX128": 128,
    "INT64": 64, "UINT64": 64, "DOUBLE": 64, "INT16": 16, "UINT16": 16, "FLOAT16": 16,
    "BFLOAT16": 16, "INT8": 8, "UINT8": 8, "BOOL": 8, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8,
    "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8, "INT4": 4, "UINT4": 4,
    "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6,
}  # fmt: skip
BITS = {getattr(TensorProto, n): b for n, b in _BITS_BY_NAME.items() if hasattr(TensorProto, n)}
TYPED_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)
FIELD_OF = {
    **dict.fromkeys(_types("FLOAT", "COMPLEX64"), "float_data"),
    **dict.fromkeys(_types("DOUBLE", "COMPLEX128"), "double_data"),
    **dict.fromkeys(_types("INT64"), "int64_data"),
    **dict.fromkeys(_types("UINT32", "UINT64"), "uint64_data"),
    TensorProto.STRING: "string_data",
}
for _type in BITS:
    FIELD_OF.setdefault(_type, "int32_data")


def _typed_count(data_type: int, count: int) -> int:
    """How many entries the type's own field holds for `count` elements (onnx.proto)."""
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * count
    if FIELD_OF[data_type] == "int32_data" and BITS[data_type] < 6:
        per = 8 // BITS[data_type]  # 4-bit: two per entry, 2-bit: four
        return -(-count // per)
    return count


def data_type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def _fail(path: str | os.PathLike, message: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {message}")


def check_tensor(
    tensor: TensorProto, what: str, raw_length: int | None = None, where: str = ""
) -> tuple[str, str] | None:
    """The problem with a stored tensor as (subject, complaint), or None when it is well formed.

    The subject is `what` and the tensor's name, then `where` it is held in parentheses.
    `raw_length` stands in for raw_data that wire.py stripped out of the message.
    """
    subject = f"{what} {tensor.name!r}" if tensor.name else what
    if where:
        subject += f" ({where})"
    data_type = tensor.data_type
    if data_type == TensorProto.UNDEFINED:
        return subject, "has no data type (data_type 0)"
    if data_type not in BITS and data_type != TensorProto.STRING:
        return subject, f"has data_type {data_type}, which is no ONNX data type"
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        return subject, f"has a negative dimension (dims {dims})"
    count = math.prod(dims)
    bits = BITS.get(data_type, 8)
    needed = -(-count * bits // 8)
    if needed > MAX_BYTES:
        return subject, f"claims dims {dims}: {count} elements, more than any file can hold"
    type_name = data_type_name(data_type)
    if tensor.HasField("segment"):
        return subject, "is stored in segments, which ONNX loaders do not support"
    typed = [f for f in TYPED_FIELDS if len(getattr(tensor, f))]
    has_raw = tensor.HasField("raw_data") or raw_length is not None
    if tensor.data_location == TensorProto.EXTERNAL:
        if typed or has_raw:
            stored = ", ".join(["raw_data"] * has_raw + typed)
            return subject, f"is marked as external data but also holds {stored}"
        if data_type == TensorProto.STRING:
            return subject, "holds strings in external data, which ONNX does not allow"
        info = {e.key: e.value for e in tensor.external_data}
        if not info.get("location"):
            return subject, "is marked as external data but names no location"
        for key in ("offset", "length"):
            if key in info and not (info[key].isascii() and info[key].isdigit()):
                return subject, f"has external data {key} {info[key]!r}, not a byte count"
        if "length" in info and int(info["length"]) != needed:
            return subject, (
                f"has {info['length']} bytes of external data, its dims {dims} and type "
                f"{type_name} need {needed}"
            )
        return None  # the file itself is checked once onnx-ir resolved its path (io.py)
    stored = ["raw_data"] * has_raw + typed
    if len(stored) > 1:
        return subject, f"stores its values twice, in {' and '.join(stored)}"
    if not stored:
        if count:
            return subject, f"holds no values; its dims {dims} need {count}"
        return None
    if has_raw:
        if data_type == TensorProto.STRING:
            return subject, "holds strings in raw_data; ONNX stores strings in string_data"
        length = raw_length if raw_length is not None else len(tensor.raw_data)
        if length != needed:
            return subject, (
                f"holds {length} bytes of raw_data, its dims {dims} and type {type_name} "
                f"need {needed}"
            )
        return None
    (name,) = typed
    if name != FIELD_OF[data_type]:
        return subject, (
            f"is {type_name} but stores its values in {name}; {type_name} values go in "
            f"{FIELD_OF[data_type]} or raw_data"
        )
    entries = len(getattr(tensor, name))
    expected = _typed_count(data_type, count)
    if entries != expected:
        return subject, (
            f"holds {entries} entries of {name}, its dims {dims} and type {type_name} "
            f"need {expected}"
        )
    return None


@dataclass
class _Scope:
    """What the checks of one graph need from the model and the graphs around it."""

    path: str | os.PathLike
    ir_version: int
    imports: dict[str, int]
    functions: set[tuple[str, str]]
    outer: frozenset[str] = frozenset()
    schemas: dict[tuple[str, int], onnx.defs.OpSchema | None] = field(default_factory=dict)


def node_label(node: onnx.NodeProto, index: int) -> str:
    if node.name:
        return f"node {node.name!r}"
    return f"node #{index} ({node.op_type or 'no op_type'}, unnamed)"


def _schema(scope: _Scope, op_type: str) -> onnx.defs.OpSchema | None:
    version = scope.imports[""]
    key = (op_type, version)
    if key not in scope.schemas:
        try:
            scope.schemas[key] = onnx.defs.get_schema(op_type, version, "")
        except onnx.defs.SchemaError:
            scope.schemas[key] = None
    return scope.schemas[key]


def _check_against_schema(scope: _Scope, node: onnx.NodeProto, label: str) -> str | None:
    """What the operator's schema refuses: arity, an empty required input, attributes."""
    version = scope.imports[""]
    schema = _schema(scope, node.op_type)
    if schema is None:
        return f"{label}: {node.op_type!r} is no operator of ONNX opset {version}"
    n_in, n_out = len(node.input), len(node.output)
    if not schema.min_input <= n_in <= schema.max_input:
        return (
            f"{label}: {node.op_type} takes {schema.min_input} to {schema.max_input} inputs, "
            f"it has {n_in}"
        )
    if not schema.min_output <= n_out <= schema.max_output:
        return (
            f"{label}: {node.op_type} gives {schema.min_output} to {schema.max_output} outputs, "
            f"it has {n_out}"
        )
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    for i, (name, formal) in enumerate(zip(node.input, schema.inputs, strict=False)):
        if not name and formal.option == single:
            return f"{label}: input {i} ({formal.name}) of {node.op_type} is required but empty"
    given = {}
    for attr in node.attribute:
        if attr.ref_attr_name:
            continue
        if attr.name in given:
            return f"{label}: attribute {attr.name!r} is given twice"
        given[attr.name] = attr
        formal = schema.attributes.get(attr.name)
        if formal is None:
            return f"{label}: {node.op_type} has no attribute {attr.name!r}"
        kind = AttributeProto.AttributeType.Name(attr.type)  # a closed enum: always named
        if kind != formal.type.name:
            return (
                f"{label}: attribute {attr.name!r} of {node.op_type} must be {formal.type.name}, "
                f"it is {kind}"
            )
    for name, formal in schema.attributes.items():
        if formal.required and name not in given:
            return f"{label}: {node.op_type} needs the attribute {name!r}"
    return None


def _tensor_attributes(node: onnx.NodeProto) -> Iterator[tuple[str, TensorProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR or attr.HasField("t"):
            yield attr.name, attr.t
        for t in attr.tensors:
            yield attr.name, t


def graph_attributes(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, attr.g
        for g in attr.graphs:
            yield attr.name, g


def _order(
    producer: Mapping[str, int], reads: list[set[str]]
) -> tuple[list[int], list[int] | None]:
    """A stable topological order of the nodes (earliest first among the ready), and a cycle
    (node indices, first repeated last) when there is one."""
    n = len(reads)
    consumers: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    for i, names in enumerate(reads):
        for name in names:
            j = producer.get(name)
            if j is not None:
                consumers[j].append(i)
                waiting[i] += 1
    ready = [i for i in range(n) if not waiting[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        j = heapq.heappop(ready)
        order.append(j)
        for i in consumers[j]:
            waiting[i] -= 1
            if not waiting[i]:
                heapq.heappush(ready, i)
    if len(order) == n:
        return order, None
    # every node left waits on another node left: walk back along producers until one repeats
    left = {i for i in range(n) if waiting[i]}
    start = min(left)
    path, seen = [start], {start: 0}
    while True:
        current = path[-1]
        back = next(
            producer[name]
            for name in sorted(reads[current])
            if name in producer and producer[name] in left
        )
        if back in seen:
            cycle = [*path[seen[back] :], back]
            return order, cycle[::-1]
        seen[back] = len(path)
        path.append(back)


def _check_graph(graph: onnx.GraphProto, scope: _Scope, where: str) -> set[str]:
    """Check one graph and its subgraphs; return the outer-scope names it reads."""
    path = scope.path
    inputs = [i.name for i in graph.input]
    if len(set(inputs)) != len(inputs):
        name = next(n for n in inputs if inputs.count(n) > 1)
        raise _fail(path, f"graph input {name!r}{where} is declared twice")
    for what, values in (
        ("graph input", graph.input),
        ("graph output", graph.output),
        ("value_info", graph.value_info),
    ):
        for value in values:
            declared = value.type.tensor_type.shape.dim
            dims = [d.dim_value for d in declared]
            if any(d < -1 for d in dims):
                raise _fail(
                    path,
                    f"{what} {value.name!r}{where} is declared with a negative dimension "
                    f"({min(dims)}); -1 is read as a dynamic one",
                )
            if math.prod(d for d in dims if d) > MAX_BYTES:
                shown = [d.dim_value or d.dim_param or "?" for d in declared]
                raise _fail(
                    path,
                    f"{what} {value.name!r}{where} is declared with dims {shown}: more "
                    "elements than any tensor can hold",
                )
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        raise _fail(
            path,
            f"sparse initializer {name!r}{where} is not supported (onnx-ir would drop it); "
            "store it as a dense initializer",
        )
    initializers: set[str] = set()
    for tensor in graph.initializer:
        if tensor.name in initializers:
            raise _fail(path, f"initializer {tensor.name!r}{where} is defined twice")
        initializers.add(tensor.name)
        if scope.ir_version < 4 and tensor.name not in inputs:
            raise _fail(
                path,
                f"initializer {tensor.name!r}{where} is no graph input, which IR version "
                f"{scope.ir_version} requires of every initializer (IR 4 lifted that)",
            )
    declared = set(inputs) | initializers
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in declared:
                raise _fail(
                    path,
                    f"{node_label(node, index)}{where} writes {name!r}, which is already "
                    "defined (ONNX names are assigned once)",
                )
            producer[name] = index
    local = declared | producer.keys()
    visible = scope.outer | local
    free: set[str] = set()
    reads: list[set[str]] = []
    for index, node in enumerate(graph.node):
        label = node_label(node, index) + where
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        if domain not in scope.imports:
            raise _fail(
                path,
                f"{label} is in domain {node.domain!r}, which the model imports no opset for",
            )
        if domain == "" and (node.domain, node.op_type) not in scope.functions:
            problem = _check_against_schema(scope, node, label)
            if problem is not None:
                raise _fail(path, problem)
        needs = {name for name in node.input if name}
        for attr_name, tensor in _tensor_attributes(node):
            _raise_tensor(path, check_tensor(tensor, "tensor", where=f"{attr_name!r} of {label}"))
        for attr in node.attribute:
            if attr.HasField("sparse_tensor") or len(attr.sparse_tensors):
                raise _fail(
                    path, f"{label} holds a sparse tensor ({attr.name!r}), which is not supported"
                )
        for attr_name, body in graph_attributes(node):
            inner = dataclasses.replace(scope, outer=frozenset(visible))
            needs |= _check_graph(body, inner, f" in the {attr_name!r} body of {label}")
        for name in sorted(needs):
            if name not in visible:
                raise _fail(
                    path,
                    f"{label} reads {name!r}, which no node, input or initializer produces",
                )
            if name not in local:
                free.add(name)
        reads.append(needs)
    for output in graph.output:
        if output.name not in visible:
            raise _fail(
                path,
                f"graph output {output.name!r}{where} is produced by no node, input or initializer",
            )
        if output.name not in local:
            free.add(output.name)
    _, cycle = _order(producer, reads)
    if cycle is not None:
        names = " -> ".join(repr(graph.node[i].name or graph.node[i].op_type) for i in cycle)
        raise _fail(path, f"the nodes{where} form a cycle: {names}")
    return free


def _raise_tensor(path: str | os.PathLike, problem: tuple[str, str] | None) -> None:
    if problem is not None:
        subject, complaint = problem
        raise _fail(path, f"{subject} {complaint}")


def _check_header(proto: onnx.ModelProto, path: str | os.PathLike) -> dict[str, int]:
    """IR version and opset imports; returns the imported version of each domain."""
    ir_version = proto.ir_version
    if ir_version > onnx.IR_VERSION:
        raise _fail(
            path,
            f"IR version {ir_version} is newer than this onnx ({onnx.__version__}) knows "
            f"(up to {onnx.IR_VERSION}): the file is damaged, or needs a newer onnx",
        )
    if ir_version < 3:
        raise _fail(
            path,
            f"IR version {ir_version} is older than any ONNX model with opset imports (3): "
            "the file is damaged, or needs re-exporting",
        )
    imports: dict[str, int] = {}
    for entry in proto.opset_import:
        domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        if domain in imports and imports[domain] != entry.version:
            raise _fail(
                path,
                f"opset of domain {entry.domain!r} is imported twice "
                f"(versions {imports[domain]} and {entry.version})",
            )
        imports[domain] = entry.version
    if "" in imports:
        newest = onnx.defs.onnx_opset_version()
        version = imports[""]
        if version > newest:
            raise _fail(
                path,
                f"opset {version} is newer than this onnx ({onnx.__version__}) knows "
                f"(up to {newest}): the file is damaged, or needs a newer onnx",
            )
        if version < 1:
            raise _fail(path, f"opset version {version} of the default domain is no opset")
    return imports


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED  # protobuf before 5.x


@functools.cache
def _text_fields(descriptor: Descriptor) -> tuple[list[FieldDescriptor], list[FieldDescriptor]]:
    """The string fields of a message type, and its message fields."""
    strings = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    messages = [f for f in descriptor.fields if f.message_type is not None]
    return strings, messages


def not_text(message: Message, where: str) -> str | None:
    """The first string field whose bytes are not UTF-8 (protobuf then hands out bytes, which
    every name comparison after would trip over), as a field path."""
    strings, messages = _text_fields(message.DESCRIPTOR)
    for f in strings:
        values = getattr(message, f.name)
        if not _repeated(f):
            values = [values]
        for i, value in enumerate(values):
            if not isinstance(value, str):
                return f"{where}.{f.name}" + (f"[{i}]" if _repeated(f) else "")
    for f in messages:
        if _repeated(f):
            subs = list(enumerate(getattr(message, f.name)))
        elif message.HasField(f.name):
            subs = [(None, getattr(message, f.name))]
        else:
            continue
        for i, sub in subs:
            found = not_text(sub, f"{where}.{f.name}" + ("" if i is None else f"[{i}]"))
            if found is not None:
                return found
    return None


def check_model(
    proto: onnx.ModelProto, path: str | os.PathLike, payloads: Payloads | None = None
) -> None:
    """Raise ModelLoadError naming the first problem that makes the model unusable.

    Nodes out of topological order, but acyclic, are put in order in place (onnx-ir and the
    checker need producers first; ONNX Runtime does not), and the default domain spelled
    "ai.onnx" is spelled "". `payloads` maps main-graph initializers whose raw_data wire.py
    stripped out of the message to the (offset, length) of those bytes in the file.
    """
    field_path = not_text(proto, "model")
    if field_path is not None:
        raise _fail(path, f"{field_path} is not UTF-8 text: the file is damaged")
    imports = _check_header(proto, path)
    for what, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for index, value in enumerate(values):
            try:  # a name, a type, and for a tensor its element type and shape (dims may be named)
                onnx.checker.check_value_info(value)
            except onnx.checker.ValidationError as exc:
                reason = str(exc).splitlines()[0].rstrip(".") if str(exc) else "invalid"
                name = repr(value.name) if value.name else f"#{index}"
                raise _fail(
                    path, f"graph {what} {name} does not pass onnx.checker: {reason}"
                ) from None
    functions = {(f.domain, f.name) for f in proto.functions}
    payloads = payloads or {}
    for tensor in proto.graph.initializer:
        raw = None
        if not tensor.HasField("raw_data") and tensor.name in payloads:
            raw = payloads[tensor.name][1]
        _raise_tensor(path, check_tensor(tensor, "initializer", raw))
    for tensor, where in _subgraph_initializers(proto.graph):
        _raise_tensor(path, check_tensor(tensor, "initializer", where=where))
    scope = _Scope(path, proto.ir_version, imports, functions)
    free = _check_graph(proto.graph, scope, "")
    assert not free  # the main graph has no outer scope
    _sort_graph(proto.graph)
    _spell_default_domain(proto)
    dynamic_dims(proto)
    _check_declarations(proto.graph, path)
    _check_with_onnx(proto, path, payloads)


def _spell_default_domain(proto: onnx.ModelProto) -> None:
    """The default domain spelled "ai.onnx" becomes "", as onnx-ir writes it: ONNX Runtime
    takes both, onnx's shape inference only the import's own spelling."""
    for entry in proto.opset_import:
        if entry.domain == "ai.onnx":
            entry.domain = ""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain == "ai.onnx":
                node.domain = ""
            graphs.extend(body for _, body in graph_attributes(node))


def dynamic_dims(proto: onnx.ModelProto) -> int:
    """Dims declared as `dim_value: -1` (older paddle2onnx and other exporters' "dynamic") become
    symbolic, as ONNX Runtime reads them: a graph input's or output's is named
    `<value>_dim<axis>` (one name per dim, so no two are claimed equal), a value_info's is left
    unknown. The model is written that way too; the IR spec has no negative dims. Returns how
    many dims changed."""
    changed = 0
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for values, named in ((graph.input, True), (graph.output, True), (graph.value_info, False)):
            for value in values:
                if not value.type.HasField("tensor_type"):
                    continue
                for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                    if dim.HasField("dim_value") and dim.dim_value == -1:
                        dim.Clear()
                        if named:
                            dim.dim_param = f"{value.name}_dim{axis}"
                        changed += 1
        for node in graph.node:
            graphs.extend(body for _, body in graph_attributes(node))
    return changed


def _declared(value: onnx.ValueInfoProto) -> tuple[int, list[int | None] | None] | None:
    """(element type, static dims or None per dim) of a declared tensor; None if not a tensor."""
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return tensor_type.elem_type, dims


def _check_declarations(graph: onnx.GraphProto, path: str | os.PathLike) -> None:
    """A tensor declared twice (graph input, output, value_info, initializer) with types that
    contradict each other: ONNX shape inference would blame whichever node reads it first."""
    seen: dict[str, tuple[str, tuple[int, list[int | None] | None]]] = {}
    stored = {t.name: (t.data_type, list(t.dims)) for t in graph.initializer}
    declarations = [
        *(("graph input", v) for v in graph.input),
        *(("graph output", v) for v in graph.output),
        *(("value_info", v) for v in graph.value_info),
    ]
    for what, value in declarations:
        declared = _declared(value)
        if declared is None:
            continue
        earlier = seen.setdefault(value.name, (what, declared))
        others = [earlier]
        if value.name in stored:
            others.append(("initializer", stored[value.name]))
        for other_what, (other_type, other_dims) in others:
            elem_type, dims = declared
            clash = elem_type and other_type and elem_type != other_type
            if dims is not None and other_dims is not None:
                clash = clash or len(dims) != len(other_dims)
                clash = clash or any(
                    a is not None and b is not None and a != b
                    for a, b in zip(dims, other_dims, strict=False)
                )
            if clash:
                raise _fail(
                    path,
                    f"tensor {value.name!r} is declared {data_type_name(elem_type)} {dims} as "
                    f"{what} but {data_type_name(other_type)} {other_dims} as {other_what}",
                )


_INFERENCE_ERROR = re.compile(r"\(op_type:([^,]*), node name: ([^)]*)\): \[\w+\] (.*)")


def _check_with_onnx(proto: onnx.ModelProto, path: str | os.PathLike, payloads: Payloads) -> None:
    """onnx.checker with full (strict) shape and type inference, as the output will be checked:
    what it refuses is refused here, before the work, not after it. An op given inputs it
    cannot take (a Conv fed a matrix) is named by node.

    Runs on a copy in which the main graph's initializers whose bytes are not in the message
    (payloads wire.py left in the file, external data) are graph inputs of the same type and
    shape: the checker would want their bytes (external ones relative to the working folder),
    inference does not. The copy holds the graph, not the big weights. Where external data is
    left elsewhere (a subgraph), strict inference runs without the checker.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    inputs = {value.name for value in graph.input}
    for index in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[index]
        stripped = tensor.name in payloads and not tensor.HasField("raw_data")
        if stripped or tensor.data_location == TensorProto.EXTERNAL:
            if tensor.name not in inputs:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
            del graph.initializer[index]
    external = any(
        t.data_location == TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(copy)
    )
    try:
        if external:
            onnx.shape_inference.infer_shapes(copy, check_type=True, strict_mode=True)
        else:
            onnx.checker.check_model(copy, full_check=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        match = _INFERENCE_ERROR.search(lines[0])
        if match is None:
            raise _fail(path, f"onnx.checker refuses it: {lines[0].rstrip('.')}") from None
        op_type, name, message = match.groups()
        node = f"node {name!r}" if name else "an unnamed node"
        raise _fail(path, f"{node} ({op_type}): {message} (ONNX shape inference)") from None
    except ValueError as exc:
        if "2GB" in str(exc) or "2 GB" in str(exc):
            return  # over protobuf's 2 GB even without the big payloads: checked at save
        # the checker's C++ side says what it cannot read this way (an unknown element type)
        first = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise _fail(path, f"onnx.checker refuses it: {first}") from None


def _subgraph_initializers(graph: onnx.GraphProto) -> Iterator[tuple[TensorProto, str]]:
    """Initializers of every subgraph, with where they are held."""
    for index, node in enumerate(graph.node):
        for attr_name, body in graph_attributes(node):
            where = f"in the {attr_name!r} body of {node_label(node, index)}"
            for tensor in body.initializer:
                yield tensor, where
            yield from _subgraph_initializers(body)


def _sort_graph(graph: onnx.GraphProto) -> set[str]:
    """Sort one graph and its subgraphs; return the outer-scope names it reads."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer} | producer.keys()
    reads: list[set[str]] = []
    for node in graph.node:
        needs = {name for name in node.input if name}
        for _, body in graph_attributes(node):
            needs |= _sort_graph(body)
        reads.append(needs)
    order, cycle = _order(producer, reads)
    assert cycle is None, "sorted after the cycle check"
    if order != sorted(order):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        for node in nodes:  # each node is copied once, into its place
            graph.node.add().CopyFrom(node)
    return (set().union(*reads, {o.name for o in graph.output})) - local
