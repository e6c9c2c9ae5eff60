"""The calibrated plan: scores from statistics, selection's global ranking, then repair.

1. capture: one pass (or a few, within the memory budget) over the samples sums X^T X per layer;
2. score: wanda or sparsegpt scores (reconstruct.py) stand in for magnitudes, and selection ranks
   them exactly as it ranks magnitudes: global or uniform, --min-keep, exact counts, ties;
3. repair: sparsegpt re-solves each pruned layer's kept weights (choosing its own mask inside each
   column block, with the block's count taken from the global plan), bias correction moves the
   mean of each output back to the dense one. In sequential mode the layers are measured again,
   wave by wave, on the model pruned so far, and re-solved against the dense model's outputs.
Weights without statistics (no calibration rule, inside a subgraph) are ranked by the same formula
with white inputs and only zeroed; the report lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune import selection
from onnxprune.calibration import Calibration, reconstruct
from onnxprune.calibration.capture import (
    LayerStats,
    Statistics,
    collect,
    measure,
    measurement_rounds,
)
from onnxprune.core.graphs import copy_model
from onnxprune.core.progress import step
from onnxprune.ops import Design
from onnxprune.rewrite.bias import shift_bias
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.scoring import UINT32
from onnxprune.selection import LayerPlan, MinKeep, Plan
from onnxprune.weights import Weight

# The smallest positive score, so a non-zero weight always ranks above a zero one.
_TINY = float(np.finfo(np.float32).tiny)


def _white_scores(weight: Weight, array: np.ndarray) -> np.ndarray:
    """The calibrated score of a weight without statistics, as if its inputs were white (H = I):
    w^2 over the sum of w^2 of its output (floored as r_i is), laid out as stored."""
    w = np.square(array)
    axis = weight.out_axis
    if axis is None:
        total = float(w.sum())
        return w / total if total > 0 else w
    others = tuple(a for a in range(w.ndim) if a != axis)
    sums = np.sum(w, axis=others, keepdims=True) * (1 + reconstruct.DELTA)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums > 0, w / sums, 0.0)


def _stand_in(weight: Weight, score: np.ndarray, array: np.ndarray) -> Weight:
    """A weight whose 'magnitudes' are its scores, so selection ranks it like any other.

    Zero weights score exactly 0 and every other weight more, so zeros are pruned first.
    """
    score = np.where(array == 0, 0.0, np.maximum(score, _TINY)).astype(np.float32)
    value = ir.Value(name=weight.name)
    value.const_value = ir.Tensor(score, name=weight.name)
    return Weight(
        name=weight.name, shape=weight.shape, dtype=ir.DataType.FLOAT, uses=weight.uses, value=value
    )


def _score(
    weight: Weight,
    array: np.ndarray,
    stats: Statistics,
    criterion: str,
    damp: float,
    compare: str = "row",
) -> np.ndarray:
    designs = stats.designs.get(weight.name)
    if designs is None:
        score = _white_scores(weight, array)
    else:
        layer = stats.layers[weight.name]
        matrix = reconstruct.scores(
            designs[0].to_matrix(array),
            layer.hessian,
            criterion,
            lambda g: layer.inverse(g, damp),
        )
        score = designs[0].from_matrix(matrix)
    return compare_layers(score, compare)


def compare_layers(score: np.ndarray, compare: str) -> np.ndarray:
    """How one layer's scores meet the other layers' in the global ranking (COMPARE)."""
    if compare == "row":
        return score
    total = float(score.sum())
    if compare == "layer":
        return score / total if total > 0 else score
    # lamp: each score over the sum of the scores not below it in its layer (Lee et al. 2021)
    flat = score.reshape(-1)
    order = np.argsort(flat, kind="stable")
    tail = np.cumsum(flat[order][::-1])[::-1]
    out = np.empty_like(flat)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[order] = np.where(tail > 0, flat[order] / tail, 0.0)
    return out.reshape(score.shape)


def _full_mask(layer: LayerPlan, tensor: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's pruned positions (stored layout) as one boolean array."""
    mask = np.zeros(layer.weight.size, dtype=bool)
    if layer.changed:
        for where, _, part in selection.layer_masks(layer, tensor, keys):
            mask[where] = part
    return mask.reshape(layer.weight.shape)


