"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ModelLoadError(OnnxPruneError):
    """The input is not a readable ONNX model (missing, not ONNX, truncated, bad external data)."""


class InvalidArgumentError(OnnxPruneError):
    """An option is out of range or malformed."""


class InfeasibleError(OnnxPruneError):
    """The requested sparsity cannot be met under the given constraints."""


class NothingToPruneError(OnnxPruneError):
    """The model holds no prunable weight."""


class OutputError(OnnxPruneError):
    """The output cannot be written where asked (exists, is the input, not writable)."""


class DataError(OnnxPruneError):
    """Validation data does not fit the model."""


class DeviceError(OnnxPruneError):
    """The requested execution device cannot run (--device cuda without a usable CUDA)."""


class ValidationFailed(OnnxPruneError):
    """A validation gate (--max-accuracy-drop, --min-agreement, ...) failed: CLI exit code 1."""

    exit_code = 1
