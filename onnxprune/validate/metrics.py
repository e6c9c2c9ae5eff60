"""Numbers that compare two models: output differences, top-1, and what a model costs.

Output differences accumulate batch by batch in float64, so no output is held twice and the
result does not depend on the batch size. Costs are read from the file: bytes on disk, bytes
gzip-compressed (what zeroed weights buy on disk), parameters, and multiply-accumulates of Conv,
ConvTranspose, Gemm and MatMul at one inference at the shapes run (macs.py), dense and counting
only non-zero weights.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune import macs, weights
from onnxprune.core.graphs import iter_tensors
from onnxprune.errors import DataError
from onnxprune.storage import io

# Relative error divides by |reference|, floored here so that exact zeros do not divide by zero.
REL_FLOOR = 1e-6
GZIP_LEVEL = 6  # what `gzip` does by default
CHUNK = 1 << 22
GZIP_OVERHEAD = 18  # 10-byte header, 8-byte trailer (CRC-32 and length)
MAC_OPS = macs.MAC_OPS
PARAM_TYPES = weights.FLOAT_TYPES | {ir.DataType.INT8, ir.DataType.UINT8}


@dataclass
class OutputDiff:
    """How far one output of the candidate is from the reference's, over all samples."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float


class DiffAccumulator:
    """Max/mean absolute error, max relative error and cosine similarity, fed batch by batch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.dot = 0.0
        self.norm_ref = 0.0
        self.norm_cand = 0.0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise DataError(
                f"output {self.name!r} has shape {list(ref.shape)} in the reference and "
                f"{list(cand.shape)} in the candidate: the models are not comparable"
            )
        if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
            # text (a label read from a STRING table): equal or not, element by element; the
            # errors are the share of elements that differ, the cosine the share that agree
            a = np.ones(ref.size)
            b = (np.asarray(ref) == np.asarray(cand)).ravel().astype(np.float64)
        else:
            a = np.asarray(ref, dtype=np.float64).ravel()
            b = np.asarray(cand, dtype=np.float64).ravel()
        if a.size == 0:
            return
        diff = np.abs(b - a)
        rel = diff / np.maximum(np.abs(a), REL_FLOOR)
        self.count += a.size
        self.sum_abs += float(diff.sum())
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        self.dot += float(a @ b)
        self.norm_ref += float(a @ a)
        self.norm_cand += float(b @ b)

    def result(self) -> OutputDiff:
        # sqrt of the product is exact for identical outputs (cosine exactly 1); on overflow,
        # the product of square roots
        norms = math.sqrt(self.norm_ref * self.norm_cand)
        if not math.isfinite(norms):
            norms = math.sqrt(self.norm_ref) * math.sqrt(self.norm_cand)
        # both all-zero: identical; one all-zero: nothing in common
        same = 1.0 if self.norm_ref == self.norm_cand else 0.0
        cosine = self.dot / norms if norms > 0 else same
        return OutputDiff(
            name=self.name,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.count if self.count else 0.0,
            max_rel=self.max_rel,
            cosine=cosine if math.isnan(cosine) else min(1.0, cosine),  # NaN must fail gates
        )


# Top-1 needs a class axis with at least this many entries: argmax over one value always agrees.
MIN_CLASSES = 2


def top1(output: np.ndarray) -> np.ndarray | None:
    """Predicted class per sample, for an output shaped [batch, classes] with at least 2
    classes; None otherwise."""
    if output.ndim != 2 or output.shape[1] < MIN_CLASSES:
        return None
    return np.argmax(output, axis=1)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(reference == candidate)) if len(reference) else 0.0


@dataclass
class Latency:
    """Milliseconds per batch after warm-up."""

    median_ms: float
    p90_ms: float
    runs: int
    batch_size: int

    @classmethod
    def from_seconds(cls, times: Sequence[float], batch_size: int) -> Latency:
        ms = np.asarray(times, dtype=np.float64) * 1000
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            runs=len(ms),
            batch_size=batch_size,
        )


@dataclass
class ModelCost:
    """What a model costs on disk and in arithmetic. MACs are per inference at `macs_at` shapes;
    with nodes in `macs_unknown` (`macs_complete` false) they are a lower bound, the sum of the
    nodes that could be counted (None when none could)."""

    file_bytes: int
    gzip_bytes: int
    params: int
    nonzero_params: int
    macs: int | None
    nonzero_macs: int | None
    macs_at: dict[str, list[int]]
    macs_unknown: list[str]
    macs_complete: bool = True
    macs_unknown_why: dict[str, str] = field(default_factory=dict)
    macs_values: dict[str, float | int | bool] = field(default_factory=dict)  # scalar inputs

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _deflated(chunk: bytes) -> int:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return len(compressor.compress(chunk)) + len(compressor.flush())


def _chunks(paths: Sequence[str | os.PathLike]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def gzip_size(paths: Sequence[str | os.PathLike]) -> int:
    """Bytes of the files as one gzip stream at level 6, without writing anything.

    Blocks of 4 MiB are deflated independently on all cores, as pigz does: a model of gigabytes
    takes seconds, not minutes. Each block restart costs a few bytes (the 32 KiB window starts
    empty); up to 4 MiB the size equals `gzip -6` exactly.
    """
    workers = os.cpu_count() or 1
    total = GZIP_OVERHEAD
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: list[bytes] = []
        for chunk in _chunks(paths):
            window.append(chunk)
            if len(window) == workers:
                total += sum(pool.map(_deflated, window))
                window = []
        total += sum(pool.map(_deflated, window)) if window else 0
    return total


def count_params(model: ir.Model) -> tuple[int, int]:
    """(parameters, non-zero parameters) over stored float and 8-bit tensors, one at a time."""
    params = nonzero = 0
    for _, tensor in iter_tensors(model):
        if tensor.dtype in PARAM_TYPES:
            params += int(tensor.size)
            nonzero += int(np.count_nonzero(tensor.numpy()))
    return params, nonzero


def count_macs(
    model: ir.Model,
    input_shapes: dict[str, tuple[int, ...]],
    input_values: dict[str, np.ndarray] | None = None,
) -> macs.MacCount:
    """Dense and non-zero MACs of Conv, ConvTranspose, Gemm and MatMul, subgraphs included, and
    the nodes whose shapes stay unknown at `input_shapes` (their MACs are not in the sums).

    Non-zero MACs scale each node's dense count by the density of its constant operand: a zero
    weight multiplies nothing, whatever the activation. Sets the model's value shapes to those
    at `input_shapes` (load a copy to keep the original's). `input_values`: inputs fed the same
    value in every run (scalars), which may decide shapes or an If's branch.
    """
    macs.resolve_shapes(model, input_shapes, input_values)
    found = weights.find_weights(model)
    by_slot = {(id(u.node), u.input_index): w for w in found.weights for u in w.uses}
    density: dict[int, float] = {}

    def node_density(node: ir.Node) -> float:
        for idx in (0, 1):
            weight = by_slot.get((id(node), idx))
            value = node.inputs[idx] if idx < len(node.inputs) else None
            tensor = macs.const_tensor(value)
            if weight is not None:
                key, array = id(weight), weight.numpy
            elif tensor is not None:
                key, array = id(tensor), tensor.numpy
            else:
                continue
            if key not in density:
                a = array()
                density[key] = np.count_nonzero(a) / a.size if a.size else 1.0
            return density[key]
        return 1.0

    count = macs.MacCount()
    macs.count_graph(model.graph, node_density, count)
    return count


def model_cost(
    path: str | os.PathLike,
    input_shapes: dict[str, tuple[int, ...]],
    input_values: dict[str, np.ndarray] | None = None,
) -> ModelCost:
    """File and gzip sizes, parameters and MACs of a saved model (count_macs)."""
    model = io.load_model(path)
    files = io.model_files(path, model)
    params, nonzero = count_params(model)
    count = count_macs(model, input_shapes, input_values)
    known = count.dense > 0 or count.complete  # unknown nodes and nothing counted: no figure
    return ModelCost(
        file_bytes=sum(f.stat().st_size for f in files),
        gzip_bytes=gzip_size(files),
        params=params,
        nonzero_params=nonzero,
        macs=count.dense if known else None,
        nonzero_macs=count.nonzero if known else None,
        macs_at={name: list(shape) for name, shape in input_shapes.items()},
        macs_values={name: np.asarray(v).item() for name, v in (input_values or {}).items()},
        macs_unknown=count.unknown,
        macs_complete=count.complete,
        macs_unknown_why=count.why,
    )
