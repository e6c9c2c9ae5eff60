"""Validation inputs: the user's .npz matched to the model's inputs, or generated ones, in batches.

Checks happen here, before any model runs, so a wrong array name, shape or dtype is one clear
`DataError` instead of an ONNX Runtime message from deep inside a session.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxprune.errors import DataError, InvalidArgumentError

if TYPE_CHECKING:
    import onnx_ir as ir

LABELS = "labels"
DEFAULT_BATCH = 32
# Generated inputs: this many batches, so that agreement is not decided by a single sample.
GENERATED_BATCHES = 8
# Generated integer inputs (token ids, indices, masks) stay small so that they index any table.
INT_HIGH = 10
# Generated inputs: one batch may take at most this many bytes (a typo in --batch-size must not
# try to allocate terabytes).
GENERATED_MAX_BYTES = 1 << 30
NPY_MAGIC = b"\x93NUMPY"
# Deflate expands data by at most about 1032:1; a zip member claiming more is damaged or forged.
MAX_DEFLATE_RATIO = 1032

# ONNX Runtime's type strings for tensor inputs -> numpy dtypes it accepts.
ORT_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One model input as ONNX Runtime sees it; a dim is an int, a symbolic name, or None."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


def input_specs(session: object) -> list[InputSpec]:
    """The inputs an ONNX Runtime session needs (initializers with defaults are not among them)."""
    specs = []
    for arg in session.get_inputs():  # type: ignore[attr-defined]
        if arg.type not in ORT_TYPES:
            raise DataError(
                f"model input {arg.name!r} has type {arg.type}, which onnxprune cannot feed "
                "(numeric and bool tensors only)"
            )
        shape = tuple(d if isinstance(d, int) or d is None else str(d) for d in arg.shape)
        specs.append(InputSpec(arg.name, np.dtype(ORT_TYPES[arg.type]), shape))
    return specs


@dataclass
class Inputs:
    """Batches of feeds for every model input, and the labels that go with their rows."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str
    batch_size: int
    notices: list[str] = field(default_factory=list)
    generated: bool = False  # made up by `generate`, not the user's samples

    @property
    def samples(self) -> int:
        return sum(batch_rows(batch) for batch in self.batches)

    def sample_values(self) -> dict[str, np.ndarray]:
        """The scalar (0-d) inputs: fed the same in every batch, so a count may use them."""
        return {name: a for name, a in self.batches[0].items() if a.ndim == 0}

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Input shapes of one inference, batch 1 where the batch axis is free: what MACs count."""
        shapes = {name: tuple(int(d) for d in a.shape) for name, a in self.batches[0].items()}
        for spec in specs:
            if spec.shape and not isinstance(spec.shape[0], int):
                shapes[spec.name] = (1, *shapes[spec.name][1:])
        return shapes


def batch_rows(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the first axis of its arrays (a scalar input is the same for all)."""
    return next((int(a.shape[0]) for a in batch.values() if a.ndim), 1)


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """['x=1x3x224x224'] -> {'x': (1, 3, 224, 224)}; one entry may name several inputs,
    'ids=1x128,mask=1x128', and 'x=' is a scalar (0-d)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in (part.strip() for entry in specs or () for part in entry.split(",")):
        if not spec:
            continue
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InvalidArgumentError(
                f"--input-shape {spec!r}: write NAME=DIMS, e.g. input=1x3x224x224 (several: "
                "input_ids=1x128,attention_mask=1x128)"
            ) from None
        if 0 in shape:
            raise InvalidArgumentError(
                f"--input-shape {spec!r}: a dimension of 0 makes an empty input; every size must "
                "be at least 1"
            )
        shapes[name] = shape
    return shapes


def check_batch_size(batch_size: int | None) -> None:
    """--batch-size must be a positive count (a huge one is cut to the samples there are)."""
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"--batch-size {batch_size}: must be at least 1")


@dataclass(frozen=True)
class ArrayHeader:
    """One array of an .npz file as its header describes it (checked against the bytes stored)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _npz_example(option: str) -> str:
    if option == "--calibration":
        return "np.savez('calib.npz', input=x)"
    return "np.savez('val.npz', input=x, labels=y)"


