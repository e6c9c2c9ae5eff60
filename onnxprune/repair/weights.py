"""Repair pruned layers from their statistics: update the kept weights, correct the biases.

With a criterion that `updates` (sparsegpt), each pruned layer's kept weights are re-solved by
SparseGPT's OBS updates, the final mask chosen inside each column block with the plan's count
(or, with an N:M pattern, the pattern chosen while sweeping the columns). Bias correction then
moves each output's mean back to the dense one. One-pass repairs every layer from the dense
model's statistics; sequential measures the layers again, wave by wave, on the model pruned so
far (segment by segment: calibration/walk.py) and re-solves them against the dense model's
outputs (`refit`), so a layer also makes up for what the layers before it lost. Weights without
statistics were zeroed by the rewrite and stay so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.calibration import solvers
from onnxprune.calibration.capture import LayerStats, Statistics
from onnxprune.calibration.walk import SequentialWalk
from onnxprune.core.progress import step
from onnxprune.inputs import Inputs
from onnxprune.ops import Design
from onnxprune.options import Calibration
from onnxprune.rewrite.bias import fold_bias
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.rewrite.unstructured import before_rewrite
from onnxprune.runtime import Runtime
from onnxprune.scoring.importance import Importance
from onnxprune.selection import LayerPlan, Plan, layer_mask
from onnxprune.weights import Weight


def store(values: np.ndarray, mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to the stored dtype: pruned weights exactly zero, kept non-zero ones never zero.

    A kept weight that the cast (or, by a rare coincidence, the update) brings to exactly zero is
    stored as the smallest subnormal of its sign, so the count of zeros stays what the plan
    decided. A zero weight that nothing updated stays zero.
    """
    out = values.astype(dtype)
    out[mask] = 0
    lost = ~mask & (out == 0) & (values != 0)
    if lost.any():
        smallest = np.array(1, dtype=f"u{dtype.itemsize}").view(dtype)
        out[lost] = np.where(values[lost] < 0, -smallest, smallest)
    return out


@dataclass
class Repaired:
    """One layer's repair: its new values (stored layout, float64), the pruned positions, its
    relative output error on the samples, and whether its bias moved."""

    values: np.ndarray
    mask: np.ndarray
    error: float | None
    bias_moved: bool
    bias_left: bool = False  # a shift the layer has no bias for (no node is added for it)


@dataclass
class WeightsRepair:
    """What the repair did, for the report: each repaired layer's output error and zero count."""

    errors: dict[str, float | None] = field(default_factory=dict)
    zeros: dict[str, int] = field(default_factory=dict)
    bias_corrected: int = 0
    bias_left: int = 0  # layers with a mean shift but no bias to put it in
    passes: int = 0  # runs of the model or of a segment over the samples the repair added


def repair_layer(
    model: ir.Model,
    weight: Weight,
    array: np.ndarray,
    mask: np.ndarray | None,
    stats: LayerStats,
    per_use: list[LayerStats],
    designs: list[Design],
    importance: Importance,
    options: Calibration,
    pattern: tuple[int, int] | None,
    consts: NodeConstants,
) -> Repaired:
    """Prune one layer with its statistics: update (when the criterion does), then correct its
    biases. `mask` None: the criterion chooses the N:M pattern itself."""
    design = designs[0]
    paired = stats.cross is not None
    w = design.to_matrix(array)
    h = stats.hessian
    if importance.updates:
        target = w
        # the refit needs the layer's statistics to be well determined: with fewer rows than
        # inputs, its correction lives mostly in directions the data never saw, where only the
        # damping bounds it (DenseNet-121 on 8 samples: output error 2.5 with it, 0.3 without)
        if paired and stats.rows >= design.in_features:
            target = solvers.refit(
                w, h, stats.cross_hessian, lambda g: stats.inverse(g, options.damp)
            )
        mask_m = None if mask is None else design.to_matrix(mask)
        new = np.empty_like(w)
        pruned = np.empty(w.shape, dtype=bool)
        for g in range(w.shape[0]):
            new[g], pruned[g] = solvers.sparsegpt(
                target[g],
                h[g],
                counts=None if mask_m is None else solvers.block_counts(mask_m[g]),
                pattern=pattern if mask_m is None else None,
                damp=options.damp,
                factor=stats.inverse(g, options.damp),
            )
        mask = design.from_matrix(pruned)
    else:
        assert mask is not None
        mask_m = design.to_matrix(mask)
        new = np.where(mask_m, 0.0, w)
    moved = unshifted = False
    if options.bias_correction:
        for use, use_design, use_stats in zip(weight.uses, designs, per_use, strict=True):
            shift = solvers.bias_shift(
                w, new, use_stats.mean, use_stats.dense_mean if paired else None
            )
            if use_design.blocks > 1:  # column blocks: each output's shift is their sum
                nb = use_design.blocks
                shift = shift.reshape(-1, nb, use_design.out_features).sum(axis=1).reshape(-1)
            if np.any(shift != 0):
                # the layer's output type: a float16 weight may be cast to compute in float32
                dtype = np.dtype((use.node.outputs[0].dtype or weight.dtype).numpy())
                # into a bias the layer has a place for; never a new node: a bias-free layer
                # (an LLM's) keeps its shift, which a decoder's attention does not take linearly
                folded = fold_bias(use.node, shift, use_design.out_axis, dtype, consts)
                moved, unshifted = moved or folded, unshifted or not folded
    error = solvers.output_error(
        w,
        new,
        h,
        stats.mean,
        cross=stats.cross_hessian if paired else None,
        dense_hessian=stats.dense_hessian if paired else None,
        dense_mean=stats.dense_mean if paired else None,
        corrected=moved,
    )
    return Repaired(design.from_matrix(new), mask, error, moved, unshifted)


