"""Calibrated structured pruning: channels chosen by what their removal costs on the samples, and
every layer that read them re-solved by least squares.

1. capture: the dense model's statistics, one pass (capture.collect, as unstructured);
2. importance: each channel class is scored where it is consumed. In every Conv, Gemm or MatMul
   that reads it, removing its columns J (a Conv's kernel positions, a Flatten's block of rows)
   costs, with the other inputs re-solved and the mean moved into the bias,
       sparsegpt: tr(W_J [(C + D)^-1]_JJ^-1 W_J^T)      (group OBS on the input covariance C)
       wanda:     tr(W_J C_JJ W_J^T)                    (no re-solve: FLAP's fluctuation)
   each output's part divided by that output's fluctuation w_o C w_o^T (floored as in the
   unstructured scores), averaged over the outputs and summed over the consumers. A class no
   weight reads (attention's Q and K dims) is scored by its share of its producers' output
   fluctuation. Both are scale-free: a channel scaled by s where it is made and by 1/s where it
   is read (a BatchNorm folded or not) keeps its score. `magnitude` keeps the weight norms.
3. selection: selection.channels.plan_channels ranks these scores per unit of what removing
   the class saves (parameters, or MACs with --target macs: a greedy knapsack) globally, with
   --min-keep, --round-to and --target exactly as it ranks magnitudes;
4. reconstruction: every consumer of a removed class gets its kept input weights re-solved
   (reconstruct.resolve_inputs: ridge least squares towards the kept weights) and the removed
   channels' mean contribution added to its bias (created where there is none). One-pass solves
   from the dense statistics; sequential (the default) removes the channels first, then measures
   the pruned model wave by wave against the dense one, so each layer also makes up for what the
   layers before it lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calibration import Calibration, CalibrationSummary, reconstruct
from onnxprune.calibration.capture import (
    LayerStats,
    Statistics,
    collect,
    measure,
    measurement_rounds,
)
from onnxprune.channels import ChannelGraph, Member
from onnxprune.core.graphs import copy_model
from onnxprune.core.progress import step
from onnxprune.ops import Design, design_of
from onnxprune.rewrite.bias import shift_bias
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.runtime import Runtime
from onnxprune.scoring import channel_scores
from onnxprune.selection import MinKeep
from onnxprune.selection.channels import ChannelPlan, plan_channels
from onnxprune.weights import Weight, find_weights


@dataclass(eq=False)
class Consumer:
    """A weight whose input columns carry channel classes (groups of 1), seen in its design."""

    weight: Weight
    design: Design
    columns: np.ndarray  # class of each design column
    rows: np.ndarray | None  # class of each output feature, where its outputs are channels

    @property
    def name(self) -> str:
        return self.weight.name


def _along(ids: np.ndarray, axis: int, shape: Sequence[int]) -> np.ndarray:
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(ids.reshape(view), tuple(shape))


def _stored_key(member: Member) -> int:
    producer = member.value.producer()
    return (
        id(producer)
        if producer is not None and producer.op_type == "Constant"
        else id(member.value)
    )


def _weight_key(weight: Weight) -> int:
    return id(weight.constant) if weight.constant is not None else id(weight.value)


def consumers(
    graph: ChannelGraph, weights: Sequence[Weight]
) -> tuple[list[Consumer], list[tuple[Weight, np.ndarray, str]]]:
    """The weights that read channel classes, with the class of every design column and row;
    and those that read some but cannot be re-solved: (weight, the classes, why)."""
    by_key = {_weight_key(w): w for w in weights}
    roles: dict[int, dict[str, Member]] = {}
    for member in graph.members:
        if member.role in ("in", "out"):
            roles.setdefault(_stored_key(member), {}).setdefault(member.role, member)
    found = []
    unsolved = []
    for key, members in roles.items():
        weight = by_key.get(key)
        if weight is None or "in" not in members:
            continue
        member = members["in"]
        designs, why = design_of(weight)
        if why is not None:
            unsolved.append((weight, member.ids, why))
            continue
        if designs[0].groups != 1:
            continue  # grouped layers lose whole groups: nothing is left to re-solve
        design = designs[0]
        columns = design.to_matrix(_along(member.ids, member.axis, weight.shape))[0, 0]
        rows = None
        if "out" in members:
            out = members["out"]
            rows = design.to_matrix(_along(out.ids, out.axis, weight.shape))[0, :, 0]
        found.append(Consumer(weight, design, np.ascontiguousarray(columns), rows))
    return found, unsolved


def _matrix(consumer: Consumer, weight: Weight | None = None) -> np.ndarray:
    array = np.asarray((weight or consumer.weight).numpy(), dtype=np.float64)
    return consumer.design.to_matrix(array)[0]


def importance(
    graph: ChannelGraph,
    found: Sequence[Consumer],
    stats: Statistics,
    criterion: str,
    damp: float,
    removed: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """A score per class (module docstring) and how many prunable classes no consumer measured.

    With `removed` (bool per class), each consumer is scored on the columns it keeps: what
    removing one more class costs once those are gone (their scores are meaningless)."""
    prunable = graph.prunable
    if criterion == "magnitude":
        return channel_scores(graph), 0
    scores = np.zeros(graph.n_classes, dtype=np.float64)
    measured = np.zeros(graph.n_classes, dtype=bool)
    energies: dict[str, np.ndarray] = {}
    for consumer in found:
        layer = stats.layers.get(consumer.name)
        if layer is None:
            continue
        cov = reconstruct.covariance(layer.hessian[0], layer.mean[0])
        w = _matrix(consumer)
        energy = np.einsum("ok,ok->o", w @ cov, w)  # each output's fluctuation
        if consumer.rows is not None:
            energies[consumer.name] = energy
        columns = consumer.columns
        # each output's share: a consumer whose outputs are rescaled (a BatchNorm after it,
        # folded or not) scores the same, and every consumer weighs one in the sum. Floored as
        # reconstruct.output_energy floors it (one product W C, not two).
        rows = np.maximum(energy, 0.0) + reconstruct.DELTA * (np.square(w) @ np.diag(cov))
        weights = np.divide(1.0, rows * len(rows), out=np.zeros_like(rows), where=rows > 0)
        if removed is not None and removed[columns].any():
            keep = ~removed[columns]
            w, cov, columns = w[:, keep], cov[np.ix_(keep, keep)], columns[keep]
        present = np.unique(columns)
        present = present[prunable[present]]
        if not len(present):
            continue
        try:
            errors, _ = reconstruct.channel_errors(
                w, cov, columns, present, damp, obs=criterion == "sparsegpt", row_weights=weights
            )
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


def selection_steps(options: Calibration, found: Sequence[Consumer], stats: Statistics) -> int:
    """How many steps channel selection takes (deterministic: from the layers' sizes)."""
    if options.steps is not None:
        return options.steps
    if options.criterion != "sparsegpt":
        return 1  # wanda and magnitude scores do not depend on what else goes
    flops = sum(float(c.design.in_features) ** 3 for c in found if c.name in stats.layers)
    steps = int(STEP_FLOPS[options.mode] // max(flops, 1.0))
    return max(MIN_STEPS[options.mode], min(MAX_STEPS, steps))


def _select(
    model: ir.Model,
    graph: ChannelGraph,
    sparsity: float,
    scores: np.ndarray,
    found: Sequence[Consumer],
    stats: Statistics,
    options: Calibration,
    steps: int,
    **settings,
) -> ChannelPlan:
    """The channel plan, reached in `steps` equal parts of the target: after each, the classes
    chosen so far rank first and every consumer is re-scored without them (conditional OBS)."""
    removed = None
    for number in range(1, steps + 1):
        ranked = scores.copy()
        if removed is not None:
            ranked[removed] = -np.inf
        plan = plan_channels(
            model, graph, sparsity * number / steps, scores=ranked, per_cost=True, **settings
        )
        removed = plan.removed
        if number < steps:
            scores, _ = importance(graph, found, stats, options.criterion, options.damp, removed)
    return plan


@dataclass
class Solved:
    """A consumer's new kept weights (design layout, kept rows) and bias shift per use."""

    values: np.ndarray  # [O_kept, K_kept]
    shifts: list[np.ndarray]
    error: float
    refit: bool


def solve(
    consumer: Consumer,
    removed: np.ndarray,
    dense: np.ndarray,
    layer: LayerStats,
    per_use: Sequence[LayerStats],
    options: Calibration,
    *,
    paired: bool,
) -> Solved:
    """Re-solve one consumer. `dense`: its dense weights [O, K_dense] in design layout.

    Unpaired statistics are the dense model's: the pruned inputs are its kept columns. Paired
    ones (sequential) measure what the pruned model feeds the layer against the dense inputs.
    """
    keep = ~removed[consumer.columns]
    rows = slice(None) if consumer.rows is None else ~removed[consumer.rows]
    w = dense[rows]

    if paired:  # cov: what the layer now sees; cross: its covariance with the dense inputs
        assert layer.cross is not None
        mean, dense_mean = layer.mean[0], layer.dense_mean[0]
        cov = reconstruct.covariance(layer.hessian[0], mean)
        dense_cov = reconstruct.covariance(layer.dense_hessian[0], dense_mean)
        cross = (layer.cross_hessian[0] - np.outer(mean, dense_mean)).T
    else:
        dense_cov = reconstruct.covariance(layer.hessian[0], layer.mean[0])
        cov, cross = dense_cov[np.ix_(keep, keep)], dense_cov[:, keep]
    # a refit needs the statistics to be determined: with fewer rows than inputs it moves
    # weights along directions the samples never showed, where only the damping bounds it
    refit = layer.rows >= int(keep.sum())
    new = w[:, keep]
    if refit:
        try:
            new = reconstruct.resolve_inputs(w, keep, cov, cross, options.damp)
        except np.linalg.LinAlgError:  # statistics no damping makes usable: bias only
            refit = False
    shifts = []
    if options.bias_correction:
        for use in per_use:
            mean = use.mean[0][keep] if not paired else use.mean[0]
            shifts.append(w @ use.dense_mean[0] - new @ mean)
    error = reconstruct.fluctuation_error(w, new, dense_cov, cov, cross)
    return Solved(new, shifts, error, refit)


def _write(
    model: ir.Model,
    weight: Weight,
    solved: Solved,
    consts: NodeConstants,
    aliases: dict[str, str],
) -> bool:
    """Store a solved consumer into the pruned model: its weights, then its biases."""
    designs, why = design_of(weight)
    assert why is None, why
    design = designs[0]
    dtype = np.dtype(weight.dtype.numpy())
    weight.set_tensor(ir.Tensor(design.from_matrix(solved.values[None]).astype(dtype)))
    moved = False
    for use, use_design, shift in zip(weight.uses, designs, solved.shifts, strict=False):
        if not np.any(shift != 0):
            continue
        out = use.node.outputs[0]
        name = out.name
        out_dtype = np.dtype((out.dtype or weight.dtype).numpy())
        added = shift_bias(model, use.node, shift, use_design.out_axis, out_dtype, consts)
        if added is not None:
            aliases[added.name] = aliases.get(name, name)
        moved = True
    return moved


def calibrated_channels(
    model: ir.Model,
    graph: ChannelGraph,
    sparsity: float,
    options: Calibration,
    *,
    min_keep: MinKeep | str | float | int | None = None,
    round_to: int | None = None,
    target: str = "params",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ChannelPlan:
    """Choose channels from the samples, remove them from `model` (in place) and re-solve the
    layers that read them. Returns the applied plan, with the calibration summary and errors.
    MACs (target="macs") count at `input_shapes` (plan_channels)."""
    settings: dict[str, Any] = {
        "min_keep": min_keep, "round_to": round_to, "target": target, "input_shapes": input_shapes
    }  # fmt: skip
    # argument errors and infeasible targets surface before any sample runs
    plan_channels(model, graph, sparsity, **settings)
    found, unsolved = consumers(graph, find_weights(model).weights)
    stats, samples, runtime, summary = measure(model, [c.weight for c in found], options)
    with step("scoring channels"):
        scores, unmeasured = importance(graph, found, stats, options.criterion, options.damp)
    if unmeasured:
        summary.notices.append(
            f"{unmeasured} channel(s) are read by no measured layer (attention's Q and K, say): "
            "ranked by their share of their producers' output"
        )
    steps = selection_steps(options, found, stats)
    with step(f"ranking channels in {steps} step(s)"):
        plan = _select(model, graph, sparsity, scores, found, stats, options, steps, **settings)
    plan.calibration = summary
    left = [(w.name, why) for w, ids, why in unsolved if plan.removed[ids].any()]
    if left:
        summary.notices.append(
            f"{len(left)} layer(s) read removed channels but are not re-solved, their kept "
            f"weights left as they are: e.g. {left[0][0]}: {left[0][1]}"
        )
    changed = [c for c in found if c.name in stats.layers and plan.removed[c.columns].any()]
    consts = NodeConstants(model)
    aliases: dict[str, str] = {}
    solved: dict[str, Solved] = {}
    if options.mode == "one-pass" or not plan.removed.any():
        with step(f"re-solving {len(changed)} layers"):
            for consumer in changed:
                solved[consumer.name] = solve(
                    consumer, plan.removed, _matrix(consumer), stats.layers.pop(consumer.name),
                    stats.uses.pop(consumer.name), options, paired=False,
                )  # fmt: skip
        with step("removing channels"):
            apply_channel_plan(model, plan)
        pruned = {w.name: w for w in find_weights(model).weights}
        for name, result in solved.items():
            summary.bias_corrected += _write(model, pruned[name], result, consts, aliases)
    else:
        stats.layers.clear()
        stats.uses.clear()
        dense_model = copy_model(model)
        with step("removing channels"):
            apply_channel_plan(model, plan)
        _sequential(model, dense_model, plan, found, samples, runtime, options, summary, solved)
    plan.errors = {name: result.error for name, result in solved.items()}
    thin = sum(not result.refit for result in solved.values())
    if thin:
        summary.notices.append(
            f"{thin} layer(s) saw fewer calibration rows than their kept inputs: only their "
            "biases were corrected; more samples help"
        )
    return plan


def _sequential(
    model: ir.Model,
    dense_model: ir.Model,
    plan: ChannelPlan,
    found: Sequence[Consumer],
    samples,
    runtime: Runtime,
    options: Calibration,
    summary: CalibrationSummary,
    solved: dict[str, Solved],
) -> None:
    """Wave by wave over the pruned model: measure each consumer's inputs there and in the dense
    model, re-solve it against the dense output, store it, go deeper."""
    consts = NodeConstants(model)
    aliases: dict[str, str] = {}
    pruned = find_weights(model).weights
    index = {w.name: i for i, w in enumerate(pruned)}
    dense_weights = {w.name: w for w in find_weights(dense_model).weights}
    by_name = {c.name: c for c in found}
    chosen = [index[c.name] for c in found if c.name in index]
    waves = measurement_rounds(model, pruned, chosen, options.rounds)
    unpaired: list[str] = []
    summary.passes += len(waves)
    with step(f"re-solving {len(chosen)} layers in {len(waves)} waves"):
        for wave in waves:
            batch = [pruned[i] for i in wave]
            paired = collect(
                model, batch, samples, runtime, budget_bytes=options.budget_bytes,
                dense=dense_model, aliases=aliases,
            )  # fmt: skip
            for weight in batch:
                layer = paired.layers.pop(weight.name, None)
                if layer is None:
                    continue
                consumer = by_name[weight.name]
                dense = _matrix(consumer, dense_weights[weight.name])
                if layer.cross is None or layer.cross.shape[2] != dense.shape[1]:
                    unpaired.append(weight.name)  # its dense rows do not line up with these
                    continue
                result = solve(
                    consumer, plan.removed, dense, layer, paired.uses.pop(weight.name), options,
                    paired=True,
                )  # fmt: skip
                summary.bias_corrected += _write(model, weight, result, consts, aliases)
                solved[weight.name] = result
    if unpaired:
        summary.notices.append(
            f"{len(unpaired)} layer(s) could not be paired with the dense model's inputs and are "
            f"not re-solved (e.g. {unpaired[0]})"
        )
