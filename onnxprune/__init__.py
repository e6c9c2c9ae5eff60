"""onnxprune: prune ONNX models before deployment.

    import onnxprune
    model, report = onnxprune.prune("model.onnx", 0.9, output="model.pruned.onnx")

Settings are small dataclasses (`Selection`, `Calibration`, `Structured`, `Save`,
`Validation`); with samples of the model's inputs, pruning is calibrated (SparseGPT by default):

    model, report = onnxprune.prune("model.onnx", 0.9, calibration="calib.npz",
                                    validation=onnxprune.Validation(data="val.npz"),
                                    output="model.pruned.onnx")

Every stage is importable alone (`find_weights`, `plan`, `apply_plan`, `save_model`,
`validate`), and `PrunePass` is the in-memory part as one onnx-ir pass. `sensitivity` prunes each
layer alone and measures how far the outputs move (what `Selection(sensitivity=...)` protects).
"""

from __future__ import annotations

__version__ = "0.1.0"

# Loaded on first use, so that `import onnxprune.launch` (the command's first step) is instant.
_EXPORTS = {
    "Budget": "onnxprune.options",
    "Calibration": "onnxprune.options",
    "Device": "onnxprune.options",
    "MinKeep": "onnxprune.options",
    "OnnxPruneError": "onnxprune.errors",
    "Plan": "onnxprune.selection",
    "PrunePass": "onnxprune.pipeline",
    "Report": "onnxprune.report",
    "Save": "onnxprune.options",
    "Selection": "onnxprune.options",
    "Structured": "onnxprune.options",
    "Validation": "onnxprune.options",
    "Weight": "onnxprune.weights",
    "apply_plan": "onnxprune.rewrite",
    "find_weights": "onnxprune.weights",
    "inspect": "onnxprune.pipeline",
    "load_model": "onnxprune.storage.io",
    "plan": "onnxprune.selection",
    "prune": "onnxprune.pipeline",
    "save_model": "onnxprune.storage.io",
    "sensitivity": "onnxprune.validate.sensitivity",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *sorted(_EXPORTS)]
