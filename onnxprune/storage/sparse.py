"""Sparse initializers (COO): read into dense tensors, written where they take fewer bytes.

ONNX stores a mostly-zero tensor as a `sparse_initializer`: its non-zero values, shape [NNZ], and
their positions, as flat indices [NNZ] or coordinates [NNZ, rank], ascending without duplicates.
ONNX Runtime turns every sparse initializer into a dense tensor when it loads the model, for
every execution provider: the form saves disk and download, not memory, and costs load time.

Reading. onnx-ir has no sparse initializers (it drops them), so they are checked and taken out of
the parsed message before onnx-ir sees it. One in the main graph becomes a dense initializer whose
values are computed from the kept COO arrays each time it is read (one tensor at a time, never
the whole model); one in a subgraph is made dense in place. The model remembers that its input
had sparse storage (`SPARSE_KEY`), so that the output keeps it.

Writing. Each main-graph initializer goes sparse where its record in the file is smaller that way:
nnz x (item size + index size) and a few bytes of headers, against numel x item size. Flat indices
take the smallest signed type that holds numel - 1 (int8, int16, int32, int64): ONNX Runtime reads
all four (it writes sparse initializers that way itself; int8 and int16 only as raw_data, which is
how they are written here). onnx.checker accepts int64 indices only; `index="int64"` writes that
form, at up to 4 more bytes per stored value. "Zero" is an element whose bits are all zero, the
value ONNX Runtime fills in: -0.0 is a value like any other, so the dense tensor comes back
bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from onnxprune.core import wire
from onnxprune.core.tensors import tensor_chunks
from onnxprune.errors import InvalidArgumentError, ModelLoadError
from onnxprune.storage import wellformed

# model.meta keys: the input held sparse initializers (the output keeps the form), and the data
# files their values or indices were read from (inputs of the run, never destinations).
SPARSE_KEY = "onnxprune.sparse_storage"
SOURCES_KEY = "onnxprune.sparse_files"
# IR version 6 introduced sparse initializers.
MIN_IR_VERSION = 6
# Index types ONNX Runtime's loader reads, smallest first.
INDEX_TYPES = {
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.INT64: np.dtype(np.int64),
}
INDEX_POLICIES = ("smallest", "int64")
# Element types written sparse: those whose all-zero bytes are the number zero, and whose item
# size ONNX Runtime's loader handles (1, 2, 4 or 8 bytes).
WRITE_TYPES = frozenset(
    {
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE,
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)  # fmt: skip

CheckExternal = Callable[[str, ir.ExternalTensor, Path], None]


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coo:
    """One sparse tensor as read and checked: values, their flat positions, the dense shape."""

    name: str
    dtype: ir.DataType
    dims: tuple[int, ...]
    values: np.ndarray
    positions: np.ndarray  # flat indices into the dense tensor, ascending
    doc_string: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the dense tensor."""
        return math.prod(self.dims) * int(self.dtype.itemsize)

    def dense(self) -> np.ndarray:
        out = np.zeros(math.prod(self.dims), dtype=self.values.dtype)
        out[self.positions] = self.values
        return out.reshape(self.dims)

    def lazy(self) -> ir.LazyTensor:
        """A dense tensor computed from the COO arrays each time it is read (not kept)."""
        return ir.LazyTensor(
            lambda: ir.Tensor(self.dense(), dtype=self.dtype, name=self.name),
            dtype=self.dtype,
            shape=ir.Shape(self.dims),
            name=self.name,
            doc_string=self.doc_string or None,
        )

    def stub(self) -> TensorProto:
        """A dense initializer's header (no data) standing in for it while the model is checked."""
        stub = TensorProto(name=self.name, dims=self.dims, data_type=int(self.dtype))
        if self.doc_string:
            stub.doc_string = self.doc_string
        return stub


def _array(
    tensor: TensorProto, path: Path, check_external: CheckExternal, sources: set[str]
) -> np.ndarray:
    """A (checked) values or indices tensor's elements, external data read from its file."""
    try:
        read = ir.serde.deserialize_tensor(tensor, path.parent)
        if isinstance(read, ir.ExternalTensor):
            check_external(tensor.name or "(indices)", read, path.parent)
            sources.add(os.path.realpath(read.path))
        return read.numpy().reshape(-1)
    except (ValueError, TypeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{path}: sparse tensor part {tensor.name!r} cannot be read ({reason})"
        ) from None


