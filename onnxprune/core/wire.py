"""Just enough of the protobuf wire format to map a model's weights in place, not copy them.

`onnx.load` reads the whole file and parses it into a second copy, so a single-file model costs
twice its size in memory before any work starts. Here the file is memory-mapped, the main graph's
initializers are parsed without their `raw_data` payloads, and each payload becomes a lazy tensor
that views the mapped file: no copy, pages the kernel can drop, zero parse time for the weights.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir

# Field numbers from onnx.proto: ModelProto.graph, GraphProto.initializer, and TensorProto's
# raw_data, external_data and data_location.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
GRAPH_SPARSE_INITIALIZER = 15
# SparseTensorProto's values, indices and dims.
SPARSE_VALUES = 1
SPARSE_INDICES = 2
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
LENGTH_DELIMITED = 2
# Payloads smaller than this stay in the parsed message: mapping them buys nothing.
MAP_MIN_BYTES = 1024
# Maps every page of a mapping in one call, not one page fault at a time, where the OS has it.
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(
    buf: mmap.mmap | bytes, start: int, end: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in a message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire_type == 1:
            value_end = pos + 8
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire_type == 5:
            value_end = pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if value_end > end:
            raise WireError("field runs past the end of its message")
        yield number, wire_type, field_start, pos, value_end
        pos = value_end


def _field_head(number: int, length: int) -> bytes:
    """Key and length of a length-delimited field whose payload follows."""
    return _encode_varint(number << 3 | LENGTH_DELIMITED) + _encode_varint(length)


def _field(number: int, payload: bytes) -> bytes:
    return _field_head(number, len(payload)) + payload


def _strip_tensor(buf: mmap.mmap, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without its raw_data payload, and where that payload lies."""
    raw = None
    external = False
    kept = bytearray()
    for number, wire_type, field_start, value_start, value_end in fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire_type == LENGTH_DELIMITED:
            raw = (value_start, value_end - value_start)
            continue
        if number == TENSOR_DATA_LOCATION:
            external = external or _varint(buf, value_start, value_end)[0] == 1
        kept += buf[field_start:value_end]
    if raw is None or external or raw[1] < MAP_MIN_BYTES:
        return bytes(buf[start:end]), None
    return bytes(kept), raw


def _external_fields(location: str, offset: int, length: int) -> bytes:
    entries = b"".join(
        _field(TENSOR_EXTERNAL_DATA, _field(1, key.encode()) + _field(2, str(value).encode()))
        for key, value in (("location", location), ("offset", offset), ("length", length))
    )
    return entries + _encode_varint(TENSOR_DATA_LOCATION << 3) + _encode_varint(1)


def load_mapped(
    path: str, *, as_external: bool = False, populate: bool = False
) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]], mmap.mmap]:
    """Parse a model whose main-graph initializer payloads stay in the mapped file.

    Returns the parsed message (payloads removed), the (offset, length) of each removed payload
    by initializer name, and the mapping they live in. With `as_external`, each removed payload
    is described as external data in the file itself, which is what onnx.checker needs to check
    the model without reading its weights. `populate` maps all pages up front, for callers that
    are about to read every weight.
    """
    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)
        mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    payloads: dict[str, tuple[int, int]] = {}
    skeleton = bytearray()
    for number, wire_type, field_start, value_start, value_end in fields(mapped, 0, len(mapped)):
        if number != MODEL_GRAPH or wire_type != LENGTH_DELIMITED:
            skeleton += mapped[field_start:value_end]
            continue
        graph = bytearray()
        for g_number, g_type, g_start, g_value, g_end in fields(mapped, value_start, value_end):
            if g_number != GRAPH_INITIALIZER or g_type != LENGTH_DELIMITED:
                graph += mapped[g_start:g_end]
                continue
            tensor, raw = _strip_tensor(mapped, g_value, g_end)
            if raw is not None:
                header = onnx.TensorProto.FromString(tensor)
                name = header.name
                try:
                    whole_bytes = ir.DataType(header.data_type).bitwidth % 8 == 0
                except (ValueError, TypeError):  # no such data type: left for the load to name
                    whole_bytes = False
                if name and name not in payloads and whole_bytes:
                    payloads[name] = raw
                    if as_external:
                        tensor += _external_fields(os.path.basename(path), *raw)
                else:
                    tensor = bytes(mapped[g_value:g_end])
            graph += _field(GRAPH_INITIALIZER, tensor)
        skeleton += _field(MODEL_GRAPH, bytes(graph))
    proto = onnx.ModelProto.FromString(bytes(skeleton))
    return proto, payloads, mapped


