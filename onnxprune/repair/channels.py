"""Repair after channel removal: every layer that read a removed channel re-solved.

Each consumer of a removed class gets its kept input weights re-solved by ridge least squares
towards the kept weights (`solvers.resolve_inputs`), so the output stays the dense one, and the
removed channels' mean contribution added to its bias (created where there is none). One-pass
solves from the dense model's statistics; sequential measures the pruned model wave by wave
against the dense one, so each layer also makes up for what the layers before it lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.calibration import solvers
from onnxprune.calibration.capture import LayerStats, Statistics
from onnxprune.calibration.walk import SequentialWalk
from onnxprune.channels.consumers import Consumer, design_matrix
from onnxprune.core.progress import step
from onnxprune.inputs import Inputs
from onnxprune.ops import design_of
from onnxprune.options import Calibration
from onnxprune.rewrite.bias import shift_bias
from onnxprune.rewrite.constants import NodeConstants
from onnxprune.rewrite.unstructured import before_rewrite
from onnxprune.runtime import Runtime
from onnxprune.selection.channels import ChannelPlan
from onnxprune.weights import Weight, find_weights


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
        cov = solvers.covariance(layer.hessian[0], mean)
        dense_cov = solvers.covariance(layer.dense_hessian[0], dense_mean)
        cross = (layer.cross_hessian[0] - np.outer(mean, dense_mean)).T
    else:
        dense_cov = solvers.covariance(layer.hessian[0], layer.mean[0])
        cov, cross = dense_cov[np.ix_(keep, keep)], dense_cov[:, keep]
    # a refit needs the statistics to be determined: with fewer rows than inputs it moves
    # weights along directions the samples never showed, where only the damping bounds it
    refit = layer.rows >= int(keep.sum())
    new = w[:, keep]
    if refit:
        try:
            new = solvers.resolve_inputs(w, keep, cov, cross, options.damp)
        except np.linalg.LinAlgError:  # statistics no damping makes usable: bias only
            refit = False
    shifts = []
    if options.bias_correction:
        for use in per_use:
            mean = use.mean[0][keep] if not paired else use.mean[0]
            shifts.append(w @ use.dense_mean[0] - new @ mean)
    error = solvers.fluctuation_error(w, new, dense_cov, cov, cross)
    return Solved(new, shifts, error, refit)


def write(
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


def _dense(consumer: Consumer) -> np.ndarray:
    """The consumer's weights as they were before channels were removed, in its design."""
    return design_matrix(consumer, before_rewrite(consumer.weight.stored()))


@dataclass
class ChannelsRepair:
    """What the repair did, for the report."""

    solved: dict[str, Solved] = field(default_factory=dict)
    bias_corrected: int = 0
    passes: int = 0
    notices: list[str] = field(default_factory=list)

    @property
    def errors(self) -> dict[str, float]:
        return {name: result.error for name, result in self.solved.items()}


class RefitChannelsPass(ir.passes.InPlacePass):
    """Re-solve every consumer of a removed channel (module docstring). Runs after
    `RemoveChannelsPass(plan)`: the dense weights are read from what the rewrite replaced.
    `stats` are the dense model's; sequential mode measures again against `dense`, a copy of
    the model taken before the removal. The result is in `self.result` after the pass ran."""

    def __init__(
        self,
        plan: ChannelPlan,
        found: Sequence[Consumer],
        options: Calibration,
        stats: Statistics,
        samples: Inputs,
        runtime: Runtime,
        dense: ir.Model | None = None,
    ) -> None:
        super().__init__()
        self.plan, self.found, self.options, self.stats = plan, found, options, stats
        self.samples, self.runtime, self.dense = samples, runtime, dense
        self.result = ChannelsRepair()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = self.plan.removed
        if self.options.mode == "one-pass" or not removed.any():
            self._one_pass(model)
        else:
            assert self.dense is not None, "sequential repair needs the dense model"
            self._sequential(model)
        return ir.passes.PassResult(model, modified=bool(self.result.solved))

    def _one_pass(self, model: ir.Model) -> None:
        removed, stats = self.plan.removed, self.stats
        changed = [c for c in self.found if c.name in stats.layers and removed[c.columns].any()]
        with step(f"re-solving {len(changed)} layers", total=len(changed)) as meter:
            for consumer in changed:
                self.result.solved[consumer.name] = solve(
                    consumer, removed, _dense(consumer), stats.layers.pop(consumer.name),
                    stats.uses.pop(consumer.name), self.options, paired=False,
                )  # fmt: skip
                meter.advance()
        consts = NodeConstants(model)
        aliases: dict[str, str] = {}
        pruned = {w.name: w for w in find_weights(model).weights}
        for name, result in self.result.solved.items():
            self.result.bias_corrected += write(model, pruned[name], result, consts, aliases)

    def _sequential(self, model: ir.Model) -> None:
        """Segment by segment over the pruned model: measure each consumer's inputs there and
        in the dense model, re-solve it against the dense output, store it, go deeper."""
        self.stats.layers.clear()  # the dense sums served the ranking
        self.stats.uses.clear()
        consts = NodeConstants(model)
        aliases: dict[str, str] = {}
        pruned = find_weights(model).weights
        index = {w.name: i for i, w in enumerate(pruned)}
        by_name = {c.name: c for c in self.found}
        chosen = [index[c.name] for c in self.found if c.name in index]
        unpaired: list[str] = []
        walk = SequentialWalk(
            model, self.dense, pruned, chosen, self.samples, self.runtime, aliases, blocks=False
        )  # type: ignore[arg-type]
        with step(f"re-solving {len(chosen)} layers", total=len(chosen)) as meter:
            for wave, paired in walk.rounds():
                for weight in (pruned[i] for i in wave):
                    meter.advance()
                    layer = paired.layers.pop(weight.name, None)
                    if layer is None:
                        continue
                    consumer = by_name[weight.name]
                    dense = _dense(consumer)
                    if layer.cross is None or layer.cross.shape[2] != dense.shape[1]:
                        unpaired.append(weight.name)  # its dense rows do not line up
                        continue
                    result = solve(
                        consumer, self.plan.removed, dense, layer,
                        paired.uses.pop(weight.name), self.options, paired=True,
                    )  # fmt: skip
                    self.result.bias_corrected += write(model, weight, result, consts, aliases)
                    self.result.solved[weight.name] = result
        self.result.passes += walk.passes
        if unpaired:
            self.result.notices.append(
                f"{len(unpaired)} layer(s) could not be paired with the dense model's inputs "
                f"and are not re-solved (e.g. {unpaired[0]})"
            )
