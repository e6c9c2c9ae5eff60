"""onnxprune: prune ONNX models before deployment.

    import onnxprune
    model, report = onnxprune.prune("model.onnx", sparsity=0.9, output="model.pruned.onnx")

Every stage is importable alone: `load_model`, `find_weights`, `plan`, `apply_plan`, `save_model`.
With samples of the model's inputs, pruning is calibrated (SparseGPT by default):

    model, report = onnxprune.prune("model.onnx", sparsity=0.9, calibration="calib.npz")
"""

from onnxprune.calibration import Calibration
from onnxprune.errors import OnnxPruneError
from onnxprune.io import load_model, save_model
from onnxprune.pipeline import inspect, prune
from onnxprune.report import Report
from onnxprune.rewrite import apply_plan
from onnxprune.selection import MinKeep, Plan, plan
from onnxprune.weights import Weight, find_weights

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "MinKeep",
    "OnnxPruneError",
    "Plan",
    "Report",
    "Weight",
    "__version__",
    "apply_plan",
    "find_weights",
    "inspect",
    "load_model",
    "plan",
    "prune",
    "save_model",
]