def read(
    sparse: onnx.SparseTensorProto,
    path: Path,
    check_external: CheckExternal,
    where: str = "",
    sources: set[str] | None = None,
) -> Coo:
    """Check one SparseTensorProto as onnx.proto and ONNX Runtime need it, and read it.

    Raises ModelLoadError naming the first problem: no values or name, values that are not one
    list, a dims that is no tensor shape, indices of a type ONNX Runtime does not read, a count
    of indices that does not match the values, an index out of range, out of order or repeated.
    """
    sources = set() if sources is None else sources
    field_path = wellformed.not_text(sparse, f"a sparse initializer{where}")
    if field_path is not None:
        raise ModelLoadError(f"{path}: {field_path} is not UTF-8 text: the file is damaged")
    values = sparse.values
    name = values.name
    if not sparse.HasField("values") or not name:
        raise ModelLoadError(f"{path}: a sparse initializer{where} has no values or no name")
    label = f"sparse initializer {name!r}{where}"

    def fail(message: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {label} {message}")

    problem = wellformed.check_tensor(values, "values of sparse initializer", where=where)
    if problem is not None:
        raise ModelLoadError(f"{path}: {problem[0]} {problem[1]}")
    data_type = values.data_type
    if data_type == TensorProto.STRING or wellformed.BITS[data_type] % 8:
        type_name = wellformed.data_type_name(data_type)
        raise fail(f"holds {type_name} values, which onnxprune cannot read sparse")
    if len(values.dims) != 1:
        raise fail(f"has values of dims {list(values.dims)}: they must be one list, [NNZ]")
    nnz = values.dims[0]
    dims = tuple(sparse.dims)
    if not dims or any(d <= 0 for d in dims):
        raise fail(f"has dims {list(dims)}: a sparse tensor needs rank >= 1 and positive dims")
    count = math.prod(dims)
    if count * wellformed.BITS[data_type] // 8 > wellformed.MAX_BYTES:
        raise fail(f"claims dims {list(dims)}: more elements than any file can hold")
    if nnz > count:
        raise fail(f"holds {nnz} values for {count} elements")
    if not sparse.HasField("indices"):
        if nnz:
            raise fail(f"holds {nnz} values but no indices")
        positions = np.zeros(0, np.int64)
    else:
        indices = sparse.indices
        problem = wellformed.check_tensor(indices, "indices", where=f"of {label}")
        if problem is not None:
            raise ModelLoadError(f"{path}: {problem[0]} {problem[1]}")
        if indices.data_type not in INDEX_TYPES:
            type_name = wellformed.data_type_name(indices.data_type)
            raise fail(f"has {type_name} indices; ONNX Runtime reads INT8, INT16, INT32 or INT64")
        shape = list(indices.dims)
        if shape not in ([nnz], [nnz, len(dims)]):
            raise fail(
                f"holds {nnz} values but indices of dims {shape} (expected [{nnz}], or "
                f"[{nnz}, {len(dims)}] for coordinates)"
            )
        stored = _array(indices, path, check_external, sources)
        positions = _flat_positions(stored, shape, dims, fail)
    values_array = _array(values, path, check_external, sources)
    return Coo(name, ir.DataType(data_type), dims, values_array, positions, values.doc_string or "")


def _flat_positions(
    stored: np.ndarray, shape: list[int], dims: tuple[int, ...], fail: Callable[[str], Exception]
) -> np.ndarray:
    """Flat positions from stored indices, each checked in range, ascending, unrepeated."""
    count = math.prod(dims)
    if len(shape) == 1:
        positions = stored
        outside = np.flatnonzero((positions < 0) | (positions >= count))
        if outside.size:
            i = int(outside[0])
            raise fail(f"has index {int(positions[i])} at position {i}, outside [0, {count})")
    else:
        coords = stored.astype(np.int64, copy=False).reshape(shape)
        outside = np.argwhere((coords < 0) | (coords >= np.asarray(dims)))
        if outside.size:
            i, j = (int(k) for k in outside[0])
            raise fail(
                f"has coordinate {int(coords[i, j])} at [{i}, {j}], outside [0, {dims[j]}) "
                f"(dims {list(dims)})"
            )
        positions = np.ravel_multi_index(tuple(coords.T), dims) if coords.size else stored[:0]
    steps = np.flatnonzero(np.diff(positions.astype(np.int64, copy=False)) <= 0)
    if steps.size:
        i = int(steps[0]) + 1
        before, at = int(positions[i - 1]), int(positions[i])
        what = "repeated" if at == before else "out of order"
        raise fail(
            f"has indices {what} at position {i} ({at} after {before}); ONNX requires them "
            "ascending without duplicates"
        )
    return positions


def _where(node: onnx.NodeProto, index: int, attr: str) -> str:
    return f" in the {attr!r} body of {wellformed.node_label(node, index)}"


def _bodies(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, str]]:
    """Every subgraph (If/Loop/Scan bodies, nested), with where it is held."""
    for index, node in enumerate(graph.node):
        for attr, body in wellformed.graph_attributes(node):
            yield body, _where(node, index, attr)
            yield from _bodies(body)