@contextlib.contextmanager
def _open_npz(path: Path, option: str) -> Iterator[zipfile.ZipFile]:
    """The .npz as a zip archive; a .npy, a missing file or anything not a zip is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic == NPY_MAGIC:
        raise DataError(
            f"{path} is a .npy array; {option} needs an .npz with one array per model input, "
            f"e.g. {_npz_example(option)}"
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npz file ({exc}); {option} needs one array per model input, "
            f"e.g. {_npz_example(option)}"
        ) from None
    with archive:
        try:
            yield archive
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            # a damaged member (CRC, truncated data, bad deflate stream) found while reading it
            raise DataError(f"{path}: damaged .npz file ({exc})") from None


def _members(archive: zipfile.ZipFile, path: Path) -> list[tuple[str, zipfile.ZipInfo]]:
    members = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
        members.append((key, info))
    if not members:
        raise DataError(f"{path}: the .npz file holds no arrays")
    return members


def _read_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path
) -> ArrayHeader:
    """An array's header, refused unless the bytes the archive holds can be that array.

    A header is a claim: before anything is allocated, the size it claims must fit the size of
    the member, and that size must fit what the archive can hold (stored bytes, or at most
    deflate's largest expansion of the compressed bytes, within the file's length).
    """
    where = f"{path}: array {key!r}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(
            f"{where} is compressed with zip method {info.compress_type}; save the file with "
            "np.savez or np.savez_compressed"
        )
    if info.compress_size > path.stat().st_size or info.file_size > (
        info.compress_size
        if info.compress_type == zipfile.ZIP_STORED
        else info.compress_size * MAX_DEFLATE_RATIO + 1024
    ):
        raise DataError(f"{where}: the zip directory gives impossible sizes (a damaged file)")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        except ValueError as exc:
            raise DataError(f"{where} is not a .npy array ({exc})") from None
        start = member.tell()
    header = ArrayHeader(key, tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran))
    if header.dtype.hasobject:
        raise DataError(
            f"{where} holds Python objects (dtype {header.dtype}); onnxprune loads no pickles: "
            "save numeric arrays"
        )
    if header.nbytes > info.file_size - start:
        raise DataError(
            f"{where}: its header claims shape {list(header.shape)} of {header.dtype} "
            f"({header.nbytes:,} bytes) but the file holds {max(0, info.file_size - start):,} "
            "bytes of data (a damaged or forged file)"
        )
    return header


def read_npz_headers(path: str | os.PathLike, option: str = "--data") -> dict[str, ArrayHeader]:
    """The arrays of an .npz file as their headers describe them, checked, no data read."""
    path = Path(path)
    with _open_npz(path, option) as archive:
        return {
            key: _read_header(archive, info, key, path) for key, info in _members(archive, path)
        }


def load_npz(
    path: str | os.PathLike, option: str = "--data", keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (or those of `keys` it has), each checked before it is read.

    No pickles (a data file must not run code), no header that claims more than the file holds.
    """
    path = Path(path)
    arrays = {}
    with _open_npz(path, option) as archive:
        for key, info in _members(archive, path):
            if keys is not None and key not in keys:
                continue
            _read_header(archive, info, key, path)
            with archive.open(info) as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                member.read()  # to the end: the CRC is checked there
    return arrays


def _shape_text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _scalar_type(dtype: np.dtype) -> str:
    """How numpy code makes a scalar of `dtype` (np.bool_ in every numpy version)."""
    return "np.bool_" if dtype.kind == "b" else f"np.{dtype.name}"


def _check_array(key: str, array: np.ndarray, spec: InputSpec) -> None:
    if array.dtype != spec.dtype:
        raise DataError(
            f"array {key!r} is {array.dtype}, model input {spec.name!r} expects {spec.dtype}: "
            f"convert it, e.g. np.savez(..., {spec.name}=a.astype(np.{spec.dtype.name}))"
        )
    if not spec.shape:
        if array.ndim:
            raise DataError(
                f"array {key!r} has shape {list(array.shape)}, model input {spec.name!r} is a "
                f"scalar (0-d, the same for every sample): save one value, e.g. "
                f"np.savez(..., {spec.name}={_scalar_type(spec.dtype)}(value))"
            )
        return
    wrong = array.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], array.shape[1:], strict=False)
    )
    if wrong:
        raise DataError(
            f"array {key!r} has shape {list(array.shape)}, model input {spec.name!r} has shape "
            f"{_shape_text(spec.shape)} (the first axis of the array is the sample axis)"
        )