def mapped_tensor(
    mapped: mmap.mmap, offset: int, length: int, dtype: ir.DataType, shape: ir.Shape, name: str
) -> ir.TensorProtocol:
    """A tensor whose every read is a zero-copy view of the mapped file."""
    np_dtype = np.dtype(dtype.numpy()).newbyteorder("<")
    count = int(np.prod(shape.numpy(), dtype=np.int64))
    if count * np_dtype.itemsize != length:
        raise WireError(f"tensor {name!r}: {length} bytes of data for {count} elements")

    def view() -> ir.Tensor:
        array = np.frombuffer(mapped, dtype=np_dtype, count=count, offset=offset)
        return ir.Tensor(array.reshape(shape.numpy()), dtype=dtype, name=name)

    return ir.LazyTensor(view, dtype=dtype, shape=shape, name=name)


def initializer_head(tensor: ir.TensorProtocol, name: str) -> bytes | None:
    """What `write_initializer` writes before a plain tensor's payload (`tensor.nbytes` bytes
    follow it); None for tensors that go through onnx-ir's serialiser instead."""
    dtype = tensor.dtype
    # STRING first: onnx-ir has no bit width for it (asking raises)
    plain = dtype != ir.DataType.STRING and dtype.bitwidth % 8 == 0 and sys.byteorder == "little"
    if not plain:
        return None
    length = tensor.nbytes
    header = onnx.TensorProto(name=name, dims=tensor.shape.numpy(), data_type=int(dtype))
    if tensor.doc_string:
        header.doc_string = tensor.doc_string
    for key, value in (tensor.metadata_props or {}).items():
        header.metadata_props.add(key=key, value=value)
    tensor_head = header.SerializeToString() + _field_head(TENSOR_RAW_DATA, length)
    init_head = _field_head(GRAPH_INITIALIZER, len(tensor_head) + length)
    graph_head = _field_head(MODEL_GRAPH, len(init_head) + len(tensor_head) + length)
    return graph_head + init_head + tensor_head


def write_initializer(file: BinaryIO, tensor: ir.TensorProtocol, name: str) -> None:
    """Append one initializer to a model file as `graph { initializer { ... } }`.

    The payload goes to the file through the tensor's own `tofile` (a view of an array, or a
    pruned tensor streaming chunk by chunk): no bytes object, no protobuf copy, no serialised
    copy. Tensors whose bytes are not a plain little-endian array (strings, sub-byte types) go
    through onnx-ir's serialiser instead.
    """
    head = initializer_head(tensor, name)
    if head is None:
        chunk = onnx.ModelProto()
        tensor.name = name
        ir.serde.serialize_tensor_into(chunk.graph.initializer.add(), from_=tensor)
        file.write(chunk.SerializeToString())
        return
    length = tensor.nbytes
    file.write(head)
    start = file.tell()
    tensor.tofile(file)
    if file.tell() - start != length:
        raise ValueError(f"tensor {name!r} wrote {file.tell() - start} bytes, expected {length}")


def sparse_initializer_frame(
    values: onnx.TensorProto,
    values_length: int,
    indices: onnx.TensorProto,
    indices_length: int,
    dims: Sequence[int],
) -> tuple[bytes, bytes, bytes]:
    """`graph { sparse_initializer { values {...} indices {...} dims } }` around two payloads.

    `values` and `indices` are the tensors' headers without raw_data; their raw_data payloads
    (`values_length` and `indices_length` bytes) are streamed between the three parts returned:
    what comes before the values' payload, between the two payloads, and after the indices'.
    """
    values_head = values.SerializeToString() + _field_head(TENSOR_RAW_DATA, values_length)
    indices_head = indices.SerializeToString() + _field_head(TENSOR_RAW_DATA, indices_length)
    values_field = _field_head(SPARSE_VALUES, len(values_head) + values_length)
    indices_field = _field_head(SPARSE_INDICES, len(indices_head) + indices_length)
    tail = onnx.SparseTensorProto(dims=dims).SerializeToString()
    sparse_length = (
        len(values_field) + len(values_head) + values_length
        + len(indices_field) + len(indices_head) + indices_length + len(tail)
    )  # fmt: skip
    sparse_field = _field_head(GRAPH_SPARSE_INITIALIZER, sparse_length)
    graph_field = _field_head(MODEL_GRAPH, len(sparse_field) + sparse_length)
    return (
        graph_field + sparse_field + values_field + values_head,
        indices_field + indices_head,
        tail,
    )
