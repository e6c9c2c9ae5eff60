"""The user's arrays matched to the model's inputs and batched, checked before any model runs, so a
wrong array name, shape or dtype is one clear `DataError` instead of an ONNX Runtime message."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError
from onnxprune.inputs.npz import load_npz, read_npz_headers
from onnxprune.inputs.spec import (
    DEFAULT_BATCH,
    LABELS,
    ORT_TYPES,
    Dim,
    Inputs,
    InputSpec,
    check_batch_size,
    scalar_type,
    shape_text,
)


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
                f"np.savez(..., {spec.name}={scalar_type(spec.dtype)}(value))"
            )
        return
    wrong = array.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], array.shape[1:], strict=False)
    )
    if wrong:
        raise DataError(
            f"array {key!r} has shape {list(array.shape)}, model input {spec.name!r} has shape "
            f"{shape_text(spec.shape)} (the first axis of the array is the sample axis)"
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
    from onnxprune.core import wire

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