@dataclass
class Matched:
    """Arrays (or their headers) matched to model inputs and checked; the batching decided."""

    by_input: dict[str, tuple[str, Any]]  # model input -> (array key, array or header)
    labels: Any | None
    total: int  # samples in the arrays
    usable: int  # samples in whole batches
    size: int  # samples per batch
    notices: list[str]


# The name np.savez gives an array passed without a keyword: the one name any single input takes.
UNNAMED = "arr_0"


def match(
    arrays: Mapping[str, Any],
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None = None,
    source: str = "data",
) -> Matched:
    """Match arrays to inputs by name (one unnamed array, `arr_0`, is fine for one input) and
    check them: dtypes, ranks, fixed dims, equal sample counts, labels. Works on arrays and on
    headers alike, so a file is checked before its data is read."""
    check_batch_size(batch_size)
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    notices: list[str] = []
    by_input: dict[str, tuple[str, Any]] = {}
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        key = next(iter(arrays))
        if key != UNNAMED:  # a name of its own is another input's: a different model's samples
            raise DataError(
                f"{source}: the array is named {key!r}, the model's input {specs[0].name!r}; "
                f"name it {specs[0].name!r} (or save it unnamed: np.savez(path, array))"
            )
        by_input[specs[0].name] = (key, arrays[key])
    else:
        for spec in specs:
            if spec.name not in arrays:
                have = ", ".join(repr(k) for k in arrays) or "none besides labels"
                need = ", ".join(repr(s.name) for s in specs)
                raise DataError(
                    f"{source}: no array for model input {spec.name!r} (arrays in the file: "
                    f"{have}; the model needs {need}, plus optional 'labels')"
                )
            by_input[spec.name] = (spec.name, arrays[spec.name])
    extra = sorted(set(arrays) - {key for key, _ in by_input.values()})
    if extra:
        notices.append(f"arrays not used by the model: {', '.join(extra)}")

    for spec in specs:
        _check_array(*by_input[spec.name], spec)
    # a 0-d array (a scalar input) is the same for every sample: it counts none
    counts = {key: int(a.shape[0]) for key, a in by_input.values() if a.ndim}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{source}: input arrays have different numbers of samples: "
            + ", ".join(f"{k} {n}" for k, n in counts.items())
        )
    total = next(iter(counts.values()), 0 if counts or not by_input else 1)
    if total == 0:
        raise DataError(f"{source}: the arrays hold no samples")
    for key, a in by_input.values():
        if 0 in a.shape:
            raise DataError(f"{source}: array {key!r} is empty (shape {list(a.shape)})")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"{source}: 'labels' must be a 1-D integer array of class indices, got "
                f"{labels.dtype}{list(labels.shape)}"
            )
        if labels.shape[0] != total:
            raise DataError(
                f"{source}: 'labels' has {labels.shape[0]} entries but the inputs have {total} "
                "samples"
            )

    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if len(fixed) > 1:
        raise DataError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    if fixed:
        size = fixed.pop()
        if batch_size is not None and batch_size != size:
            notices.append(f"the model's batch dimension is fixed at {size}; batch size {size}")
        usable = total - total % size
        if usable == 0:
            raise DataError(f"{source}: {total} samples, fewer than the model's fixed batch {size}")
        if usable < total:
            notices.append(f"last {total - usable} samples dropped: not a full batch of {size}")
    else:
        # a batch larger than the data would only be the data: never more rows than there are
        size = min(batch_size or DEFAULT_BATCH, total)
        usable = total
    return Matched(by_input, labels, total, usable, size, notices)


