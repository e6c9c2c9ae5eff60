"""Report: what a run decided and measured, as a terminal table and as JSON (the same numbers
the tests assert). All terminal formatting lives in this package.

    tables.py      plain tables and number formats
    weights.py     the unstructured table, `inspect`'s table
    channels.py    the structured table: channels per layer, frozen groups and why
    validation.py  the validation table
    sweep.py       the sweep's table and plot
    sensitivity.py the sensitivity table (each layer pruned alone)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxprune.selection import LayerPlan, Plan
from onnxprune.storage import writer

if TYPE_CHECKING:
    from onnxprune.calibration import CalibrationSummary
    from onnxprune.repair.compensation import Compensation
    from onnxprune.selection.channels import ChannelPlan
    from onnxprune.validate import Validation
    from onnxprune.weights import Untaken


# How each method spreads the sparsity over layers, as the report says it.
SPREAD_HOW = {
    "global": "one ranking over all layers",
    "uniform": "every layer pruned alike",
    "owl": "layer rates from their outlier ratios (OWL)",
}


@dataclass
class Report:
    """Everything a prune run decided (the plan) and measured (calibration, repair, output).

    `errors`: each repaired layer's relative output error on the calibration samples; `zeros`:
    each repaired layer's zero count where repair chose the mask itself (an N:M pattern picked
    while re-solving).
    """

    plan: Plan | None  # None for structured runs, which fill `channels` instead
    input_path: str | None = None
    output_path: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    channels: ChannelPlan | None = None
    calibration: CalibrationSummary | None = None
    errors: dict[str, float | None] = field(default_factory=dict)
    zeros: dict[str, int] = field(default_factory=dict)
    compensation: Compensation | None = None
    validation: Validation | None = None
    # If branches the run's scalar inputs never take (weights.untaken)
    untaken: list[Untaken] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return (self.channels or self.plan).warnings  # type: ignore[union-attr]

    @property
    def criterion(self) -> str:
        return "magnitude" if self.calibration is None else self.calibration.criterion

    def pruned(self, layer: LayerPlan) -> int:
        """Zeros in a layer after the run (the plan's count, or what repair chose)."""
        return self.zeros.get(layer.weight.name, layer.prune)

    @property
    def total_pruned(self) -> int:
        assert self.plan is not None
        return sum(self.pruned(layer) for layer in self.plan.layers)

    def spread(self) -> dict[str, Any] | None:
        """How the sparsity fell across layers (unstructured): the least and most pruned layer,
        the quartiles over layers, and the share of weights in layers pruned beyond 0.9. A global
        ranking decides this spread; this is what it decided (None for N:M or no layers)."""
        plan = self.plan
        if plan is None or plan.pattern is not None or not plan.layers:
            return None
        sizes = np.array([layer.size for layer in plan.layers], dtype=np.float64)
        rates = np.array([self.pruned(layer) for layer in plan.layers]) / np.maximum(sizes, 1)
        low, high = int(np.argmin(rates)), int(np.argmax(rates))
        q1, median, q3 = (float(q) for q in np.quantile(rates, [0.25, 0.5, 0.75]))
        return {
            "how": SPREAD_HOW.get(plan.method, plan.method),
            "min": {"layer": plan.layers[low].weight.name, "sparsity": float(rates[low])},
            "max": {"layer": plan.layers[high].weight.name, "sparsity": float(rates[high])},
            "quartiles": [q1, median, q3],
            "weights_in_layers_above_0.9": float(sizes[rates > 0.9].sum() / sizes.sum()),
        }

    @property
    def sparsity(self) -> float:
        """The achieved sparsity of the prunable weights (unstructured)."""
        assert self.plan is not None
        total = self.plan.total
        return self.total_pruned / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        calibration = None if self.calibration is None else self.calibration.to_dict()
        if self.channels is not None:
            from onnxprune.report.channels import channel_dict

            return {
                "input": self.input_path,
                "output": self.output_path,
                **channel_dict(self.channels),
                "criterion": self.criterion,
                "calibration": calibration,
                "output_errors": dict(self.errors),
                "compensation": None if self.compensation is None else self.compensation.to_dict(),
                # big float constants no layer stands for, with why they are left alone
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
                "untaken_branches": [u.to_dict() for u in self.untaken],
                "size_bytes": {"before": self.size_before, "after": self.size_after},
                "seconds": self.seconds,
                **self.extra,
            }
        plan = self.plan
        assert plan is not None
        return {
            "input": self.input_path,
            "output": self.output_path,
            "method": plan.method,
            "target_sparsity": plan.target,
            "achieved_sparsity": self.sparsity,
            "min_keep": None if plan.min_keep is None else str(plan.min_keep),
            **({"sensitivity_keep": dict(plan.layer_keep)} if plan.layer_keep else {}),
            "pattern": None if plan.pattern is None else "{}:{}".format(*plan.pattern),
            "criterion": self.criterion,
            "calibration": calibration,
            "prunable_weights": plan.total,
            "zeros_before": plan.zeros_before,
            "zeros_after": self.total_pruned,
            "kept": plan.total - self.total_pruned,
            "size_bytes": {"before": self.size_before, "after": self.size_after},
            "seconds": self.seconds,
            "layers": [
                {
                    "name": layer.weight.name,
                    "op": layer.weight.op_type,
                    "nodes": layer.weight.node_names,
                    "shape": list(layer.weight.shape),
                    "dtype": layer.weight.dtype.name,
                    "params": layer.size,
                    "zeros_before": layer.zeros,
                    "min_keep": layer.keep_min,
                    "kept": layer.size - self.pruned(layer),
                    "sparsity": self.pruned(layer) / layer.size if layer.size else 0.0,
                    "output_error": self.errors.get(layer.weight.name),
                }
                for layer in plan.layers
            ],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "untaken_branches": [u.to_dict() for u in self.untaken],
            "spread": self.spread(),
            "warnings": list(plan.warnings),
            **self.extra,
        }


def json_text(data: dict[str, Any]) -> str:
    """A report's JSON, as every command writes it."""
    return json.dumps(data, indent=2) + "\n"


def write_json(data: dict[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write JSON through the one writer, like the model: whole or not at all, no clobbering."""
    return writer.write_text(path, json_text(data), force=force)
