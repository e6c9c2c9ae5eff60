"""Decide what to prune: exact counts, deterministic ties, per-layer minimum retention.

Global ranking (Gupta et al. 2022) prunes the smallest magnitudes over all layers together. With a
minimum retention each layer may lose at most `size - keep` weights, so the ranking is a
water-filling: walk the global order, skip a weight whose layer is full, stop after exactly
round(sparsity x total) weights. Ties in magnitude go to the earlier layer (graph order), then the
lower flat index, so the same model always gives the same file.

The global threshold is found from counts of magnitude keys (scoring.py), gathered by streaming
the weights one tensor at a time (global_threshold.py): nothing holds all weights at once, so
models bigger than memory get the very same decision as small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import tensor_chunks
from onnxprune.errors import InfeasibleError, InvalidArgumentError, NothingToPruneError
from onnxprune.options import METHODS, MinKeep, check_sparsity, parse_pattern
from onnxprune.scoring.magnitude import key_chunks, key_dtype, magnitude_keys
from onnxprune.selection.threshold import Cut, GlobalSelection, cut_for_count
from onnxprune.weights import PRUNABLE_OPS, RECURRENT_OPS, Weight

# A layer left with fewer than this share of its weights is reported as collapsed.
COLLAPSE_KEEP = 0.01


@dataclass
class LayerPlan:
    """What happens to one weight tensor."""

    weight: Weight
    size: int
    zeros: int  # zeros before pruning
    keep_min: int  # minimum retention for this layer (0 without --min-keep)
    prune: int  # zeros after pruning, the zeros already there included
    cut: Cut | None = None  # None: the tensor is left exactly as it was
    pattern: tuple[int, int] | None = None  # N:M, keep N of every M along the input axis
    # what the cut or pattern ranks: calibrated scores laid out as the weight (None: the
    # weight's own magnitudes)
    ranked_by: ir.TensorProtocol | None = None

    @property
    def kept(self) -> int:
        return self.size - self.prune

    @property
    def sparsity(self) -> float:
        return self.prune / self.size if self.size else 0.0

    @property
    def changed(self) -> bool:
        return self.cut is not None or self.pattern is not None


@dataclass
class Plan:
    """The decision for the whole model; rewrite only carries it out."""

    method: str
    target: float
    layers: list[LayerPlan]
    keys: np.dtype
    min_keep: MinKeep | None = None
    pattern: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)
    # per-layer minimum kept fractions above 0 (a sensitivity analysis's), by weight name
    layer_keep: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def pruned(self) -> int:
        return sum(layer.prune for layer in self.layers)

    @property
    def zeros_before(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0


def pattern_mask(keys: np.ndarray, shape: Sequence[int], axis: int, n: int, m: int) -> np.ndarray:
    """Boolean mask (flat) pruning the M-N smallest of every M consecutive weights along `axis`."""
    grouped = np.moveaxis(keys.reshape(shape), axis, -1)
    moved_shape = grouped.shape
    grouped = grouped.reshape(-1, m)
    order = np.argsort(grouped, axis=1, kind="stable")[:, : m - n]
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return np.moveaxis(mask.reshape(moved_shape), -1, axis).reshape(-1)


def layer_masks(
    layer: LayerPlan, tensor: ir.TensorProtocol, keys: np.dtype
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(flat slice, values of `tensor`, zero mask) of one layer, chunk by chunk.

    The single place the rewrite and the counting agree on which weights become zero: the mask
    ranks `layer.ranked_by` where the plan ranked calibrated scores, else `tensor` itself. The
    mask is only valid until the next chunk is requested (its buffer is reused).
    """
    ranked = tensor if layer.ranked_by is None else layer.ranked_by
    if layer.pattern is not None:
        n, m = layer.pattern
        assert layer.weight.in_axis is not None
        flat = tensor.numpy().reshape(-1)
        k = magnitude_keys(ranked.numpy() if layer.ranked_by is not None else flat, keys)
        yield slice(None), flat, pattern_mask(k, layer.weight.shape, layer.weight.in_axis, n, m)
        return
    assert layer.cut is not None
    threshold = keys.type(layer.cut.threshold)
    ties = layer.cut.ties
    values = None if layer.ranked_by is None else tensor_chunks(tensor)
    for where, chunk, k, spare in key_chunks(ranked, keys):
        mask = np.less(k, threshold, out=spare)
        if ties:
            equal = np.flatnonzero(k == threshold)[:ties]
            mask[equal] = True
            ties -= equal.size
        yield where, chunk if values is None else next(values)[1], mask