@dataclass
class Taken:
    """The sparse initializers a model held, taken out of its message."""

    main: dict[str, Coo] = field(default_factory=dict)  # main graph: now stubs, made lazy after
    subgraphs: int = 0  # made dense in place
    sources: set[str] = field(default_factory=set)  # data files their parts were read from

    def __bool__(self) -> bool:
        return bool(self.main or self.subgraphs)


def take(proto: onnx.ModelProto, path: Path, check_external: CheckExternal) -> Taken:
    """Check and take out every sparse initializer, before onnx-ir (which drops them) runs.

    Main graph: each becomes a data-less dense initializer (a stub; `Taken.main` has its arrays,
    for `Coo.lazy`). Subgraphs: each becomes a dense initializer in place.
    """
    taken = Taken()
    graph = proto.graph
    for sparse in graph.sparse_initializer:
        coo = read(sparse, path, check_external, sources=taken.sources)
        taken.main.setdefault(coo.name, coo)  # a repeated name is refused by the checks after
        graph.initializer.append(coo.stub())
    del graph.sparse_initializer[:]
    for body, where in _bodies(graph):
        for sparse in body.sparse_initializer:
            coo = read(sparse, path, check_external, where, taken.sources)
            dense = ir.serde.serialize_tensor(ir.Tensor(coo.dense(), dtype=coo.dtype))
            dense.name = coo.name
            body.initializer.append(dense)
            taken.subgraphs += 1
        del body.sparse_initializer[:]
    return taken


