"""Validate: run two models on the same inputs in ONNX Runtime and say what pruning cost.

measure.py    run both models, compare their outputs, time them, measure their cost
metrics.py    the numbers: output errors, accuracy, agreement, latency, sizes, MACs
gates.py      the numbers as pass or fail (exit 1), for CI
preflight.py  data, batch size and gate values checked before any work
sensitivity.py  each layer pruned alone, how far the outputs move (imported on its own)
"""

from __future__ import annotations

from onnxprune.validate.gates import check_gate_values, check_gates
from onnxprune.validate.measure import (
    Baseline,
    ModelResult,
    Run,
    Validation,
    agreement,
    agreement_note,
    baseline,
    compare,
    measure_latency,
    model_file,
    prepare_inputs,
    run_model,
    validate,
)
from onnxprune.validate.preflight import preflight

__all__ = [
    "Baseline",
    "ModelResult",
    "Run",
    "Validation",
    "agreement",
    "agreement_note",
    "baseline",
    "check_gate_values",
    "check_gates",
    "compare",
    "measure_latency",
    "model_file",
    "preflight",
    "prepare_inputs",
    "run_model",
    "validate",
]