def _masks(
    weights: Sequence[Weight],
    arrays: Sequence[np.ndarray],
    stats: Statistics,
    sparsity: float,
    method: str,
    min_keep: MinKeep | str | float | int | None,
    pattern: tuple[int, int] | None,
    options: Calibration,
) -> tuple[Plan, list[np.ndarray | None]]:
    """The plan that fixes each layer's count (and the N:M layers), and each layer's mask.

    A mask of None means sparsegpt chooses it (N:M, while sweeping the columns).
    """
    criterion = options.criterion
    if pattern is not None:
        base = selection.plan(weights, pattern=pattern)  # which layers can take the pattern
        masks: list[np.ndarray | None] = []
        for layer, array in zip(base.layers, arrays, strict=True):
            weight = layer.weight
            calibrated = weight.name in stats.designs and criterion != "magnitude"
            if layer.pattern is None:
                masks.append(np.zeros(weight.shape, dtype=bool))
            elif calibrated and criterion == "sparsegpt":
                masks.append(None)
            else:  # wanda's scores (or magnitudes) in the plan's own N:M mask
                ranked = (
                    _stand_in(weight, _score(weight, array, stats, "wanda", options.damp), array)
                    if calibrated
                    else weight
                )
                masks.append(
                    _full_mask(layer, ranked.tensor(), UINT32 if calibrated else base.keys)
                )
        return base, masks
    if criterion == "magnitude":
        ranked = list(weights)
    else:
        ranked = [
            _stand_in(w, _score(w, a, stats, criterion, options.damp, options.compare), a)
            for w, a in zip(weights, arrays, strict=True)
        ]
    base = selection.plan(ranked, sparsity, method=method, min_keep=min_keep)
    masks = [
        _full_mask(layer, r.tensor(), base.keys)
        for layer, r in zip(base.layers, ranked, strict=True)
    ]
    return base, masks


