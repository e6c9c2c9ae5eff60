"""Capture: run the model on the calibration samples and sum, per layer, what reconstruction needs.

A copy of the graph exposes every prunable layer's input as an extra output; ONNX Runtime (CUDA
when usable) runs it batch by batch, each layer's rows X are built by its design (design.py) and
only the sums are kept: X^T X and the column sums, in float64. Layers that read the same tensor
the same way (attention's Q, K and V) share one set of sums. When the sums of all layers would
not fit the memory budget, the layers are split into several passes over the data.

Sequential calibration pairs two models on the same samples: the dense one (the target) and the
one pruned so far (what the layer will really see); then it also sums X_pruned^T X_dense.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.calibration import CalibrationSummary, load_samples
from onnxprune.calibration.solvers import inverse_factor
from onnxprune.core.graphs import values_by_name
from onnxprune.core.progress import Meter, notice_once, step
from onnxprune.errors import DataError
from onnxprune.inputs import Inputs, fit_empty
from onnxprune.ops import Design, design_of
from onnxprune.options import Calibration
from onnxprune.runtime import Runtime, open_session, select_runtime
from onnxprune.storage import io
from onnxprune.weights import Weight

log = logging.getLogger("onnxprune")

# Rows multiplied at once: tall thin products thread badly in OpenBLAS (conv1 of ResNet-50 ran
# 7x faster in slices of 4096 rows than in chunks of 100k).
ROW_SLICE = 4096
# The most one layer's X^T X (float64, every group) may take: a wider layer (a 1-D conv reading
# 1024 channels through 64 taps has K = 65,536: 32 GiB) is solved in column blocks that fit.
LAYER_LIMIT_BYTES = 512 << 20
# The narrowest column block worth solving; a layer that only splits finer gets no statistics.
MIN_BLOCK = 64


@dataclass
class LayerStats:
    """Sums over the calibration rows of one layer's design, per group.

    gram = X^T X [G, K, K], sums = column sums of X [G, K], rows = how many rows were summed.
    In sequential calibration X is what the pruned model feeds the layer, and `cross` =
    X^T X_dense, `dense_gram` = X_dense^T X_dense and `dense_sums` describe the dense target.
    """

    gram: np.ndarray
    sums: np.ndarray
    rows: int = 0
    cross: np.ndarray | None = None
    dense_gram: np.ndarray | None = None
    dense_sums: np.ndarray | None = None
    _inverses: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, design: Design) -> LayerStats:
        g, k = design.groups, design.in_features
        return cls(gram=np.zeros((g, k, k)), sums=np.zeros((g, k)))

    def add(self, rows: np.ndarray, dense: np.ndarray | None = None) -> None:
        """Add a chunk of rows [G, n, K] (and the dense model's rows of the same samples, which
        may be wider: channels removed from the pruned model are still in the dense one).

        Products are computed in float32 over slices of ROW_SLICE rows (half the time of float64;
        relative error ~1e-7 per slice) and summed into float64 across slices and batches.
        """
        precision = np.float32
        if dense is not None and self.cross is None:
            g, k, kd = rows.shape[0], rows.shape[2], dense.shape[2]
            self.cross = np.zeros((g, k, kd))
            self.dense_gram = np.zeros((g, kd, kd))
            self.dense_sums = np.zeros((g, kd))
        for start in range(0, rows.shape[1], ROW_SLICE):
            x = rows[:, start : start + ROW_SLICE].astype(precision, copy=False)
            self.gram += np.matmul(x.transpose(0, 2, 1), x)
            self.sums += x.sum(axis=1, dtype=np.float64)
            self.rows += x.shape[1]
            if dense is not None:
                assert self.cross is not None and self.dense_sums is not None
                assert self.dense_gram is not None
                xd = dense[:, start : start + ROW_SLICE].astype(precision, copy=False)
                self.cross += np.matmul(x.transpose(0, 2, 1), xd)
                self.dense_gram += np.matmul(xd.transpose(0, 2, 1), xd)
                self.dense_sums += xd.sum(axis=1, dtype=np.float64)

    def merged(self, other: LayerStats) -> LayerStats:
        """The sums of two uses of one weight: their errors add up."""

        def plus(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else a + b

        return LayerStats(
            self.gram + other.gram,
            self.sums + other.sums,
            self.rows + other.rows,
            plus(self.cross, other.cross),
            plus(self.dense_gram, other.dense_gram),
            plus(self.dense_sums, other.dense_sums),
        )

    @property
    def nbytes(self) -> int:
        arrays = (self.gram, self.sums, self.cross, self.dense_gram, self.dense_sums)
        return sum(a.nbytes for a in arrays if a is not None)

    def inverse(self, group: int, damp: float) -> np.ndarray:
        """U with U^T U the damped inverse of one group's Hessian (solvers.inverse_factor),
        computed once: scoring and SparseGPT both need it, and it costs the most in wide layers."""
        key = (group, damp)
        if key not in self._inverses:
            self._inverses[key] = inverse_factor(self.hessian[group], damp)
        return self._inverses[key]

    @property
    def hessian(self) -> np.ndarray:
        """E[x x^T] per group (the layer-wise Hessian of the squared output error, halved)."""
        return self.gram / max(1, self.rows)

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(1, self.rows)

    @property
    def dense_mean(self) -> np.ndarray:
        return self.mean if self.dense_sums is None else self.dense_sums / max(1, self.rows)

    @property
    def dense_hessian(self) -> np.ndarray:
        return self.hessian if self.dense_gram is None else self.dense_gram / max(1, self.rows)

    @property
    def cross_hessian(self) -> np.ndarray:
        """E[x_pruned x_dense^T] [G, K, K_dense]; E[x x^T] when unpaired."""
        return self.hessian if self.cross is None else self.cross / max(1, self.rows)


@dataclass
class Statistics:
    """What calibration measured: each weight's summed statistics and designs, by weight name,
    and the weights it could not measure, with the reason."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    uses: dict[str, list[LayerStats]] = field(default_factory=dict)  # per use, for biases
    designs: dict[str, list[Design]] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    providers: list[str] = field(default_factory=list)
    passes: int = 0