def layer_mask(layer: LayerPlan, tensor: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's pruned positions as one boolean array, laid out as the weight is stored;
    `tensor` holds the weight's values as the plan saw them."""
    mask = np.zeros(layer.weight.size, dtype=bool)
    if layer.changed:
        for where, _, part in layer_masks(layer, tensor, keys):
            mask[where] = part
    return mask.reshape(layer.weight.shape)


def _count_zeros(tensors: Sequence[ir.TensorProtocol], keys: np.dtype) -> list[int]:
    return [
        sum(k.size - int(np.count_nonzero(k)) for _, _, k, _ in key_chunks(t, keys))
        for t in tensors
    ]


# OWL: the layer sparsities spread this far (absolute) either side of the target (the paper's
# lambda, 0.08 on LLaMA), the most outlier-heavy layer the least sparse.
OWL_SPREAD = 0.08


def owl_rates(outliers: np.ndarray, sparsity: float) -> np.ndarray:
    """Each layer's sparsity before the counts are made exact: target - spread for the layer
    with the most outliers, target + spread for the one with the fewest, linear between."""
    low, high = float(outliers.min()), float(outliers.max())
    if high <= low:
        return np.full(len(outliers), max(sparsity, 1e-9))
    position = (outliers - low) / (high - low)
    spread = min(OWL_SPREAD, sparsity, 1 - sparsity)
    return np.clip(sparsity + spread * (1 - 2 * position), 1e-9, 1.0)


def _apportion(target: int, sizes: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Integer counts in [low, high] summing to target, each as near rate x size as it can be
    (`sizes` may be weighted: a layer's share of the target, not its size)."""
    lo_rate, hi_rate = 0.0, max(1.0, float(np.max(high / np.maximum(sizes, 1e-12))))
    for _ in range(80):
        rate = (lo_rate + hi_rate) / 2
        if np.clip(rate * sizes, low, high).sum() < target:
            lo_rate = rate
        else:
            hi_rate = rate
    ideal = np.clip(hi_rate * sizes, low, high)
    counts = np.clip(np.floor(ideal).astype(np.int64), low, high)
    order = np.lexsort((np.arange(len(sizes)), -(ideal - np.floor(ideal))))
    deficit = target - int(counts.sum())
    for i in order if deficit > 0 else order[::-1]:
        if deficit == 0:
            break
        if deficit > 0 and counts[i] < high[i]:
            counts[i] += 1
            deficit -= 1
        elif deficit < 0 and counts[i] > low[i]:
            counts[i] -= 1
            deficit += 1
    assert deficit == 0, "apportionment lost count"
    return counts


def plan(
    weights: Sequence[Weight],
    sparsity: float = 0.0,
    *,
    method: str = "global",
    min_keep: MinKeep | str | float | int | None = None,
    pattern: str | tuple[int, int] | None = None,
    scores: Sequence[np.ndarray | None] | None = None,
    outliers: Sequence[float] | None = None,
    layer_keep: Mapping[str, float] | None = None,
) -> Plan:
    """Decide, for every weight, how many and which elements become zero.

    `scores` (one per weight, laid out as stored; None where the weight's own magnitudes rank)
    replace the magnitudes: calibrated scores (scoring.weights), non-negative, zero where a
    weight is zero. `method="owl"` spreads the sparsity by `outliers`, each layer's share of
    outlier weights (scoring.weights.outlier_ratios): the layer with the most keeps OWL_SPREAD
    more of its weights than the target, the one with the fewest that much less. `layer_keep`
    (weight name -> fraction) raises a layer's minimum retention above `min_keep`'s; the
    sparsity is still met exactly, or InfeasibleError says how far it can go."""
    if not weights:
        raise NothingToPruneError(
            "no prunable weights: looked for constant weights of "
            + ", ".join((*PRUNABLE_OPS, *RECURRENT_OPS))
        )
    if method not in METHODS:
        raise InvalidArgumentError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    sparsity = check_sparsity(sparsity)
    if not isinstance(min_keep, MinKeep):
        min_keep = MinKeep.parse(min_keep)
    nm = parse_pattern(pattern)
    ranked_by = [None if s is None else ir.Tensor(s) for s in scores or [None] * len(weights)]
    tensors = [w.tensor() if r is None else r for w, r in zip(weights, ranked_by, strict=True)]
    keys = key_dtype(weights) if all(r is None for r in ranked_by) else np.dtype(np.uint32)
    if nm is not None:
        return _plan_pattern(weights, ranked_by, nm, keys)

    sizes = np.array([w.size for w in weights], dtype=np.int64)
    keep = np.array([min_keep.for_layer(int(n)) if min_keep else 0 for n in sizes], dtype=np.int64)
    raised, unknown = _layer_keep(weights, layer_keep)
    keep = np.maximum(
        keep, [MinKeep(fraction=raised.get(w.name, 0.0)).for_layer(w.size) for w in weights]
    )
    total = int(sizes.sum())
    target = round(sparsity * total)
    if method == "global":
        selection = GlobalSelection(tensors, keys, sizes, keep, target)
        zeros = selection.zeros
    else:
        zeros = np.array(_count_zeros(tensors, keys), dtype=np.int64)
    shares = sizes.astype(np.float64)
    if method == "owl":
        if outliers is None or len(outliers) != len(weights):
            raise InvalidArgumentError("--method owl needs each layer's outlier share")
        shares *= owl_rates(np.asarray(outliers, dtype=np.float64), sparsity)
    caps = np.maximum(sizes - keep, zeros)
    result = Plan(
        method=method, target=sparsity, layers=[], keys=keys, min_keep=min_keep, layer_keep=raised
    )
    if unknown:
        result.warnings.append(_unknown_line(unknown))
    if target > int(caps.sum()):
        best = math.floor(int(caps.sum()) / total * 10000) / 10000
        limits = [f"--min-keep {min_keep}"] if min_keep else []
        limits += ["--sensitivity"] if raised else []
        remedies = ["--sparsity"] + (["--min-keep"] if min_keep else [])
        raise InfeasibleError(
            f"{' and '.join(limits)} {'leave' if len(limits) > 1 else 'leaves'} only "
            f"{int(caps.sum())} of {total} weights prunable: the highest sparsity "
            f"{'they allow' if len(limits) > 1 else 'it allows'} is {best:.4f}; lower "
            f"{' or '.join(remedies)}" + (" or raise --sensitivity-tolerance" if raised else "")
        )
    if target < int(zeros.sum()):
        result.warnings.append(
            f"the model already has {int(zeros.sum())} zero weights, sparsity "
            f"{int(zeros.sum()) / total:.4f} > target {sparsity:g}; nothing more is pruned"
        )
        target = int(zeros.sum())

    if method == "global":
        counts, cuts = selection.select(target)
    else:
        counts = _apportion(target, shares, zeros, caps)
        cuts = []
        for tensor, count in zip(tensors, counts, strict=True):
            cuts.append(cut_for_count(magnitude_keys(tensor.numpy(), keys), int(count)))

    for i, weight in enumerate(weights):
        count = int(counts[i])
        changed = count > zeros[i]
        result.layers.append(
            LayerPlan(
                weight=weight,
                size=int(sizes[i]),
                zeros=int(zeros[i]),
                keep_min=int(keep[i]),
                prune=max(count, int(zeros[i])),
                cut=cuts[i] if changed else None,
                ranked_by=ranked_by[i] if changed else None,
            )
        )
    if min_keep is None and method == "global":
        for layer in result.layers:
            if layer.kept < COLLAPSE_KEEP * layer.size and layer.prune > layer.zeros:
                result.warnings.append(
                    f"layer collapse: {layer.weight.name} keeps {layer.kept} of {layer.size} "
                    "weights; --min-keep (e.g. 0.01) guarantees every layer a minimum"
                )
    return result


def _layer_keep(
    weights: Sequence[Weight], layer_keep: Mapping[str, float] | None
) -> tuple[dict[str, float], list[str]]:
    """The raised minimums (fractions above 0) of the weights planned, and the names measured
    that are not among them; none matching at all means the measurements are another model's."""
    if not layer_keep:
        return {}, []
    names = {w.name for w in weights}
    unknown = [name for name in layer_keep if name not in names]
    if len(unknown) == len(layer_keep):
        raise InvalidArgumentError(
            f"--sensitivity names {len(unknown)} layer(s) (e.g. {unknown[0]!r}), none of them a "
            "prunable weight of this model: it was measured on another model"
        )
    raised = {n: float(f) for n, f in layer_keep.items() if n in names and f > 0}
    return raised, unknown


def _unknown_line(names: list[str]) -> str:
    return (
        f"--sensitivity: {len(names)} measured layer(s) are not pruned here (e.g. {names[0]}); "
        "their measurements are unused"
    )


def _plan_pattern(
    weights: Sequence[Weight],
    ranked_by: Sequence[ir.TensorProtocol | None],
    nm: tuple[int, int],
    keys: np.dtype,
) -> Plan:
    n, m = nm
    result = Plan(method=f"{n}:{m}", target=1 - n / m, layers=[], keys=keys, pattern=nm)
    dense: dict[str, list[str]] = {}  # why -> the layers left dense for it
    for weight, ranked in zip(weights, ranked_by, strict=True):
        k = magnitude_keys(weight.numpy(), keys)
        zeros = int(np.count_nonzero(k == 0))
        axis = weight.in_axis
        layer = LayerPlan(weight=weight, size=weight.size, zeros=zeros, keep_min=0, prune=zeros)
        why = _dense_reason(None if axis is None else weight.shape[axis], m)
        if why is not None:
            dense.setdefault(why, []).append(weight.name)
        else:
            layer.pattern = nm
            layer.ranked_by = ranked
            order = k if ranked is None else magnitude_keys(ranked.numpy(), keys)
            mask = pattern_mask(order, weight.shape, axis, n, m)  # as layer_masks makes it
            layer.prune = int(np.count_nonzero(mask | (k == 0)))
        result.layers.append(layer)
    result.warnings += [_dense_line(names, why) for why, names in dense.items()]
    return result


def _dense_reason(width: int | None, m: int) -> str | None:
    """Why a layer whose input axis holds `width` weights is left dense under N:M, if it is."""
    if width is None:
        return "they have no input axis to group along"
    if width < m:
        return f"their input axis has fewer than {m} weights"
    if width % m:
        return f"their input axis is not a multiple of {m}"
    return None


def _dense_line(names: list[str], why: str, shown: int = 3) -> str:
    """One summary line for the layers an N:M pattern leaves dense for one reason."""
    if len(names) == 1:
        why = why.replace("they have", "it has").replace("their", "its")
        return f"1 layer left dense: {why} ({names[0]})"
    some = ", ".join(names[:shown])
    return f"{len(names)} layers left dense: {why} ({'e.g. ' if len(names) > shown else ''}{some})"
