"""Calibrated channel scores: the output error removing each channel class costs on the samples.

In every Conv, Gemm or MatMul that reads a class, removing its columns J (a Conv's kernel
positions, a Flatten's block of rows) costs, with the mean moved into the bias, what the
criterion says (`Importance.channel_errors`: sparsegpt re-solves the other inputs, group OBS;
wanda re-solves nothing, FLAP's fluctuation); each output's part is divided by that output's
fluctuation w_o C w_o^T (floored as the weight scores are), averaged over the outputs and summed
over the consumers. A class no weight reads (attention's Q and K dims) is scored by its share of
its producers' output fluctuation. Both are scale-free: a channel scaled by s where it is made
and by 1/s where it is read (a BatchNorm folded or not) keeps its score. `magnitude` keeps the
weight norms (scoring.magnitude.channel_scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxprune.calibration import solvers
from onnxprune.calibration.capture import Statistics
from onnxprune.channels import ChannelGraph
from onnxprune.channels.consumers import Consumer, design_matrix
from onnxprune.scoring.importance import Importance
from onnxprune.scoring.magnitude import channel_scores


def channel_importance(
    graph: ChannelGraph,
    found: Sequence[Consumer],
    stats: Statistics,
    importance: Importance,
    damp: float,
    removed: np.ndarray | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """A score per class (module docstring) and how many prunable classes no consumer measured.

    With `removed` (bool per class), each consumer is scored on the columns it keeps: what
    removing one more class costs once those are gone (their scores are meaningless).
    `advance(1)` is called after each consumer (progress)."""
    prunable = graph.prunable
    if not importance.calibrated:
        return channel_scores(graph), 0
    scores = np.zeros(graph.n_classes, dtype=np.float64)
    measured = np.zeros(graph.n_classes, dtype=bool)
    energies: dict[str, np.ndarray] = {}
    for consumer in found:
        if advance is not None:
            advance(1)
        layer = stats.layers.get(consumer.name)
        if layer is None:
            continue
        cov = solvers.covariance(layer.hessian[0], layer.mean[0])
        w = design_matrix(consumer)
        energy = np.einsum("ok,ok->o", w @ cov, w)  # each output's fluctuation
        if consumer.rows is not None:
            energies[consumer.name] = energy
        columns = consumer.columns
        # each output's share: a consumer whose outputs are rescaled (a BatchNorm after it,
        # folded or not) scores the same, and every consumer weighs one in the sum. Floored as
        # solvers.output_energy floors it (one product W C, not two).
        rows = np.maximum(energy, 0.0) + solvers.DELTA * (np.square(w) @ np.diag(cov))
        weights = np.divide(1.0, rows * len(rows), out=np.zeros_like(rows), where=rows > 0)
        if removed is not None and removed[columns].any():
            keep = ~removed[columns]
            w, cov, columns = w[:, keep], cov[np.ix_(keep, keep)], columns[keep]
        present = np.unique(columns)
        present = present[prunable[present]]
        if not len(present):
            continue
        try:
            errors = importance.channel_errors(w, cov, columns, present, damp, weights)
        except np.linalg.LinAlgError:  # statistics no damping makes usable: left unmeasured
            continue
        scores[present] += errors
        measured[present] = True
    # classes no weight reads: their share of what their producers put out
    for consumer in found:
        energy = energies.get(consumer.name)
        if energy is None or consumer.rows is None:
            continue
        total = float(np.maximum(energy, 0).sum())
        alone = ~measured[consumer.rows] & prunable[consumer.rows]
        if total > 0 and alone.any():
            np.add.at(scores, consumer.rows[alone], np.maximum(energy[alone], 0) / total)
    unmeasured = prunable & ~measured
    # and neither made nor read by a measured layer: weight norms, brought to the same scale
    blind = unmeasured & (scores == 0)
    if blind.any():
        magnitude = channel_scores(graph)
        reference = scores[measured & prunable]
        ratio = (
            float(np.median(reference)) / max(float(np.median(magnitude[measured])), 1e-300)
            if reference.size
            else 1.0
        )
        scores[blind] = magnitude[blind] * ratio
    return scores, int(unmeasured.sum())


# Selection steps of sparsegpt: single-removal scores cannot see that two correlated channels each
# look cheap only while the other stays (a transformer's low-rank residual stream: the OCR
# recogniser at 70% of MACs keeps 59% of its characters in 4 steps, 93% in 32); each step
# re-scores what is left. As many steps as a budget of factorization flops (sum of K^3 over the
# consumers, per step) allows, between these bounds: a few for ResNet-50, the most for small models.
MAX_STEPS = 32
STEP_FLOPS = {"sequential": 2e12, "one-pass": 4e11}
MIN_STEPS = {"sequential": 4, "one-pass": 1}


def selection_steps(
    importance: Importance,
    mode: str,
    steps: int | None,
    found: Sequence[Consumer],
    stats: Statistics,
) -> int:
    """How many steps channel selection takes (deterministic: from the layers' sizes)."""
    if steps is not None:
        return steps
    if not importance.conditional:
        return 1  # wanda and magnitude scores do not depend on what else goes
    flops = sum(float(c.design.in_features) ** 3 for c in found if c.name in stats.layers)
    steps = int(STEP_FLOPS[mode] // max(flops, 1.0))
    return max(MIN_STEPS[mode], min(MAX_STEPS, steps))