def column_blocks(design: Design, limit: int | None = None) -> Design | None:
    """The design with each group's K columns cut into equal blocks whose X^T X fit `limit`,
    each block a group of its own (a block-diagonal Hessian: SparseGPT updates, bias shifts and
    errors within a block, correlations across blocks left out); the design itself where it
    fits, None where no block of at least MIN_BLOCK columns divides K and fits. `limit`: bytes,
    LAYER_LIMIT_BYTES by default."""
    limit = LAYER_LIMIT_BYTES if limit is None else limit
    g, o, k = design.groups, design.out_features, design.in_features
    if g * k * k * 8 <= limit:
        return design
    widest = limit // (g * k * 8)
    width = next((b for b in range(min(widest, k), MIN_BLOCK - 1, -1) if k % b == 0), None)
    if width is None:
        return None
    nb = k // width

    def split(m: np.ndarray) -> np.ndarray:  # [G, n, K] -> [G * nb, n, B]
        n = m.shape[1]
        return m.reshape(g, n, nb, width).transpose(0, 2, 1, 3).reshape(g * nb, n, width)

    def rows(activation: np.ndarray, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        return [split(chunk) for chunk in design.rows(activation, *args, **kwargs)]

    def from_matrix(m: np.ndarray) -> np.ndarray:
        joined = m.reshape(g, nb, o, width).transpose(0, 2, 1, 3).reshape(g, o, k)
        return design.from_matrix(joined)

    return dataclasses.replace(
        design,
        groups=g * nb,
        in_features=width,
        signature=(*design.signature, ("blocks", width)),
        rows=rows,
        to_matrix=lambda w: split(design.to_matrix(w)),
        from_matrix=from_matrix,
        layout=(*design.layout, ("blocks", width)),
        blocks=nb,
    )


def plan_designs(
    model: ir.Model, weights: Sequence[Weight], blocks: bool = True
) -> tuple[dict[str, list[Design]], list[tuple[str, str]]]:
    """Each weight's designs, or why it gets no statistics. A design too wide for its full
    statistics is cut into column blocks (`column_blocks`) where `blocks`, else (channel removal,
    whose columns are channels) left without statistics."""
    designs: dict[str, list[Design]] = {}
    missing: list[tuple[str, str]] = []
    for weight in weights:
        found, why = design_of(weight)
        if why is None and any(d.activation.graph is not model.graph for d in found):
            why = "it sits inside a subgraph (If/Loop/Scan body), which calibration cannot reach"
        if why is None and any(d.activation.const_value is not None for d in found):
            why = "both operands are constants"
        if why is None:
            fitted = [column_blocks(d) if blocks or not _too_wide(d) else None for d in found]
            if any(f is None for f in fitted):
                d = found[0]
                size = d.groups * d.in_features**2 * 8
                why = (
                    f"its statistics would take {size / 2**30:.1f} GiB (K = {d.in_features:,} "
                    f"inputs): wider than calibration holds for one layer"
                )
            else:
                found = fitted  # type: ignore[assignment]
        if why is not None:
            missing.append((weight.name, why))
        else:
            designs[weight.name] = found
    return designs, missing


def _too_wide(design: Design) -> bool:
    """Whether the design's full X^T X is over the per-layer limit."""
    return design.groups * design.in_features**2 * 8 > LAYER_LIMIT_BYTES


Key = tuple[int, tuple]  # (id of the activation value, design signature)


def design_key(design: Design) -> Key:
    return id(design.activation), design.signature


def exposed_model(model: ir.Model, values: Sequence[ir.Value]) -> bytes:
    """The model serialized with `values` as its only outputs, cut to the nodes they need.

    ONNX Runtime runs every node of a session whatever outputs are asked for, so a wave of
    sequential calibration deep in the graph would otherwise pay for the whole model each time.
    Graph inputs need no output: the feeds are the activation.
    """
    proto = io.inline_external(ir.serde.serialize_model(model), model)
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    wanted = list(dict.fromkeys(v.name for v in values if v.name not in inputs))
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    needed = set(wanted)
    keep = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
            needed.update(_captured(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    return proto.SerializeToString()


def _captured(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in body.node:
                names.update(name for name in inner.input if name)
                names.update(_captured(inner))
    return names


def chunks(design: Design, activation: np.ndarray) -> list[np.ndarray]:
    if activation.dtype != np.float32 and activation.dtype != np.float64:
        activation = activation.astype(np.float32)
    return design.rows(activation, sample=True)


def paired_chunks(
    design: Design, activation: np.ndarray, dense: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of the pruned and the dense activation, chunk by chunk over the same samples.

    A Conv's rows come in chunks of as many samples as fit its patch budget, so a pruned input
    (fewer channels) is cut at other samples than the dense one: it is cut again at the dense
    chunks' boundaries, where each piece fits in one chunk."""
    dense_rows = chunks(design, dense)
    if len(dense_rows) == 1:  # Gemm and MatMul always, a Conv whose batch fits one chunk
        rows = chunks(design, activation)
        return [(rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1), dense_rows[0])]
    # a Conv input [N, C, ...]: the narrower pruned one fits at least as many samples per chunk,
    # so each dense chunk's samples are one chunk of its rows (built once, never cut twice)
    per_sample = sum(c.shape[1] for c in dense_rows) // max(1, dense.shape[0])
    recut: list[np.ndarray] = []
    start = 0
    for chunk in dense_rows:
        count = chunk.shape[1] // max(1, per_sample)
        recut.append(np.concatenate(chunks(design, activation[start : start + count]), axis=1))
        start += count
    return list(zip(recut, dense_rows, strict=True))


class Runner:
    """One session of a model that returns the activations of chosen values for a batch."""

    def __init__(self, model: ir.Model, values: Sequence[ir.Value], runtime: Runtime, label: str):
        initializers = model.graph.initializers
        self.inputs = {v.name for v in model.graph.inputs if v.name not in initializers}
        self.declared = {
            v.name: [d if isinstance(d, int) else None for d in v.shape or ()]
            for v in model.graph.inputs
        }
        self.names = list(dict.fromkeys(v.name for v in values if v.name not in self.inputs))
        self.label = label
        # values that are all graph inputs need no session: the feeds are the activations
        self.session = (
            open_session(exposed_model(model, values), runtime, label=label, spinning=False)
            if self.names
            else None
        )

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def run(self, batch: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        feeds = fit_empty({k: v for k, v in batch.items() if k in self.inputs}, self.declared)
        try:
            outputs = self.session.run(self.names, feeds) if self.session is not None else []
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"calibration: ONNX Runtime failed on batch {index + 1}: {reason}"
            ) from None
        found = dict(zip(self.names, outputs, strict=True))
        for name in self.inputs:
            found.setdefault(name, feeds[name])
        for name, array in found.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(
                    f"calibration: tensor {name!r} holds NaN or Inf on batch {index + 1} "
                    "(check the calibration data's scaling and dtype)"
                )
        return found


def split_passes(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into passes whose sizes each fit the budget (one item at least each)."""
    passes: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += size
    return passes


def collect(
    model: ir.Model,
    weights: Sequence[Weight],
    data: Inputs,
    runtime: Runtime,
    *,
    budget_bytes: int,
    dense: ir.Model | None = None,
    aliases: dict[str, str] | None = None,
    meter: Meter | None = None,
    blocks: bool = True,
) -> Statistics:
    """Run `model` over every batch of `data` and sum each weight's statistics.

    With `dense`, the same samples also run through the dense model, and each layer's sums pair
    its input in `model` with its input in `dense` (sequential calibration); tensors are matched
    by name, through `aliases` (new name -> dense name) where a rewrite inserted a node.
    `meter` advances once per batch run (and grows when the sums take several passes).
    """
    stats = Statistics(samples=data.samples)
    stats.designs, stats.missing = plan_designs(model, weights, blocks)
    keys: dict[Key, Design] = {}
    for designs in stats.designs.values():
        for design in designs:
            keys.setdefault(design_key(design), design)
    order = list(keys)
    sizes = [
        keys[k].groups * keys[k].in_features ** 2 * 8 * (3 if dense is not None else 1)
        for k in order
    ]
    passes = split_passes(sizes, budget_bytes)
    sums: dict[Key, LayerStats] = {}
    dense_values = values_by_name(dense) if dense is not None else {}
    if meter is not None:
        meter.grow((len(passes) - 1) * len(data.batches))
    for chosen in passes:
        pass_keys = [order[i] for i in chosen]
        values = [keys[k].activation for k in pass_keys]
        runner = Runner(model, values, runtime, "the calibration copy")
        stats.providers = runner.providers or stats.providers
        dense_runner = None
        if dense is not None:
            dense_runner = Runner(
                dense,
                [dense_values[(aliases or {}).get(v.name, v.name)] for v in values],
                runtime,
                "the dense model",
            )
        partial = {k: LayerStats.empty(keys[k]) for k in pass_keys}
        for index, batch in enumerate(data.batches):
            found = runner.run(batch, index)
            target = dense_runner.run(batch, index) if dense_runner is not None else None
            for k in pass_keys:
                design = keys[k]
                name = design.activation.name
                dense_name = (aliases or {}).get(name, name)
                if target is None:
                    for chunk in chunks(design, found[name]):
                        partial[k].add(chunk)
                    continue
                for chunk, dense_chunk in paired_chunks(design, found[name], target[dense_name]):
                    partial[k].add(chunk, dense_chunk)
            if meter is not None:
                meter.advance()
        sums.update(partial)
    stats.passes = len(passes)
    for name, designs in stats.designs.items():
        per_use = [sums[design_key(design)] for design in designs]
        total = per_use[0]
        for other in per_use[1:]:
            total = total.merged(other)
        stats.layers[name] = total
        stats.uses[name] = per_use
    return stats


def depth_waves(
    model: ir.Model, weights: Sequence[Weight], chosen: Sequence[int]
) -> list[list[int]]:
    """The chosen weights grouped by depth: no layer of a wave reads what a layer of the same or
    a later wave makes, so a wave can be measured on the model pruned so far in one pass."""
    node_weight: dict[int, int] = {}
    for i in chosen:
        for use in weights[i].uses:
            node_weight[id(use.node)] = i
    level: dict[int, int] = {}
    wave = dict.fromkeys(chosen, 0)
    for node in model.graph:
        depth = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        i = node_weight.get(id(node))
        if i is not None:
            wave[i] = max(wave[i], depth)
            depth = wave[i] + 1
        for out in node.outputs:
            level[id(out)] = depth
    groups: dict[int, list[int]] = {}
    for i in chosen:
        groups.setdefault(wave[i], []).append(i)
    return [sorted(groups[k]) for k in sorted(groups)]


def measure(
    model: ir.Model, weights: Sequence[Weight], options: Calibration, blocks: bool = True
) -> tuple[Statistics, Inputs, Runtime, CalibrationSummary]:
    """The first pass both calibrated modes start with: the samples loaded and checked, the
    runtime chosen, every weight's statistics on the dense model, and the summary begun."""
    runtime = select_runtime(options.device)
    if runtime.note:
        notice_once(runtime.note)
    samples = load_samples(model, options)
    with step(f"calibrating on {samples.samples} samples", total=len(samples.batches)) as meter:
        stats = collect(
            model, weights, samples, runtime, budget_bytes=options.budget_bytes, meter=meter,
            blocks=blocks,
        )  # fmt: skip
    summary = CalibrationSummary(
        criterion=options.criterion,
        mode=options.mode,
        samples=samples.samples,
        providers=stats.providers or list(runtime.providers),
        fallback=list(stats.missing),
        notices=list(samples.notices),
        passes=stats.passes,
    )
    wide = [
        (name, d) for name, designs in stats.designs.items() for d in designs[:1] if d.blocks > 1
    ]
    if wide:
        name, d = wide[0]
        summary.notices.append(
            f"{len(wide)} layer(s) too wide for their full statistics are solved in column "
            f"blocks (a block-diagonal Hessian; e.g. {name}: {d.blocks} blocks of "
            f"{d.in_features} inputs)"
        )
    return stats, samples, runtime, summary