class RepairWeightsPass(ir.passes.InPlacePass):
    """Repair the layers a plan pruned, from calibration statistics (module docstring).

    Runs after `ZeroWeightsPass(plan)`: the dense weights are read from what the rewrite
    replaced. `stats` are the dense model's (they served the scores); sequential mode measures
    again, round by round, pairing the model being repaired with `dense`, a copy of the model
    taken before the rewrite. The result is in `self.result` after the pass ran.
    """

    def __init__(
        self,
        plan: Plan,
        importance: Importance,
        options: Calibration,
        stats: Statistics,
        samples: Inputs,
        runtime: Runtime,
        dense: ir.Model | None = None,
    ) -> None:
        super().__init__()
        self.plan, self.importance, self.options = plan, importance, options
        self.stats, self.samples, self.runtime, self.dense = stats, samples, runtime, dense
        self.result = WeightsRepair()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan, options, stats = self.plan, self.options, self.stats
        layers = plan.layers
        measured = [
            i
            for i, layer in enumerate(layers)
            if layer.changed and layer.weight.name in stats.designs
        ]
        consts = NodeConstants(model)
        aliases: dict[str, str] = {}
        if options.mode == "one-pass":
            with step(f"repairing {len(measured)} layers", total=len(measured)) as meter:
                for i in measured:
                    self._repair(model, layers[i], stats, consts)
                    meter.advance()
        else:
            assert self.dense is not None, "sequential repair needs the dense model"
            # the dense sums served the ranking; each segment measures its own
            stats.layers.clear()
            stats.uses.clear()
            weights = [layer.weight for layer in layers]
            walk = SequentialWalk(
                model, self.dense, weights, measured, self.samples, self.runtime, aliases
            )
            with step(f"repairing {len(measured)} layers", total=len(measured)) as meter:
                for wave, paired in walk.rounds():
                    for i in wave:
                        self._repair(model, layers[i], paired, consts)
                        meter.advance()
            self.result.passes += walk.passes
        return ir.passes.PassResult(model, modified=bool(measured))

    def _repair(
        self,
        model: ir.Model,
        layer: LayerPlan,
        measurement: Statistics,
        consts: NodeConstants,
    ) -> None:
        """Layer repaired with its statistics (freed once used), its values stored."""
        weight = layer.weight
        name = weight.name
        source = before_rewrite(weight.stored())
        array = np.asarray(source.numpy(), dtype=np.float64)
        pattern = self.plan.pattern
        own_pattern = pattern is not None and self.importance.updates and layer.pattern is not None
        mask = None if own_pattern else layer_mask(layer, source, self.plan.keys)
        repaired = repair_layer(
            model, weight, array, mask, measurement.layers.pop(name), measurement.uses.pop(name),
            measurement.designs[name], self.importance, self.options, pattern, consts,
        )  # fmt: skip
        values = store(repaired.values, repaired.mask, np.dtype(weight.values_dtype.numpy()))
        weight.set_values(values)
        self.result.errors[name] = repaired.error
        self.result.zeros[name] = int(np.count_nonzero(values == 0))
        self.result.bias_corrected += repaired.bias_moved
        self.result.bias_left += repaired.bias_left

    def requires(self, model: ir.Model) -> None:
        del model  # the plan's weights are the model's own; nothing else to check