def check_labels(labels: np.ndarray, classes: int | None, source: str = "data") -> None:
    """Class indices in [0, classes): a label the model cannot output makes accuracy a lie."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"{source}: 'labels' holds {low}; class indices start at 0")
    if classes is not None and high >= classes:
        raise DataError(
            f"{source}: 'labels' holds {high}, but the model's first output has {classes} "
            f"classes (indices 0 to {classes - 1})"
        )


def from_arrays(
    arrays: dict[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None = None,
    source: str = "data",
) -> Inputs:
    """Match arrays to inputs by name (one unnamed array is fine for one input), check, batch."""
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    m = match(arrays, specs, batch_size=batch_size, source=source)
    if m.labels is not None:
        check_labels(m.labels, None, source)
    batches = [
        {name: a[start : start + m.size] if a.ndim else a for name, (_, a) in m.by_input.items()}
        for start in range(0, m.usable, m.size)
    ]
    return Inputs(
        batches=batches,
        labels=None if m.labels is None else m.labels[: m.usable],
        source=source,
        batch_size=m.size,
        notices=m.notices,
    )


@dataclass(frozen=True)
class Signature:
    """What a model file says about its inputs and its first output, read without its weights."""

    specs: list[InputSpec]
    output_rank: int | None  # of the first output; None where the file does not say
    classes: int | None  # its width when it is [batch, classes] with a fixed number of classes


def model_signature(path: str | os.PathLike) -> Signature | None:
    """The model's feedable inputs and first output from the file (weights stay unread).

    None when the file cannot be read this way, or declares an input without a shape: the
    checks that need it are left to the run (and a broken model to the loader's own error).
    """
    from onnxprune import wire

    try:
        proto, _, mapped = wire.load_mapped(str(path))
        mapped.close()
    except Exception:
        return None
    graph = proto.graph
    stored = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in stored:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            return None
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or dtype not in {np.dtype(t) for t in ORT_TYPES.values()}:
            name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
            raise DataError(
                f"model input {value.name!r} has type tensor({name}), which onnxprune cannot "
                "feed (numeric and bool tensors only)"
            )
        dims: list[Dim] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        ]
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    rank = classes = None
    if graph.output and graph.output[0].type.tensor_type.HasField("shape"):
        dims_out = graph.output[0].type.tensor_type.shape.dim
        rank = len(dims_out)
        if rank == 2 and dims_out[1].HasField("dim_value") and dims_out[1].dim_value > 0:
            classes = int(dims_out[1].dim_value)
    return Signature(specs, rank, classes)


def check_data_file(
    path: str | os.PathLike,
    signature: Signature | None,
    *,
    option: str = "--data",
    batch_size: int | None = None,
) -> bool:
    """Check an .npz against a model before any work: the file (a real .npz, no pickles, headers
    that fit its bytes), its arrays against the model's inputs (names, dtypes, ranks, samples)
    and its labels against the model's classes. Only the labels are read. Returns whether the
    file has labels (ignored, and not checked, for --calibration)."""
    headers = read_npz_headers(path, option)
    source = f"{option} {path}" if option == "--calibration" else str(path)
    if option == "--calibration":
        headers.pop(LABELS, None)
    if signature is not None:
        match(headers, signature.specs, batch_size=batch_size, source=source)
    if LABELS not in headers:
        return False
    labels = load_npz(path, option, keys=[LABELS])[LABELS]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{source}: 'labels' must be a 1-D integer array of class indices, got "
            f"{labels.dtype}{list(labels.shape)}"
        )
    check_labels(labels, signature.classes if signature else None, source)
    return True


def resolve_shapes(
    specs: Sequence[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for generated inputs: --input-shape, else the model's with batch -> 1.

    A symbolic dim named like one that --input-shape gave a size (the sequence of input_ids)
    takes that size in every input."""
    shapes = dict(shapes or {})
    names = {s.name for s in specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise InvalidArgumentError(
            f"--input-shape {unknown[0]}: the model has no such input (inputs: "
            + ", ".join(sorted(names))
            + ")"
        )
    notices = []
    out: dict[str, tuple[int, ...]] = {}
    bound: dict[str, int] = {}  # symbolic dim name -> the size --input-shape gave it
    for spec in specs:
        for d, n in zip(spec.shape, shapes.get(spec.name, ()), strict=False):
            if isinstance(d, str) and d:
                bound.setdefault(d, n)
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            fixed_ok = all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, shape, strict=False)
            )
            if len(shape) != len(spec.shape) or not fixed_ok:
                raise InvalidArgumentError(
                    f"--input-shape {spec.name}={'x'.join(map(str, shape))}: the model's input "
                    f"has shape {_shape_text(spec.shape)}"
                )
            out[spec.name] = shape
            continue
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                dims.append(d)
            elif d in bound:
                dims.append(bound[d])  # type: ignore[index]
            elif axis == 0:
                size = batch_size or 1
                dims.append(size)
                if batch_size is None:
                    notices.append(
                        f"input {spec.name!r}: symbolic batch dimension {d or '?'} set to 1"
                    )
            else:
                example = "x".join(
                    str(x) if isinstance(x, int) else "1" if i == 0 else (x or "?")
                    for i, x in enumerate(spec.shape)
                )
                raise DataError(
                    f"model input {spec.name!r} has symbolic dimension {d or '?'} at axis {axis} "
                    f"(shape {_shape_text(spec.shape)}): give its size with "
                    f"--input-shape {spec.name}={example} (a number for each name), or give --data"
                )
        out[spec.name] = tuple(dims)
    return out, notices