def proto_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every stored tensor of a message, the values and indices of sparse ones included."""
    yield from onnx.external_data_helper._get_all_tensors(proto)
    for graph in [proto.graph, *(body for body, _ in _bodies(proto.graph))]:
        for sparse in graph.sparse_initializer:
            yield sparse.values
            if sparse.HasField("indices"):
                yield sparse.indices


def check_written(proto: onnx.ModelProto, path: Path, check_external: CheckExternal) -> int:
    """The output check of the sparse initializers of a written model; returns their count.

    Each is read back as a model input is (values, indices, order, ranges) and handed to
    onnx.checker with its indices widened to int64, the one type the checker takes. It is then
    replaced in `proto` by a graph input of its type and shape: ONNX shape inference types a
    sparse initializer as a sparse tensor, which no Conv or MatMul accepts, so the graph itself
    is checked as ONNX Runtime will run it, with the tensor dense.
    """
    graph = proto.graph
    names = {t.name for t in graph.initializer}
    for sparse in graph.sparse_initializer:
        try:
            coo = read(sparse, path, check_external)
        except ModelLoadError as exc:
            raise onnx.checker.ValidationError(str(exc)) from None
        if coo.name in names:
            raise onnx.checker.ValidationError(f"initializer {coo.name!r} is defined twice")
        names.add(coo.name)
        copy = onnx.SparseTensorProto(dims=coo.dims)
        copy.values.CopyFrom(onnx.numpy_helper.from_array(coo.values, coo.name))
        copy.values.data_type = int(coo.dtype)  # bfloat16 and the like as their own type
        copy.indices.CopyFrom(onnx.numpy_helper.from_array(coo.positions.astype(np.int64)))
        onnx.checker.check_sparse_tensor(copy)
        graph.input.append(
            onnx.helper.make_tensor_value_info(coo.name, int(coo.dtype), list(coo.dims))
        )
    count = len(graph.sparse_initializer)
    del graph.sparse_initializer[:]
    return count


# -- writing -------------------------------------------------------------------------------------


def index_dtype(count: int, index: str = "smallest") -> np.dtype:
    """The index type of a tensor of `count` elements: the smallest signed integer holding
    count - 1, or int64 (`index="int64"`, the only type onnx.checker accepts)."""
    if index == "int64":
        return np.dtype(np.int64)
    return next(d for d in INDEX_TYPES.values() if count - 1 <= np.iinfo(d).max)


@dataclass(frozen=True)
class Form:
    """How one initializer is written sparse, and what that saves."""

    nnz: int
    index: np.dtype
    dense_bytes: int  # its record in the file, dense
    sparse_bytes: int  # and sparse


@dataclass
class Layout:
    """Which main-graph initializers a save writes sparse."""

    forms: dict[str, Form]  # by initializer name
    index: str = "smallest"
    considered: int = 0  # initializers that could have gone sparse

    def summary(self) -> dict:
        dense = sum(f.dense_bytes for f in self.forms.values())
        sparse = sum(f.sparse_bytes for f in self.forms.values())
        return {
            "tensors": len(self.forms),
            "considered": self.considered,
            "index": self.index,
            "index_types": sorted({f.index.name for f in self.forms.values()}),
            "dense_bytes": dense,
            "sparse_bytes": sparse,
            "saved_bytes": dense - sparse,
        }


def flat_chunks(tensor: ir.TensorProtocol) -> Iterator[np.ndarray]:
    """A tensor's elements in order, chunk by chunk, little-endian (a pruned weight streams)."""
    chunks = getattr(tensor, "chunks", None)
    if chunks is not None:
        yield from chunks()
        return
    for _, chunk in tensor_chunks(tensor):
        yield chunk.astype(chunk.dtype.newbyteorder("<"), copy=False)


def _bits(chunk: np.ndarray) -> np.ndarray:
    return chunk.reshape(-1).view(f"u{chunk.dtype.itemsize}")


def count_nonzero(tensor: ir.TensorProtocol) -> int:
    """Elements whose bits are not all zero (what a sparse initializer must store)."""
    return sum(int(np.count_nonzero(_bits(chunk))) for chunk in flat_chunks(tensor))


def candidates(model: ir.Model) -> list[ir.Value]:
    """Main-graph initializers that can be written sparse: a type whose zero is all-zero bytes,
    a static shape of rank >= 1 with no empty axis, not also a graph input (an input's default
    value stays dense)."""
    if sys.byteorder != "little":
        return []
    inputs = {v.name for v in model.graph.inputs}
    found = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.name in inputs or tensor.dtype not in WRITE_TYPES:
            continue
        dims = tensor.shape.dims
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            found.append(value)
    return found


