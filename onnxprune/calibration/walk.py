"""The sequential walk: layers measured segment by segment on the model being repaired, each
paired with the dense model's input of the same samples.

For each segment (segments.py) the dense model runs once from the dense live values at its start,
giving the dense inputs of the segment's layers and the dense live values at its end. Then, wave
by wave (layers whose inputs no layer of the same wave makes), the pruned segment runs from the
pruned live values to its wave's inputs, the paired statistics are summed and handed to the
caller, which repairs the wave; last, the repaired segment runs once more to give the pruned live
values at its end. Nodes the caller adds while repairing (a bias Add after a layer) belong to the
segment of the layer; names it gives (`aliases`: new name -> dense name) are followed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import onnx_ir as ir

from onnxprune.calibration.capture import (
    Key,
    LayerStats,
    Statistics,
    chunks,
    depth_waves,
    design_key,
    paired_chunks,
    plan_designs,
)
from onnxprune.calibration.segments import Segment, Store, find_segments, reads, run_segment
from onnxprune.inputs import Inputs
from onnxprune.runtime import Runtime
from onnxprune.weights import Weight


def _sizes(model: ir.Model, samples: Inputs) -> ir.Model | None:
    """A copy of `model` with its shapes at one sample of the calibration data."""
    from onnxprune.macs import resolve_shapes

    shapes = {n: (1, *a.shape[1:]) if a.ndim else () for n, a in samples.batches[0].items()}
    copy = model.clone()
    try:
        resolve_shapes(copy, shapes, samples.sample_values())
    except Exception:  # sizes only weigh the cuts: without them every value counts one
        return None
    return copy


def _positions(pruned: Sequence[ir.Node], dense: Sequence[ir.Node]) -> list[int]:
    """For each node of the pruned model, the position in the dense model's graph order it
    stands at: the dense node making the same first output, else (a node added by a rewrite)
    where the pruned node before it stands."""
    where = {node.outputs[0].name: i for i, node in enumerate(dense) if node.outputs}
    out = []
    last = 0
    for node in pruned:
        last = where.get(node.outputs[0].name if node.outputs else "", last)
        out.append(last)
    return out


class SequentialWalk:
    """Paired statistics of `chosen` weights of `model`, wave by wave, segment by segment.

    Iterate `rounds()`: each item is (weight indices of the wave, their Statistics); repair them
    before asking for the next. `aliases` (new name -> dense name) is the caller's, updated as it
    adds nodes.
    """

    def __init__(
        self,
        model: ir.Model,
        dense: ir.Model,
        weights: Sequence[Weight],
        chosen: Sequence[int],
        samples: Inputs,
        runtime: Runtime,
        aliases: dict[str, str],
        blocks: bool = True,
    ) -> None:
        self.model, self.dense, self.weights = model, dense, weights
        self.blocks = blocks  # wide layers in column blocks (capture.plan_designs)
        self.samples, self.runtime, self.aliases = samples, runtime, aliases
        self.designs, self.missing = plan_designs(model, [weights[i] for i in chosen], blocks)
        self.chosen = [i for i in chosen if weights[i].name in self.designs]
        dense_nodes = list(dense.graph)
        # where each node of the model stands in the dense model's order, fixed now: a node
        # the repair adds later stands where the node before it does
        at = dict(zip(list(model.graph), _positions(list(model.graph), dense_nodes), strict=True))
        self.at = at
        layer_nodes = {
            i: [dense_nodes[at[u.node]] for u in weights[i].uses if u.node in at]
            for i in self.chosen
        }
        self.segments: list[Segment] = find_segments(dense, layer_nodes, _sizes(dense, samples))
        self.passes = 0

    def _current(self) -> dict[str, str]:
        """Dense name -> the pruned model's value that now carries it."""
        current: dict[str, str] = {}
        for new, old in self.aliases.items():
            current[old] = new
        return current

    def rounds(self) -> Iterator[tuple[list[int], Statistics]]:
        batches = len(self.samples.batches)
        dense_nodes = list(self.dense.graph)
        pruned_store, dense_store = Store(), Store()
        try:
            for batch, feeds in enumerate(self.samples.batches):
                for name, array in feeds.items():
                    pruned_store.put(name, batch, array)
                    dense_store.put(name, batch, array)
            for segment in self.segments:  # (the caller's step shows the progress)
                yield from self._segment(segment, dense_nodes, pruned_store, dense_store, batches)
        finally:
            pruned_store.close()
            dense_store.close()

    def _live_after(self, segment: Segment, dense_nodes: Sequence[ir.Node]) -> set[str]:
        """Dense names alive after the segment: read by a later node or a model output."""
        later = {v.name for node in dense_nodes[segment.stop :] for v in reads(node)}
        return later | {v.name for v in self.dense.graph.outputs}

    def _segment(
        self,
        segment: Segment,
        dense_nodes: Sequence[ir.Node],
        pruned_store: Store,
        dense_store: Store,
        batches: int,
    ) -> Iterator[tuple[list[int], Statistics]]:
        seg_dense = dense_nodes[segment.start : segment.stop]
        made = {v.name for node in seg_dense for v in node.outputs}
        live = self._live_after(segment, dense_nodes)
        live_out = sorted(name for name in made if name in live)
        # the dense names of the layers' inputs (designs made now: the repair of earlier
        # segments may have put a bias Add, and a new name, in front of them)
        designs, _ = plan_designs(
            self.model, [self.weights[i] for i in segment.layers], self.blocks
        )
        dense_inputs = {
            self.aliases.get(d.activation.name, d.activation.name)
            for found in designs.values()
            for d in found
        }
        wanted = sorted(dense_inputs - set(dense_store.arrays))
        # the dense segment, once: its layers' inputs, and what comes after it
        inputs = Store()
        try:
            for batch, found in run_segment(
                self.dense, seg_dense, [*wanted, *live_out], dense_store, batches,
                self.runtime, "the dense model",
            ):  # fmt: skip
                for name in wanted:
                    inputs.put(name, batch, found[name])
                for name in live_out:
                    dense_store.put(name, batch, found[name])
            self.passes += 1
            layers = list(segment.layers)
            for wave in depth_waves(self.model, self.weights, layers):
                yield wave, self._measure(wave, segment, pruned_store, dense_store, inputs)
        finally:
            inputs.close()
        # the repaired segment, once more: what comes after it, and what only the model being
        # repaired reads later (a value its preparation made a later node read directly)
        nodes = self._pruned_nodes(segment)
        current = self._current()
        targets = [current.get(name, name) for name in live_out]
        own = self._own_live_after(segment, nodes) - set(targets) - set(live_out)
        rename = dict(self.aliases)
        for batch, found in run_segment(
            self.model, nodes, [*targets, *sorted(own)], pruned_store, batches, self.runtime,
            "the calibration copy", rename,
        ):  # fmt: skip
            for name, target in zip(live_out, targets, strict=True):
                pruned_store.put(name, batch, found[target])
            for name in own:
                pruned_store.put(name, batch, found[name])
        self.passes += 1
        pruned_store.keep(live | own | set(pruned_store.arrays) & self._read_after(segment))
        dense_store.keep(live)

    def _read_after(self, segment: Segment) -> set[str]:
        """Names the model being repaired reads after the segment."""
        later: set[str] = set()
        position = 0
        for node in self.model.graph:
            position = self.at.get(node, position)
            if position >= segment.stop:
                later.update(v.name for v in reads(node))
        return later

    def _own_live_after(self, segment: Segment, nodes: Sequence[ir.Node]) -> set[str]:
        """Values the segment's nodes make in the model being repaired that its later nodes or
        outputs read (where the dense model's names do not say so)."""
        made = {v.name for node in nodes for v in node.outputs}
        outputs = {v.name for v in self.model.graph.outputs}
        return made & (self._read_after(segment) | outputs)

    def _pruned_nodes(self, segment: Segment) -> list[ir.Node]:
        """The model's nodes in the segment, the ones the repair added included."""
        nodes = []
        position = 0
        for node in self.model.graph:
            position = self.at.get(node, position)
            if segment.start <= position < segment.stop:
                nodes.append(node)
        return nodes

    def _measure(
        self,
        wave: Sequence[int],
        segment: Segment,
        pruned_store: Store,
        dense_store: Store,
        inputs: Store,
    ) -> Statistics:
        """Paired statistics of the wave's weights: their inputs in the pruned model (the
        segment run from the pruned live values) against the dense inputs of the same samples."""
        # designs again: a bias Add the repair put after an earlier layer may now feed these
        designs, missing = plan_designs(self.model, [self.weights[i] for i in wave], self.blocks)
        stats = Statistics(samples=self.samples.samples, missing=missing)
        stats.designs = designs
        keys: dict[Key, object] = {}
        for found in designs.values():
            for design in found:
                keys.setdefault(design_key(design), design)
        targets = sorted({d.activation.name for d in keys.values()})  # type: ignore[attr-defined]
        nodes = self._pruned_nodes(segment)
        sums = {k: LayerStats.empty(d) for k, d in keys.items()}  # type: ignore[arg-type]
        rename = dict(self.aliases)
        for batch, found in run_segment(
            self.model, nodes, targets, pruned_store, len(self.samples.batches), self.runtime,
            "the calibration copy", rename,
        ):  # fmt: skip
            for key, design in keys.items():
                name = design.activation.name  # type: ignore[attr-defined]
                dense_name = self.aliases.get(name, name)
                source = inputs if dense_name in inputs.arrays else dense_store
                target = source.get(dense_name, batch)
                pairs = paired_chunks(design, found[name], target)  # type: ignore[arg-type]
                for chunk, dense_chunk in pairs:
                    sums[key].add(chunk, dense_chunk)
        self.passes += 1
        for name, found in designs.items():
            per_use = [sums[design_key(d)] for d in found]
            total = per_use[0]
            for other in per_use[1:]:
                total = total.merged(other)
            stats.layers[name] = total
            stats.uses[name] = per_use
        return stats


__all__ = ["SequentialWalk", "chunks"]