def generated_shapes(
    specs: Sequence[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The shapes `generate` makes (resolve_shapes), refused when a batch would be too big."""
    check_batch_size(batch_size)
    concrete, notices = resolve_shapes(specs, shapes, batch_size=batch_size)
    nbytes = sum(math.prod(concrete[s.name]) * s.dtype.itemsize for s in specs)
    if nbytes > GENERATED_MAX_BYTES:
        what = f"--batch-size {batch_size}" if batch_size is not None else "--input-shape"
        raise InvalidArgumentError(
            f"{what}: one batch of generated inputs would take {nbytes / 2**30:,.1f} GiB; "
            "give a smaller one, or real samples with --data"
        )
    return concrete, notices


@dataclass(frozen=True)
class Usable:
    """The values a generated input takes where the graph says what it can use.

    Integers are drawn from [low, high); `fill` is one value everywhere (a mask: 1, all
    attended; a scalar the graph compares with constants: the first of them)."""

    low: int = 0
    high: int | None = None
    fill: float | None = None
    why: str = ""


# Ops an index passes through unchanged on its way to the table it indexes.
_INDEX_PASS = frozenset(
    {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose",
     "Slice", "Tile"}
)  # fmt: skip
# A table's row count and the offset an index carries (ids + 2 indexes rows 2..).
_GATHERS = ("Gather", "GatherElements", "GatherND")
_TRACE_DEPTH = 16


def _scalar(value: ir.Value | None) -> float | None:
    """The number a stored one-element tensor (initializer or Constant) holds."""
    from onnxprune import macs

    tensor = macs.const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _uses(value: ir.Value, offset: float = 0.0, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """What the graph does with an integer input: ('rows', (low, high, rows, node)) for a table
    of `rows` rows it indexes, the input then usable in [low, high); ('mask', node) where it is
    used as a mask; ('equals', number) where it is compared with a constant; ('other', node)
    anywhere else. Followed through casts, reshapes and added constants (the offset)."""
    from onnxprune import macs

    if depth > _TRACE_DEPTH:
        yield "other", None
        return
    for node, index in value.uses():
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        others = [v for i, v in enumerate(node.inputs) if i != index and v is not None]
        if op in _GATHERS and index == 1:
            dims = macs.known_dims(node.inputs[0])
            attr = node.attributes.get("axis")
            axis = int(attr.value) if attr is not None else 0
            if dims is None or not -len(dims) <= axis < len(dims):
                yield "other", node
                continue
            rows = min(dims) if op == "GatherND" else dims[axis]
            yield "rows", (max(0, math.ceil(-offset)), math.floor(rows - offset), rows, node)
        elif op in _INDEX_PASS and index == 0:
            for out in node.outputs:
                yield from _uses(out, offset, depth + 1)
        elif op in ("Add", "Sub") and len(others) == 1 and _scalar(others[0]) is not None:
            c = _scalar(others[0])
            if op == "Sub" and index == 1:  # c - x: a mask turned into "masked out"
                yield ("mask", node) if c == 1 else ("other", node)
                continue
            shift = c if op == "Add" else -c  # type: ignore[operator]
            for out in node.outputs:
                yield from _uses(out, offset + shift, depth + 1)
        elif op == "Equal" and len(others) == 1 and _scalar(others[0]) is not None:
            yield "equals", _scalar(others[0])
        elif (op == "Where" and index == 0) or op == "Not":
            yield "mask", node
        else:
            yield "other", node


def usable_values(model: ir.Model, specs: Sequence[InputSpec]) -> dict[str, Usable]:
    """For each integer or bool input of an onnx-ir model, the values the graph can use, where
    its uses say: the rows of the tables it indexes (Gather, GatherElements, GatherND; through
    casts, reshapes and an added constant such as a position offset), 1 for a mask (by name,
    float masks too, or used as one: 1 - mask, Where's condition), a constant it is compared
    with for a scalar. Inputs whose use says nothing are left out (they keep the default)."""
    inputs = {v.name: v for v in model.graph.inputs}
    found: dict[str, Usable] = {}
    for spec in specs:
        value = inputs.get(spec.name)
        named_mask = "mask" in spec.name.lower()
        if value is None or (spec.dtype.kind not in "iub" and not named_mask):
            continue
        uses = list(_uses(value))
        rows = [info for kind, info in uses if kind == "rows"]
        compared = [info for kind, info in uses if kind == "equals"]
        # a scalar read as a condition is a switch, not a mask
        masked = named_mask or (bool(spec.shape) and any(kind == "mask" for kind, _ in uses))
        if rows:
            low = max(r[0] for r in rows)
            high = min(r[1] for r in rows)
            _, _, count, node = min(rows, key=lambda r: r[1])
            if high > low:
                table = node.inputs[0].name if node.inputs[0] is not None else "?"
                found[spec.name] = Usable(low, high, why=f"it indexes {table!r}, {count} rows")
            continue
        if masked:
            found[spec.name] = Usable(fill=1, why="a mask: everything attended")
        elif compared and not spec.shape:
            found[spec.name] = Usable(
                fill=compared[0], why=f"the graph compares it with {compared[0]:g}"
            )
    return found


def _random(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, usable: Usable | None
) -> np.ndarray:
    if usable is not None and usable.fill is not None:
        return np.full(shape, usable.fill, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if usable is not None and usable.high is not None:
        return rng.integers(usable.low, usable.high, size=shape, dtype=dtype)
    high = 256 if dtype == np.uint8 else INT_HIGH
    return rng.integers(0, high, size=shape, dtype=dtype)


def _usable_notice(spec: InputSpec, usable: Usable | None) -> str | None:
    """What a generated input was set to when that is a choice the user may want to change."""
    if usable is not None and usable.fill is not None:
        return f"input {spec.name!r}: all {usable.fill:g} ({usable.why})"
    if usable is not None and usable.high is not None:
        return (
            f"input {spec.name!r}: integers drawn from [{usable.low}, {usable.high}) ({usable.why})"
        )
    if spec.dtype.kind in "iu" and spec.dtype != np.uint8:
        return (
            f"input {spec.name!r}: integers drawn from [0, {INT_HIGH}): the graph does not say "
            "what range it can use; give real values with --data"
        )
    return None


def generate(
    specs: Sequence[InputSpec],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int | None = None,
    batches: int = GENERATED_BATCHES,
    seed: int = 0,
    usable: Mapping[str, Usable] | None = None,
) -> Inputs:
    """Random inputs from the model's own types and shapes, the same for the same seed.

    Floats are standard normal, bools fair coins, integers uniform in the range `usable` gives
    (usable_values: the rows of the table they index, 1 for a mask), else in [0, 10) (uint8 in
    [0, 256)). A scalar (0-d) input gets one value, the same in every batch.
    """
    usable = dict(usable or {})
    concrete, notices = generated_shapes(specs, shapes, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    fixed: dict[str, np.ndarray] = {}
    for spec in specs:
        notice = _usable_notice(spec, usable.get(spec.name))
        if not spec.shape:
            value = _random(rng, (), spec.dtype, usable.get(spec.name))
            fixed[spec.name] = value
            example = f"{_scalar_type(spec.dtype)}({value.item()!r})"
            notice = (
                f"input {spec.name!r} is a scalar: set to {value.item()!r} for every batch"
                + (f" ({usable[spec.name].why})" if spec.name in usable else "")
                + f"; give another with --data, e.g. np.savez(..., {spec.name}={example})"
            )
        if notice:
            notices.append(notice)
    feeds = [
        {
            s.name: fixed[s.name]
            if s.name in fixed
            else _random(rng, concrete[s.name], s.dtype, usable.get(s.name))
            for s in specs
        }
        for _ in range(batches)
    ]
    return Inputs(
        batches=feeds,
        labels=None,
        source=f"generated (seed {seed})",
        batch_size=batch_rows(feeds[0]) if feeds else 1,
        notices=notices,
        generated=True,
    )