class Parts:
    """One initializer's COO form, computed from its dense tensor chunk by chunk.

    `values()` streams the non-zero values and keeps their positions (nnz x the index size);
    `indices()` then hands those out, or makes its own pass if `values()` did not run first.
    """

    def __init__(self, tensor: ir.TensorProtocol, name: str, form: Form) -> None:
        self.tensor, self.name, self.form = tensor, name, form
        self.values_nbytes = form.nnz * int(tensor.dtype.itemsize)
        self.indices_nbytes = form.nnz * form.index.itemsize
        self._positions: list[np.ndarray] | None = None

    def values(self) -> Iterator[np.ndarray]:
        positions: list[np.ndarray] = []
        start = stored = 0
        for chunk in flat_chunks(self.tensor):
            where = np.flatnonzero(_bits(chunk))
            positions.append((where + start).astype(self.form.index, copy=False))
            start += chunk.size
            stored += where.size
            yield chunk.reshape(-1)[where]
        if stored != self.form.nnz:
            raise RuntimeError(f"tensor {self.name!r}: {stored} values, counted {self.form.nnz}")
        self._positions = positions

    def indices(self) -> Iterator[np.ndarray]:
        if self._positions is None:
            for _ in self.values():
                pass
        positions, self._positions = self._positions, None
        yield from positions or []

    def values_head(self) -> TensorProto:
        head = TensorProto(name=self.name, dims=[self.form.nnz], data_type=int(self.tensor.dtype))
        if self.tensor.doc_string:
            head.doc_string = self.tensor.doc_string
        for key, value in (self.tensor.metadata_props or {}).items():
            head.metadata_props.add(key=key, value=value)
        return head

    def indices_head(self) -> TensorProto:
        data_type = next(t for t, d in INDEX_TYPES.items() if d == self.form.index)
        return TensorProto(dims=[self.form.nnz], data_type=data_type)

    def frame(self) -> tuple[bytes, bytes, bytes]:
        return wire.sparse_initializer_frame(
            self.values_head(),
            self.values_nbytes,
            self.indices_head(),
            self.indices_nbytes,
            self.tensor.shape.numpy(),
        )

    def write(self, file) -> None:
        """Append the sparse initializer to a model file, streamed."""
        before, between, after = self.frame()
        start = file.tell()
        file.write(before)
        for chunk in self.values():
            file.write(chunk.view(np.uint8).data)
        file.write(between)
        for chunk in self.indices():
            file.write(chunk.view(np.uint8).data)
        file.write(after)
        expected = self.form.sparse_bytes
        if file.tell() - start != expected:
            raise ValueError(
                f"sparse tensor {self.name!r} wrote {file.tell() - start} bytes, expected "
                f"{expected}"
            )

    def as_tensors(self) -> tuple[ir.TensorProtocol, ir.TensorProtocol]:
        """The values and the indices as tensors that stream into a data file (`chunks`)."""
        return (
            _Stream(self.values, self.tensor.dtype, self.form.nnz, f"{self.name} (values)"),
            _Stream(
                self.indices,
                ir.DataType.from_numpy(self.form.index),
                self.form.nnz,
                f"{self.name} (indices)",
            ),
        )


class _Stream(ir.LazyTensor):
    """A 1-D tensor whose bytes come from a generator of chunks (for datafile.write_tensor)."""

    __slots__ = ("_chunks",)

    def __init__(
        self, chunks: Callable[[], Iterator[np.ndarray]], dtype: ir.DataType, count: int, name: str
    ) -> None:
        super().__init__(
            lambda: ir.Tensor(np.concatenate([*chunks(), np.zeros(0, dtype.numpy())])),
            dtype=dtype,
            shape=ir.Shape([count]),
            name=name,
        )
        self._chunks = chunks

    def chunks(self) -> Iterator[np.ndarray]:
        return self._chunks()


def decide(tensor: ir.TensorProtocol, name: str, index: str = "smallest") -> Form | None:
    """The sparse form of one tensor, if it takes fewer bytes than the dense one."""
    dense_head = wire.initializer_head(tensor, name)
    if dense_head is None:
        return None
    dense = len(dense_head) + tensor.nbytes
    nnz = count_nonzero(tensor)
    dtype = index_dtype(tensor.size, index)
    # a lower bound first: the payloads alone (most tensors stop here)
    if nnz * (int(tensor.dtype.itemsize) + dtype.itemsize) >= dense:
        return None
    form = Form(nnz, dtype, dense, 0)
    parts = Parts(tensor, name, form)
    sparse = sum(map(len, parts.frame())) + parts.values_nbytes + parts.indices_nbytes
    if sparse >= dense:
        return None
    return Form(nnz, dtype, dense, sparse)


def check_possible(model: ir.Model) -> None:
    """Sparse storage needs IR version 6 or later; refuse it (one line) before any work."""
    if (model.ir_version or 0) < MIN_IR_VERSION:
        raise InvalidArgumentError(
            f"--sparse-storage: the model's IR version {model.ir_version} has no sparse "
            f"initializers (IR {MIN_IR_VERSION} added them); leave the option out, or re-export "
            "the model with a newer exporter"
        )


def plan(model: ir.Model, index: str = "smallest") -> Layout:
    """Decide, tensor by tensor, which main-graph initializers are written sparse."""
    if index not in INDEX_POLICIES:
        raise ValueError(f"index {index!r}: choose one of {', '.join(INDEX_POLICIES)}")
    forms = {}
    values = candidates(model)
    for value in values:
        assert value.const_value is not None and value.name is not None
        form = decide(value.const_value, value.name, index)
        if form is not None:
            forms[value.name] = form
    return Layout(forms, index, len(values))
