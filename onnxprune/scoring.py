"""Importance scores. Magnitude first, as integer keys that order exactly like |w|.

Non-negative IEEE floats order like their bit patterns read as unsigned integers, so |w| viewed as
uint32 (uint64 for float64 models) gives keys that compare, histogram and tie-break exactly, in
memory or streamed tensor by tensor. NaN sorts above every number and so is never pruned first.
float16 and bfloat16 widen to float32 exactly, so mixed-precision models share one key space.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.weights import Weight


def key_dtype(weights: Iterable[Weight]) -> np.dtype:
    """uint64 keys if any weight is float64 (no precision lost), else uint32."""
    if any(w.dtype == ir.DataType.DOUBLE for w in weights):
        return np.dtype(np.uint64)
    return np.dtype(np.uint32)


UINT32 = np.dtype(np.uint32)


def magnitude_keys(array: np.ndarray, keys: np.dtype = UINT32) -> np.ndarray:
    """Flat integer keys of |array|, ordered exactly as the magnitudes are."""
    floats = np.float64 if keys == np.uint64 else np.float32
    magnitude = np.abs(np.asarray(array).astype(floats, copy=False).reshape(-1))
    return magnitude.view(keys)


@dataclass(frozen=True)
class MagnitudeStats:
    """Per-layer magnitude summary for `inspect` and for histogram-style analysis in the API."""

    size: int
    zeros: int
    min: float
    mean: float
    max: float
    std: float


def magnitude_stats(array: np.ndarray) -> MagnitudeStats:
    """Summary of |w| computed in float64 so small layers and big ones are equally exact."""
    magnitude = np.abs(np.asarray(array, dtype=np.float64).reshape(-1))
    return MagnitudeStats(
        size=int(magnitude.size),
        zeros=int(magnitude.size - np.count_nonzero(magnitude)),
        min=float(magnitude.min()) if magnitude.size else 0.0,
        mean=float(magnitude.mean()) if magnitude.size else 0.0,
        max=float(magnitude.max()) if magnitude.size else 0.0,
        std=float(magnitude.std()) if magnitude.size else 0.0,
    )
