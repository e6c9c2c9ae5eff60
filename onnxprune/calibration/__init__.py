"""Calibration: what the model does on the user's samples, for scoring and repair to use.

    capture.py   run the model (ONNX Runtime) over the samples, sum each layer's statistics
    design.py    each op's design: the rows X with X @ W^T the layer's output
    solvers.py   the numerics on those statistics (pure numpy): damped inverses, SparseGPT,
                 least squares refits, bias shifts, output errors

The samples are loaded here (`load_samples`); what calibration did is summed up in a
`CalibrationSummary` for the report. Scores come from `scoring`, repairs from `repair`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune import inputs as _inputs
from onnxprune.errors import DataError
from onnxprune.inputs.readers import read_samples
from onnxprune.options import DEFAULT_CALIBRATION_BATCH, Calibration


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


def model_input_specs(
    model: ir.Model, batch_axes: Mapping[str, int] | None = None
) -> list[_inputs.InputSpec]:
    """The model's feedable inputs as validation describes them (initializers excluded), with
    their batch axes (`inputs.batch_axes_of`; `batch_axes` overrides)."""
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
    return _inputs.with_batch_axes(specs, batch_axes)


def load_samples(model: ir.Model, options: Calibration) -> _inputs.Inputs:
    """The calibration samples (an .npz, a folder of shards, arrays, or an iterable of input
    dicts: inputs.readers), checked against the model's inputs and batched on their batch axes;
    labels ignored."""
    return read_samples(
        options.data,
        model_input_specs(model, options.batch_axes),
        batch_size=options.batch_size or DEFAULT_CALIBRATION_BATCH,
        option="--calibration",
        labels=False,
        limit=options.samples,
    )