def _store(values: np.ndarray, mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
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
    values: np.ndarray  # stored layout, float64
    mask: np.ndarray  # stored layout
    error: float | None
    bias_moved: bool


def repair(
    model: ir.Model,
    weight: Weight,
    array: np.ndarray,
    mask: np.ndarray | None,
    stats: LayerStats,
    per_use: list[LayerStats],
    designs: list[Design],
    options: Calibration,
    pattern: tuple[int, int] | None,
    consts: NodeConstants,
    aliases: dict[str, str],
) -> Repaired:
    """Prune one layer with its statistics: update (sparsegpt), then correct its biases."""
    design = designs[0]
    paired = stats.cross is not None
    w = design.to_matrix(array)
    h = stats.hessian
    if options.criterion == "sparsegpt":
        target = w
        # the refit needs the layer's statistics to be well determined: with fewer rows than
        # inputs, its correction lives mostly in directions the data never saw, where only the
        # damping bounds it (DenseNet-121 on 8 samples: output error 2.5 with it, 0.3 without)
        if paired and stats.rows >= design.in_features:
            target = reconstruct.refit(
                w, h, stats.cross_hessian, lambda g: stats.inverse(g, options.damp)
            )
        mask_m = None if mask is None else design.to_matrix(mask)
        new = np.empty_like(w)
        pruned = np.empty(w.shape, dtype=bool)
        for g in range(w.shape[0]):
            new[g], pruned[g] = reconstruct.sparsegpt(
                target[g],
                h[g],
                counts=None if mask_m is None else reconstruct.block_counts(mask_m[g]),
                pattern=pattern if mask_m is None else None,
                energy=reconstruct.output_energy(w[g], stats.dense_hessian[g]),
                damp=options.damp,
                factor=stats.inverse(g, options.damp),
            )
        mask = design.from_matrix(pruned)
    else:
        assert mask is not None
        new = np.where(design.to_matrix(mask), 0.0, w)
    moved = False
    if options.bias_correction:
        for use, use_design, use_stats in zip(weight.uses, designs, per_use, strict=True):
            shift = reconstruct.bias_shift(
                w, new, use_stats.mean, use_stats.dense_mean if paired else None
            )
            if np.any(shift != 0):
                out = use.node.outputs[0]
                name = out.name  # before an inserted Add takes it over
                # the layer's output type: a float16 weight may be cast to compute in float32
                dtype = np.dtype((out.dtype or weight.dtype).numpy())
                added = shift_bias(model, use.node, shift, use_design.out_axis, dtype, consts)
                if added is not None:
                    aliases[added.name] = aliases.get(name, name)
                moved = True
    error = reconstruct.output_error(
        w,
        new,
        h,
        stats.mean,
        cross=stats.cross_hessian if paired else None,
        dense_hessian=stats.dense_hessian if paired else None,
        dense_mean=stats.dense_mean if paired else None,
        corrected=moved,
    )
    return Repaired(design.from_matrix(new), mask, error, moved)


def _dtype(weight: Weight) -> np.dtype:
    return np.dtype(weight.values_dtype.numpy())


def calibrated_plan(
    model: ir.Model,
    weights: Sequence[Weight],
    sparsity: float,
    options: Calibration,
    *,
    method: str = "global",
    min_keep: MinKeep | str | float | int | None = None,
    pattern: str | tuple[int, int] | None = None,
) -> Plan:
    """Plan and repair with calibration data; the model's biases change in place already, the
    weights when the plan is applied (the plan's layers carry their new values)."""
    nm = selection.parse_pattern(pattern)
    stats, samples, runtime, summary = measure(model, weights, options)
    thin = [n for n, s in stats.layers.items() if s.rows < stats.designs[n][0].in_features]
    if thin:
        summary.notices.append(
            f"{len(thin)} layer(s) saw fewer calibration rows than their input width "
            f"(e.g. {thin[0]}): their statistics are rank-deficient and damping stands in; "
            "more samples help"
        )
    arrays = [np.asarray(w.numpy(), dtype=np.float64) for w in weights]
    with step("scoring and ranking"):
        base, masks = _masks(weights, arrays, stats, sparsity, method, min_keep, nm, options)
    base.criterion = options.criterion
    base.calibration = summary
    consts = NodeConstants(model)
    aliases: dict[str, str] = {}
    results: dict[int, Repaired] = {}
    stored: dict[int, np.ndarray] = {}  # final values as stored, set early in sequential mode
    changed = [i for i, layer in enumerate(base.layers) if layer.changed]
    measured = [i for i in changed if weights[i].name in stats.designs]

    def repaired(i: int, measurement: Statistics) -> Repaired:
        """Layer i repaired with its statistics, which are freed (popped) once used."""
        name = weights[i].name
        return repair(
            model, weights[i], arrays[i], masks[i], measurement.layers.pop(name),
            measurement.uses.pop(name), measurement.designs[name], options, nm, consts, aliases,
        )  # fmt: skip

    with step(f"repairing {len(measured)} layers"):
        if options.mode == "one-pass":
            for i in measured:
                results[i] = repaired(i, stats)
        else:
            # the dense sums served the ranking; each round measures its own
            stats.layers.clear()
            stats.uses.clear()
            dense = copy_model(model)
            for i in changed:  # layers without statistics: zeroed first, as the waves see them
                mask = masks[i]
                if i not in measured and mask is not None:
                    stored[i] = _store(np.where(mask, 0.0, arrays[i]), mask, _dtype(weights[i]))
                    weights[i].set_values(stored[i])
            waves = measurement_rounds(model, weights, measured, options.rounds)
            summary.passes += len(waves)
            for wave in waves:
                chosen = [weights[i] for i in wave]
                paired = collect(
                    model, chosen, samples, runtime, budget_bytes=options.budget_bytes,
                    dense=dense, aliases=aliases,
                )  # fmt: skip
                for i in wave:
                    results[i] = repaired(i, paired)
                    stored[i] = _store(results[i].values, results[i].mask, _dtype(weights[i]))
                    weights[i].set_values(stored[i])
    summary.bias_corrected = sum(r.bias_moved for r in results.values())
    for i in changed:
        layer = base.layers[i]
        weight = weights[i]
        error = results[i].error if i in results else None
        if i in stored:
            values = stored.pop(i)
        elif i in results:
            values = _store(results[i].values, results[i].mask, _dtype(weight))
        else:
            mask = masks[i]
            assert mask is not None
            values = _store(np.where(mask, 0.0, arrays[i]), mask, _dtype(weight))
        base.layers[i] = LayerPlan(
            weight=weight,
            size=layer.size,
            zeros=int(np.count_nonzero(arrays[i] == 0)),
            keep_min=layer.keep_min,
            prune=int(np.count_nonzero(values == 0)),
            values=values,
            error=error,
        )
    for i, layer in enumerate(base.layers):
        if not layer.changed:
            base.layers[i] = LayerPlan(
                weight=weights[i],
                size=layer.size,
                zeros=layer.zeros,
                keep_min=layer.keep_min,
                prune=layer.prune,
            )
    return base
