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
    out = np.empty(w.shape, dtype=np.float64)
    for g in range(w.shape[0]):
        energy = solvers.output_energy(w[g], h[g])
        with np.errstate(divide="ignore", invalid="ignore"):
            out[g] = np.where(energy[:, None] > 0, base[g] / energy[:, None], 0.0)
    return designs[0].from_matrix(out)


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
        if pattern:  # N:M compares within a layer: the plain scores
            score = layer_scores(importance, weight, array, stats, damp)
        else:
            score = compare_layers(layer_scores(importance, weight, array, stats, damp), compare)
        out.append(ranked(score, array))
    return out
