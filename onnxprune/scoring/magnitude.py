"""Importance scores. Magnitude first, as integer keys that order exactly like |w|.

Non-negative IEEE floats order like their bit patterns read as unsigned integers, so the bits of
w with the sign bit cleared are keys that compare, histogram and tie-break exactly like |w|, in
memory or streamed tensor by tensor. NaN sorts above every number and so is never pruned first.
A model whose weights are all float16 (or all bfloat16) uses its own 16-bit keys: one histogram
pass then finds the exact threshold. Mixed precisions widen to float32 keys (exact for both),
float64 models use 64-bit keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import tensor_blocks, tensor_chunks
from onnxprune.weights import Weight

if TYPE_CHECKING:
    from onnxprune.channels import ChannelGraph


def key_dtype(weights: Iterable[Weight]) -> np.dtype:
    """The narrowest key type that orders every weight's magnitude exactly."""
    dtypes = {w.values_dtype for w in weights}
    if ir.DataType.DOUBLE in dtypes:
        return np.dtype(np.uint64)
    if dtypes == {ir.DataType.FLOAT16} or dtypes == {ir.DataType.BFLOAT16}:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


UINT32 = np.dtype(np.uint32)
_FLOAT_OF_KEY = {2: np.float16, 4: np.float32, 8: np.float64}


def magnitude_keys(
    array: np.ndarray, keys: np.dtype = UINT32, out: np.ndarray | None = None
) -> np.ndarray:
    """Flat integer keys of |array|, ordered exactly as the magnitudes are.

    `out`, a buffer of at least array.size keys, saves an allocation per chunk in hot loops.
    """
    array = np.asarray(array).reshape(-1)
    if array.dtype.itemsize != keys.itemsize:  # widen, exactly, to the key's float width
        array = array.astype(_FLOAT_OF_KEY[keys.itemsize])
    sign_cleared = keys.type(np.iinfo(keys).max >> 1)
    return np.bitwise_and(
        array.view(keys), sign_cleared, out=None if out is None else out[: array.size]
    )


