"""Calibrated pruning: choose and repair weights from what the model does on the user's samples.

    stats = capture.collect(model, weights, samples, runtime)   # X^T X and means per layer
    plan = prune.calibrated_plan(model, weights, 0.9, options)   # scores, ranking, updates

The global ranking, minimum retention, exact counts and N:M patterns are selection's, unchanged:
calibrated scores (reconstruct.py) simply stand in for magnitudes. Then every pruned layer is
repaired: SparseGPT updates its kept weights (criterion sparsegpt), and bias correction folds the
mean shift of its output into its bias. Sequential mode re-measures each wave of layers on the
model pruned so far and re-solves them against the dense model's outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune import inputs as _inputs
from onnxprune.errors import DataError, InvalidArgumentError

CRITERIA = ("magnitude", "wanda", "sparsegpt")
MODES = ("one-pass", "sequential")
# How the layers' scores meet in the global ranking: row (each output's share of its energy, as
# scored), layer (over the layer's total), lamp (over the layer's scores not below it).
COMPARE = ("row", "layer", "lamp")
DEFAULT_BATCH = 16
# Statistics held at once (X^T X is K^2 float64 per layer); more layers take more passes.
DEFAULT_BUDGET_BYTES = 4 << 30


@dataclass(frozen=True)
class Calibration:
    """How to calibrate: the samples, the criterion, and how the statistics are gathered."""

    data: str | os.PathLike | Mapping[str, np.ndarray]
    criterion: str = "sparsegpt"
    mode: str = "sequential"
    samples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    bias_correction: bool = True
    damp: float = 0.01
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    compare: str = "lamp"
    rounds: int | None = (
        None  # sequential: at most this many measurement rounds (None: a wave each)
    )
    # structured: channels chosen in this many steps, each re-scoring what is left (None: as
    # many as the layers' sizes allow, calibration.channels.selection_steps)
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise InvalidArgumentError(
                f"--criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}"
            )
        if self.mode not in MODES:
            raise InvalidArgumentError(
                f"--calibration-mode {self.mode!r}: choose one of {', '.join(MODES)}"
            )
        if self.compare not in COMPARE:
            raise InvalidArgumentError(f"compare {self.compare!r}: choose one of {COMPARE}")
        if self.rounds is not None and self.rounds < 1:
            raise InvalidArgumentError(f"--calibration-rounds {self.rounds}: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgumentError(f"steps {self.steps}: must be >= 1")
        if self.samples is not None and self.samples < 1:
            raise InvalidArgumentError(f"--calibration-samples {self.samples}: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidArgumentError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise InvalidArgumentError(f"damp {self.damp!r}: must be a positive number")


@dataclass
class CalibrationSummary:
    """What calibration did, for the report."""

    criterion: str
    mode: str
    samples: int
    providers: list[str]
    bias_corrected: int = 0
    fallback: list[tuple[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    passes: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "criterion": self.criterion,
            "mode": self.mode,
            "samples": self.samples,
            "providers": self.providers,
            "bias_corrected_layers": self.bias_corrected,
            "magnitude_fallback": [{"weight": n, "reason": r} for n, r in self.fallback],
            "passes": self.passes,
        }


def model_input_specs(model: ir.Model) -> list[_inputs.InputSpec]:
    """The model's feedable inputs as validation describes them (initializers excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype
        if dtype is None or not isinstance(value.type, ir.TensorType):
            raise DataError(f"model input {value.name!r} is not a tensor; it cannot be fed")
        dims: list[_inputs.Dim] = []
        for d in value.shape or ():
            dims.append(d if isinstance(d, int) else (d.value if d.value else None))
        specs.append(_inputs.InputSpec(value.name, np.dtype(dtype.numpy()), tuple(dims)))
    return specs


def load_samples(model: ir.Model, options: Calibration) -> _inputs.Inputs:
    """The calibration samples, checked against the model's inputs and batched; labels ignored."""
    if isinstance(options.data, Mapping):
        arrays, source = dict(options.data), "calibration data"
    else:
        arrays = _inputs.load_npz(options.data, "--calibration")
        source = f"--calibration {options.data}"
    arrays.pop(_inputs.LABELS, None)
    if options.samples is not None:
        arrays = {k: v[: options.samples] if v.ndim else v for k, v in arrays.items()}
    return _inputs.from_arrays(
        arrays,
        model_input_specs(model),
        batch_size=options.batch_size or DEFAULT_BATCH,
        source=source,
    )
