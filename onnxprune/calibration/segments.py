"""Segments: the model cut where little is alive, run piece by piece over the samples.

Sequential calibration measures each layer on what the already pruned and repaired layers before
it produce. Rerunning the model from its inputs for every wave of layers costs a pass per wave;
here the graph is cut at boundaries where few activations are alive (the residual stream between
transformer blocks with the attention mask and the rotary tables beside it, the feature map
between CNN blocks), the live values at each cut are kept for every sample (in memory, or spilled
to disk past a budget), and each segment runs as its own small ONNX Runtime session from them.
A layer is then measured by running its segment alone, so the whole walk costs about one forward
pass of the pruned model per wave inside a segment, plus one of the dense model, whatever the
model's depth; memory is the live values at one cut and one segment's statistics.

Cuts: between consecutive prunable layers (graph order) the boundary with the fewest live bytes
(shapes at the samples' sizes) is a candidate; a candidate is a cut where it is no worse than its
neighbours' candidates, and never between two uses of one weight.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.core.graphs import iter_tensors
from onnxprune.core.tensors import const_tensor
from onnxprune.errors import DataError
from onnxprune.runtime import Runtime, open_session
from onnxprune.storage import io

# Live activations kept in memory before further ones are spilled to files.
MEMORY_BUDGET = 2 << 30
# Segments whose weights take more than this are run from a file (external data), never from
# serialized bytes (protobuf's 2 GB limit).
INLINE_LIMIT = 1 << 30


@dataclass
class Segment:
    """Nodes [start, stop) of the main graph (graph order), and the layers measured there."""

    start: int
    stop: int
    layers: list[int] = field(default_factory=list)  # indices into the caller's weights


def subgraph_reads(node: ir.Node) -> Iterator[ir.Value]:
    """Values an If/Loop/Scan body reads from the enclosing graphs."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies = list(attr.value)
        else:
            continue
        for body in bodies:
            inner = {v for n in body.all_nodes() for v in n.outputs} | set(body.inputs)
            for n in body.all_nodes():
                for v in n.inputs:
                    if v is not None and v not in inner and not v.is_initializer():
                        yield v


def reads(node: ir.Node) -> list[ir.Value]:
    """What a node reads: its inputs and what its subgraphs read from outside."""
    return [v for v in node.inputs if v is not None] + list(subgraph_reads(node))


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return const_tensor(value) is not None or (
        producer is not None and producer.op_type == "Constant" and not producer.inputs
    )


def _elements(value: ir.Value) -> int:
    if value.shape is None:
        return 1
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in value.shape]))


def live_elements(model: ir.Model, sizes: ir.Model | None = None) -> np.ndarray:
    """Per boundary b (before node b; b = 0..n) the elements alive there for one sample: values
    made before b (or fed) and read at or after b, constants left out. `sizes`, a copy whose
    shapes were resolved at the samples' sizes (same node order), gives the sizes."""
    nodes = list(model.graph)
    sized = list(sizes.graph) if sizes is not None else nodes
    n = len(nodes)
    index = {node: i for i, node in enumerate(nodes)}
    last: dict[ir.Value, int] = {}
    for i, node in enumerate(nodes):
        for value in reads(node):
            last[value] = i
    for value in model.graph.outputs:
        last[value] = n
    delta = np.zeros(n + 2, dtype=np.int64)
    size_of = {}
    for node, twin in zip(nodes, sized, strict=True):
        for value, twin_value in zip(node.outputs, twin.outputs, strict=True):
            size_of[value] = _elements(twin_value)
    for value in model.graph.inputs:
        size_of[value] = _elements(value)
    for value, end in last.items():
        if _is_constant(value) or value not in size_of:
            continue
        producer = value.producer()
        start = index[producer] + 1 if producer is not None and producer in index else 0
        if end >= start:
            delta[start] += size_of[value]
            delta[end + 1] -= size_of[value]
    return np.cumsum(delta)[: n + 1]


