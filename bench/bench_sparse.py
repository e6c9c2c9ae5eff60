"""Sparse storage: file and gzip sizes, and ONNX Runtime load time, of sparse against dense.

Model: ResNet-50's layer shapes (25.5 M weights, random, bench/models.py), float32 and float16,
pruned unstructured (global magnitude) at each sparsity. Each pruned model is written three ways:
dense (the zeros written out), sparse with the smallest index type per tensor (what ONNX Runtime
reads; `--sparse-storage`), and sparse with int64 indices (the only type onnx.checker accepts).
Sizes are given against the dense original's file and against gzip of the dense pruned model
(what a plain compressed download of it costs). Load time is ONNX Runtime session creation on
the CPU provider, where sparse initializers are made dense: the median of --runs, dense and
sparse alternating, as a ratio to the dense model's. Every sparse model is checked to give the
dense model's outputs bit for bit.

    python bench/bench_sparse.py [--runs 5] [--sparsities 0.5,0.9,0.95]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

import models
import onnxprune
from onnxprune.storage import io, sparse
from onnxprune.validate.metrics import gzip_size

OUT = Path(__file__).parent / "out" / "sparse"


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with float16 weights, input and output."""
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def load_seconds(paths: list[Path], runs: int) -> list[float]:
    """Median session-creation time of each model, the models alternating run by run."""
    times: list[list[float]] = [[] for _ in paths]
    for path in paths:  # a first, untimed load: files in the page cache, libraries warm
        session(path)
    for _ in range(runs):
        for path, spent in zip(paths, times, strict=True):
            start = time.perf_counter()
            session(path)
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def same_outputs(a: Path, b: Path, dtype: type) -> bool:
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(dtype)}
    return all(
        u.tobytes() == v.tobytes()
        for u, v in zip(session(a).run(None, x), session(b).run(None, x), strict=True)
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sparsities", default="0.5,0.9,0.95")
    args = parser.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    sources = {
        "float32": models.cached(OUT.parent / "resnet50_shape.onnx", models.resnet50),
        "float16": models.cached(
            OUT.parent / "resnet50_shape_fp16.onnx", lambda: float16(models.resnet50())
        ),
    }
    print(
        "| dtype | sparsity | dense pruned: file / gzip (MiB) | sparse: file / gzip (MiB) "
        "| sparse file / original | sparse file / gzip of dense | sparse gzip / gzip of dense "
        "| int64 indices: file (MiB) | tensors sparse | ORT load: dense / sparse (s) | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, src in sources.items():
        original = io.file_size(src)
        for s in sparsities:
            dense, smallest, wide = (OUT / f"{dtype}_{s}_{k}.onnx" for k in ("dense", "sp", "i64"))
            onnxprune.prune(
                src, s, output=dense, force=True, save=onnxprune.Save(sparse_storage=False)
            )
            _, report = onnxprune.prune(
                src, s, output=smallest, force=True, save=onnxprune.Save(sparse_storage=True)
            )
            model, _ = onnxprune.prune(src, s)
            io.save_model(
                model, wide, force=True, check=True, sparse=sparse.plan(model, index="int64")
            )
            np_dtype = np.float16 if dtype == "float16" else np.float32
            if not (
                same_outputs(dense, smallest, np_dtype) and same_outputs(dense, wide, np_dtype)
            ):
                raise SystemExit(f"{dtype} at {s}: sparse outputs differ from dense")
            sizes = {p: io.file_size(p) for p in (dense, smallest, wide)}
            zipped = {p: gzip_size(io.model_files(p)) for p in (dense, smallest)}
            t_dense, t_sparse = load_seconds([dense, smallest], args.runs)
            storage = report.extra["sparse_storage"]
            print(
                f"| {dtype} | {s} | {mib(sizes[dense])} / {mib(zipped[dense])} "
                f"| {mib(sizes[smallest])} / {mib(zipped[smallest])} "
                f"| {sizes[smallest] / original:.3f} | {sizes[smallest] / zipped[dense]:.3f} "
                f"| {zipped[smallest] / zipped[dense]:.3f} | {mib(sizes[wide])} "
                f"| {storage['tensors']} / {storage['considered']} "
                f"| {t_dense:.3f} / {t_sparse:.3f} | {t_sparse / t_dense:.2f} |",
                flush=True,
            )
    print(
        f"\noriginal: float32 {mib(io.file_size(sources['float32']))} MiB, "
        f"float16 {mib(io.file_size(sources['float16']))} MiB; ONNX Runtime {ort.__version__}"
    )


if __name__ == "__main__":
    main()
