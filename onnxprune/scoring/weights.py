"""Calibrated weight scores: what selection ranks instead of magnitudes when samples are given.

Each measured layer is scored by its criterion in its design (the weight as W [G, O, K]), each
output's scores divided by that output's energy r_i (`solvers.output_energy`), and laid out as
the weight is stored. A layer without statistics (no calibration rule, inside a subgraph) is
scored as if its inputs were white (H = I): the same formula. `compare` then decides how one
layer's scores meet the other layers' in the global ranking (options.COMPARE). Zero weights
score exactly 0 and every other weight more, so zeros are pruned first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxprune.calibration import solvers
from onnxprune.calibration.capture import Statistics
from onnxprune.scoring.importance import Importance
from onnxprune.weights import Weight

# The smallest positive score, so a non-zero weight always ranks above a zero one.
TINY = float(np.finfo(np.float32).tiny)
# OWL's outliers: scores above this many times their layer's mean (the paper's M).
OUTLIER_RATIO = 5.0


def white_scores(weight: Weight, array: np.ndarray) -> np.ndarray:
    """The calibrated score of a weight without statistics, as if its inputs were white (H = I):
    w^2 over the sum of w^2 of its output (floored as r_i is), laid out as stored."""
    w = np.square(array)
    axis = weight.out_axis
    if axis is None:
        total = float(w.sum())
        return w / total if total > 0 else w
    others = tuple(a for a in range(w.ndim) if a != axis)
    sums = np.sum(w, axis=others, keepdims=True) * (1 + solvers.DELTA)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums > 0, w / sums, 0.0)


def layer_scores(
    importance: Importance, weight: Weight, array: np.ndarray, stats: Statistics, damp: float
) -> np.ndarray:
    """One layer's scores as stored: its criterion's, over each output's energy."""
    designs = stats.designs.get(weight.name)
    if designs is None:
        return white_scores(weight, array)
    layer = stats.layers[weight.name]
    w = designs[0].to_matrix(array)
    h = layer.hessian
    base = importance.weight_scores(w, h, lambda g: layer.inverse(g, damp))
    if importance.per_row:
        return designs[0].from_matrix(row_ranks(base))
    out = np.empty(w.shape, dtype=np.float64)
    for g in range(w.shape[0]):
        energy = solvers.output_energy(w[g], h[g])
        with np.errstate(divide="ignore", invalid="ignore"):
            out[g] = np.where(energy[:, None] > 0, base[g] / energy[:, None], 0.0)
    return designs[0].from_matrix(out)


def row_ranks(scores: np.ndarray) -> np.ndarray:
    """Each score's rank within its output row (last axis) over the row's length, in (0, 1]: a
    ranking that compares weights within a row only, and prunes every row alike at any cut
    (ties to the earlier column, as selection breaks them)."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ranks = np.empty(scores.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[-1] + 1, dtype=np.float64), -1)
    return ranks / scores.shape[-1]


def outlier_ratios(
    weights: Sequence[Weight], stats: Statistics | None, ratio: float = OUTLIER_RATIO
) -> list[float]:
    """Each layer's share of outlier weights, |w_ij| ||x_j|| above `ratio` times the layer's mean
    (|w_ij| without statistics): what OWL allocates sparsity by (Yin et al. 2023, "Outlier
    Weighed Layerwise sparsity"): a layer with more outliers keeps more."""
    out = []
    for weight in weights:
        array = np.abs(np.asarray(weight.numpy(), dtype=np.float64))
        designs = None if stats is None else stats.designs.get(weight.name)
        if designs is not None:
            w = designs[0].to_matrix(array)
            norms = np.sqrt(np.einsum("gkk->gk", stats.layers[weight.name].hessian))
            array = w * norms[:, None, :]
        mean = float(array.mean()) if array.size else 0.0
        out.append(float(np.mean(array > ratio * mean)) if mean > 0 else 0.0)
    return out


def compare_layers(score: np.ndarray, compare: str) -> np.ndarray:
    """How one layer's scores meet the other layers' in the global ranking (options.COMPARE)."""
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


def ranked(score: np.ndarray, array: np.ndarray) -> np.ndarray:
    """Scores as selection ranks them: float32, zero weights exactly 0, every other above."""
    return np.where(array == 0, 0.0, np.maximum(score, TINY)).astype(np.float32)


def weight_scores(
    weights: Sequence[Weight],
    stats: Statistics,
    importance: Importance,
    *,
    damp: float,
    compare: str,
    pattern: bool = False,
) -> list[np.ndarray | None]:
    """What selection ranks for each weight (stored layout), or None where it ranks the
    weight's own magnitudes: every weight with a magnitude criterion; with an N:M `pattern`,
    every weight whose criterion leaves the pattern to magnitude (see
    `Importance.pattern_scores`) or that has no statistics."""
    out: list[np.ndarray | None] = []
    for weight in weights:
        if not importance.calibrated:
            out.append(None)
            continue
        if pattern and not (importance.pattern_scores() and weight.name in stats.designs):
            out.append(None)
            continue
        array = np.asarray(weight.numpy(), dtype=np.float64)
        if pattern or importance.per_row:  # compared within a layer (a row): the plain scores
            score = layer_scores(importance, weight, array, stats, damp)
        else:
            score = compare_layers(layer_scores(importance, weight, array, stats, damp), compare)
        out.append(ranked(score, array))
    return out