def find_segments(
    model: ir.Model,
    layer_nodes: Mapping[int, Sequence[ir.Node]],
    sizes: ir.Model | None = None,
) -> list[Segment]:
    """The model's segments for the layers `layer_nodes` (weight index -> the nodes that use
    it); a segment holds at least one layer, every use of a layer lies in one segment."""
    nodes = list(model.graph)
    index = {node: i for i, node in enumerate(nodes)}
    span = {
        w: (min(index[n] for n in uses), max(index[n] for n in uses))
        for w, uses in layer_nodes.items()
        if uses and all(n in index for n in uses)
    }
    if not span:
        return []
    live = live_elements(model, sizes)
    # no cut inside the span of a weight used at several places
    blocked = np.zeros(len(nodes) + 1, dtype=bool)
    for first, last in span.values():
        blocked[first + 1 : last + 1] = True
    positions = sorted({last for _, last in span.values()})
    candidates = []
    for a, b in itertools.pairwise(positions):
        bounds = np.arange(a + 1, b + 1)
        bounds = bounds[~blocked[bounds]]
        if len(bounds):
            candidates.append(int(bounds[np.argmin(live[bounds])]))
    cuts = []
    for k, b in enumerate(candidates):
        left = live[candidates[k - 1]] if k > 0 else np.inf
        right = live[candidates[k + 1]] if k + 1 < len(candidates) else np.inf
        if live[b] <= left and live[b] <= right:
            cuts.append(b)
    bounds = [0, *cuts, len(nodes)]
    segments = [Segment(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    starts = np.array([s.start for s in segments])
    for w, (_, last) in sorted(span.items()):
        segments[int(np.searchsorted(starts, last, side="right")) - 1].layers.append(w)
    return [s for s in segments if s.layers] if segments else []


class Store:
    """Per-batch arrays of values, in memory up to a budget, then in files of a temporary
    folder (memory-mapped when read back)."""

    def __init__(self, budget: int = MEMORY_BUDGET) -> None:
        self.budget = budget
        self.used = 0
        self.arrays: dict[str, list[np.ndarray]] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        batches = self.arrays.setdefault(name, [])
        assert batch == len(batches), "batches are stored in order"
        if self.used + array.nbytes > self.budget and array.nbytes > 1 << 20:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="onnxprune-activations-")
            self._count += 1
            path = Path(self._folder.name) / f"{self._count}.npy"
            np.save(path, array)
            array = np.load(path, mmap_mode="r")
        else:
            self.used += array.nbytes
        batches.append(array)

    def get(self, name: str, batch: int) -> np.ndarray:
        return np.asarray(self.arrays[name][batch])

    def keep(self, names: set[str]) -> None:
        """Forget every value not in `names`."""
        for name in [n for n in self.arrays if n not in names]:
            for array in self.arrays.pop(name):
                if not isinstance(array, np.memmap):
                    self.used -= array.nbytes

    def close(self) -> None:
        self.arrays.clear()
        self.used = 0
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def segment_model(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    targets: Sequence[str],
    examples: Callable[[str], np.ndarray] | None = None,
) -> tuple[ir.Model, list[str]]:
    """A model of the nodes (of `model`'s main graph, in order) that `targets` need, fed by what
    they read from outside; the names it is fed. The tensors are shared, not copied. A fed value
    whose type the graph does not say takes that of `examples(name)`, an array it will be fed."""
    position = {node: i for i, node in enumerate(model.graph)}
    chosen = sorted(nodes, key=position.__getitem__)
    made = {v.name for node in chosen for v in node.outputs}
    needed = set(targets)
    keep: list[ir.Node] = []
    for node in reversed(chosen):
        if any(v.name in needed for v in node.outputs):
            keep.append(node)
            needed.update(v.name for v in reads(node))
    keep_ids = {position[n] for n in keep}
    clone = model.clone()
    cloned = list(clone.graph)
    values = {v.name: v for v in clone.graph.inputs}
    for node in cloned:
        values.update((v.name, v) for v in node.outputs)
    fed = [
        name
        for name in dict.fromkeys(v.name for n in reversed(keep) for v in reads(n))
        if name not in made and name in values and not _is_constant(values[name])
    ]
    # what the segment is fed becomes an input of its own; everything else not kept goes
    feeds = []
    for name in fed:
        old = values[name]
        if old.is_graph_input():
            feeds.append(old)
            continue
        kind = old.type
        if kind is None and examples is not None:
            kind = ir.TensorType(ir.DataType.from_numpy(examples(name).dtype))
        new = ir.Value(name=name, shape=old.shape if old.type is not None else None, type=kind)
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        feeds.append(new)
    constants = [
        node
        for i, node in enumerate(cloned)
        if i not in keep_ids and node.op_type == "Constant" and not node.inputs
        and any(v.name in needed for v in node.outputs)
    ]  # fmt: skip
    dropped = [n for i, n in enumerate(cloned) if i not in keep_ids and n not in constants]
    clone.graph.inputs.clear()
    clone.graph.inputs.extend(feeds)
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(values[name] for name in dict.fromkeys(targets))
    for node in reversed(dropped):
        for out in node.outputs:
            for use in list(out.uses()):
                use.node.replace_input_with(use.idx, None)
        clone.graph.remove(node, safe=False)
    used = {v.name for n in clone.graph.all_nodes() for v in n.inputs if v is not None}
    for name in [n for n in clone.graph.initializers if n not in used]:
        clone.graph.initializers.pop(name)
    return clone, [v.name for v in feeds]


@contextlib.contextmanager
def session_of(model: ir.Model, runtime: Runtime, label: str) -> Iterator[object]:
    """An ONNX Runtime session of `model`: from serialized bytes when its tensors are small,
    else from a file with external data in a temporary folder (protobuf's 2 GB limit)."""
    size = sum(t.nbytes for _, t in iter_tensors(model))
    if size < INLINE_LIMIT:
        proto = io.inline_external(ir.serde.serialize_model(model), model)
        yield open_session(proto.SerializeToString(), runtime, label=label, spinning=False)
        return
    with tempfile.TemporaryDirectory(prefix="onnxprune-segment-") as folder:
        path = os.path.join(folder, "segment.onnx")
        ir.save(model, path, external_data="segment.onnx.data")
        yield open_session(path, runtime, label=label, spinning=False)


def run_segment(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    targets: Sequence[str],
    store: Store,
    batches: int,
    runtime: Runtime,
    label: str,
    rename: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run the nodes that `targets` need over every batch, fed from `store` (a name the
    segment reads is looked up there as `rename.get(name, name)`); yields (batch, outputs)."""
    rename = rename or {}
    made = {v.name for node in nodes for v in node.outputs}
    names = [n for n in dict.fromkeys(targets) if n in made]
    stored = [n for n in dict.fromkeys(targets) if n not in made]  # fed from the store as is
    if not names:
        for batch in range(batches):
            yield batch, {n: store.get(rename.get(n, n), batch) for n in stored}
        return
    segment, fed = segment_model(
        model, nodes, names, lambda name: store.get(rename.get(name, name), 0)
    )
    with session_of(segment, runtime, label) as session:
        for batch in range(batches):
            feeds = {name: store.get(rename.get(name, name), batch) for name in fed}
            try:
                outputs = session.run(names, feeds)  # type: ignore[attr-defined]
            except Exception as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DataError(
                    f"calibration: ONNX Runtime failed on batch {batch + 1}: {reason}"
                ) from None
            found = dict(zip(names, outputs, strict=True))
            for name, array in found.items():
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise DataError(
                        f"calibration: tensor {name!r} holds NaN or Inf on batch {batch + 1} "
                        "(check the calibration data's scaling and dtype)"
                    )
            found.update((n, store.get(rename.get(n, n), batch)) for n in stored)
            yield batch, found