def key_chunks(
    tensor: ir.TensorProtocol, keys: np.dtype
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    """(flat slice, values, their keys, a spare bool array of the same length), chunk by chunk.

    Keys and spare live in two buffers reused for every chunk, so a pass over a huge tensor
    allocates nothing per chunk and its temporaries stay in cache; both are valid until the next
    chunk is requested.
    """
    key_buffer = np.empty(0, dtype=keys)
    spare_buffer = np.empty(0, dtype=bool)
    for where, chunk in tensor_chunks(tensor):
        if key_buffer.size < chunk.size:
            key_buffer = np.empty(chunk.size, dtype=keys)
            spare_buffer = np.empty(chunk.size, dtype=bool)
        k = magnitude_keys(chunk, keys, out=key_buffer)
        yield where, chunk, k, spare_buffer[: chunk.size]


@dataclass(frozen=True)
class MagnitudeStats:
    """Per-layer magnitude summary for `inspect` and for histogram-style analysis in the API."""

    size: int
    zeros: int
    min: float
    mean: float
    max: float
    std: float


def magnitude_stats(source: ir.TensorProtocol | np.ndarray) -> MagnitudeStats:
    """Summary of |w| in float64, so small layers and big ones are equally exact.

    Read chunk by chunk (means and variances merged exactly, Chan et al.), so a layer of billions
    of weights needs no float64 copy of itself.
    """
    tensor = ir.Tensor(source) if isinstance(source, np.ndarray) else source
    size = zeros = 0
    mean = m2 = 0.0
    lows, highs = [], []
    for _, chunk in tensor_chunks(tensor):
        magnitude = np.abs(chunk.astype(np.float64))
        n = magnitude.size
        if not n:
            continue
        zeros += n - int(np.count_nonzero(magnitude))
        lows.append(magnitude.min())
        highs.append(magnitude.max())
        chunk_mean = float(magnitude.mean())
        chunk_m2 = float(np.square(magnitude - chunk_mean).sum())
        delta = chunk_mean - mean
        total = size + n
        mean += delta * n / total
        m2 += chunk_m2 + delta * delta * size * n / total
        size = total
    if not size:
        return MagnitudeStats(size=0, zeros=0, min=0.0, mean=0.0, max=0.0, std=0.0)
    return MagnitudeStats(
        size=size,
        zeros=zeros,
        min=float(np.min(lows)),  # np.min and np.max keep a NaN, as the magnitudes would
        mean=mean,
        max=float(np.max(highs)),
        std=math.sqrt(m2 / size) if math.isfinite(m2) else float("nan"),
    )


# Normalisations of a member's per-channel magnitudes before they are summed into a group score.
# "mean" (the default) divides each member by its own mean channel norm, so every layer's average
# channel weighs 1 whatever the layer's size, fan-in or weight scale; see selection/channels.py for
# the measurement that chose it.
CHANNEL_NORMS = ("mean", "rms", "none")


# Elements read at once when summing squares, so a huge layer never needs a float64 copy.
SQUARES_CHUNK = 1 << 22


def channel_squares(array: np.ndarray, axis: int) -> np.ndarray:
    """Sum of squares of each index along `axis`, in float64, reading slabs of leading rows."""
    totals = np.zeros(array.shape[axis], dtype=np.float64)
    row = int(np.prod(array.shape[1:], dtype=np.int64))
    step = max(1, SQUARES_CHUNK // max(1, row))
    others = tuple(a for a in range(array.ndim) if a != axis)
    for start in range(0, array.shape[0], step):
        block = np.square(np.asarray(array[start : start + step], dtype=np.float64))
        if axis == 0:
            totals[start : start + len(block)] = block.sum(axis=others)
        else:
            totals += block.sum(axis=others)
    return totals


def channel_scores(graph: ChannelGraph, normalize: str = "mean") -> np.ndarray:
    """Importance per channel class: the sum over its weight members (the producers' output
    channels and the consumers' input channels) of each member's normalised L2 norm."""
    from onnxprune.channels import stored_values

    if normalize not in CHANNEL_NORMS:
        raise ValueError(f"normalize={normalize!r}: choose one of {CHANNEL_NORMS}")
    scores = np.zeros(graph.n_classes, dtype=np.float64)
    for member in graph.members:
        if member.role not in ("out", "in"):
            continue
        array = stored_values(member.value)  # a quantized weight's dequantized values
        squares = channel_squares(array, member.axis)
        per_class = np.bincount(member.ids, weights=squares, minlength=graph.n_classes)
        present = np.unique(member.ids)
        norms = np.sqrt(per_class[present])
        if normalize == "mean":
            norms = norms / max(float(norms.mean()), np.finfo(np.float64).tiny)
        elif normalize == "rms":
            counts = np.bincount(member.ids, minlength=graph.n_classes)[present]
            per_index = array.size // max(1, len(member.ids))
            norms = norms / np.sqrt(counts * max(1, per_index))
        scores[present] += norms
    return scores


# Magnitude is compared across layers only as far as their weight scales are comparable: layers
# whose typical weights differ by more than this factor, or a normalisation left after a layer
# (its scale is not in the weights), make the global ranking depend on the parametrisation.
SCALE_SPREAD = 10.0
_SCALE_BLOCKS = 64
_SCALE_BLOCK = 64


def layer_scale(weight: Weight) -> float:
    """Root mean square of a weight, estimated from a few evenly spread blocks (reads little)."""
    size = weight.size
    length = min(_SCALE_BLOCK, size)
    starts = np.unique(np.linspace(0, size - length, num=min(_SCALE_BLOCKS, size), dtype=np.int64))
    sample = tensor_blocks(weight.tensor(), starts, length).astype(np.float64)
    return float(np.sqrt(np.mean(np.square(sample)))) if sample.size else 0.0


def magnitude_hazard(weights: Sequence[Weight]) -> str | None:
    """Why global magnitude may mislead on this model, or None: the scale spread between layers
    and the normalisations left unfolded after them. Calibration data is the remedy."""
    scales = [s for s in (layer_scale(w) for w in weights) if s > 0 and math.isfinite(s)]
    spread = max(scales) / min(scales) if len(scales) > 1 else 1.0
    norms = sum(
        1
        for w in weights
        for use in w.uses
        for out in use.node.outputs[:1]
        for reader in out.uses()
        if reader.node.op_type in NORMALIZATIONS
    )
    reasons = []
    if spread > SCALE_SPREAD:
        reasons.append(f"per-layer weight scales differ by {spread:.0f}x")
    if norms:
        reasons.append(f"{norms} normalisation node(s) follow pruned layers unfolded")
    if not reasons:
        return None
    return (
        "magnitude is not scale-free on this model ("
        + "; ".join(reasons)
        + "): the global ranking may empty layers that matter; --calibration SAMPLES.npz ranks "
        "weights by their effect on the outputs instead"
    )


NORMALIZATIONS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization"})
