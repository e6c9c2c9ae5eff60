"""The exact capped global threshold, from counts gathered while streaming the weights.

Global ranking with a minimum retention walks every weight in magnitude-key order (ties: graph
order, then flat index), skips a weight whose layer has already lost its `cap`, and stops after
`target` weights. Where it stops needs counts only, never the weights in memory:

- Large models: a sample of a few million keys, spread over every layer, places a narrow window
  of key values that holds the stopping key with overwhelming probability. One pass then counts,
  per layer, the keys below the window, the keys of each value inside it, and the zeros. That
  pass costs a few compares per weight instead of a 64k-bin histogram.
- Small models, or a window the counts prove the sample misplaced (nothing is guessed): radix
  passes, each a histogram of 16 bits of the key among the keys that match the digits found.

Both paths fold their counts with `_fold` and end in `_cuts`, so the decision is the same integers
whichever path found it; the tests force each path on the same models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import tensor_blocks, tensor_chunks
from onnxprune.scoring.magnitude import key_chunks, magnitude_keys

DIGIT_BITS = 16
# Threads reading layers at once; bounded so temporary memory stays a few chunks.
WORKERS = min(4, os.cpu_count() or 1)
# Below this many weights the radix passes take well under a second: no sample is drawn.
WINDOW_MIN_WEIGHTS = 1 << 26
# The sample: this many blocks of contiguous weights, spread over layers by size (fixed seed).
SAMPLE_BLOCKS = 8192
SAMPLE_BLOCK = 512
# Half-width of the window, in standard deviations of the sampled rank. Generous, because weights
# in one block share a row and its scale, so the sample is worth fewer independent draws.
WINDOW_SIGMAS = 8.0
# Windows narrower than this many key values are counted in a dense histogram per layer.
DENSE_WINDOW = 1 << 16

# One layer's counts in a pass: ascending bin (or key offset) indices, and their counts.
Sparse = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Cut:
    """Prune every key below `threshold`, then the first `ties` keys equal to it in flat order."""

    threshold: int
    ties: int


def cut_for_count(keys: np.ndarray, count: int) -> Cut:
    """The cut that prunes exactly the `count` smallest keys of one layer (ties by index)."""
    if count <= 0:
        return Cut(0, 0)
    threshold = np.partition(keys, count - 1)[count - 1]
    below = int(np.count_nonzero(keys < threshold))
    return Cut(int(threshold), count - below)


def _fold(
    n_bins: int, sparse: Sequence[Sparse], below: np.ndarray, caps: np.ndarray
) -> tuple[np.ndarray, int]:
    """reached[b]: weights the capped walk has pruned once past bin b; and how many before bin 0.

    A layer whose cap cannot bind inside these bins adds plainly (one shared histogram); only a
    layer that fills up here needs its own clipped running sum.
    """
    reached = np.zeros(n_bins, dtype=np.int64)
    free = np.zeros(n_bins, dtype=np.int64)
    for (bins, counts), b, cap in zip(sparse, below.tolist(), caps.tolist(), strict=True):
        if b + int(counts.sum()) > cap:
            dense = np.zeros(n_bins, dtype=np.int64)
            dense[bins] = counts
            reached += np.minimum(np.cumsum(dense) + b, cap)
        else:
            free[bins] += counts
            reached += b
    reached += np.cumsum(free)
    return reached, int(np.minimum(below, caps).sum())


def sample_window(
    tensors: Sequence[ir.TensorProtocol],
    keys: np.dtype,
    sizes: np.ndarray,
    caps: np.ndarray,
    target: int,
) -> tuple[int, int]:
    """Key values [lo, hi] that hold the key where the capped walk reaches `target`, w.h.p.

    Each layer gets blocks in proportion to its size (a small layer is read whole); each sampled
    key stands for size/sampled weights of its layer, and the capped walk is estimated from them.
    """
    total = int(sizes.sum())
    rng = np.random.default_rng(0)
    samples: list[np.ndarray] = []
    scales: list[float] = []
    for tensor, n in zip(tensors, sizes.tolist(), strict=True):
        blocks = math.ceil(SAMPLE_BLOCKS * n / total)
        if blocks * SAMPLE_BLOCK >= n:
            starts, length = np.zeros(1, dtype=np.int64), n
        else:
            starts, length = (
                np.sort(rng.integers(0, n - SAMPLE_BLOCK + 1, size=blocks)),
                SAMPLE_BLOCK,
            )
        sample = np.sort(magnitude_keys(tensor_blocks(tensor, starts, length), keys))
        samples.append(sample)
        scales.append(n / max(1, sample.size))

    def reached(key: int) -> float:
        """Estimated weights with a key <= `key` that the capped walk prunes."""
        return sum(
            min(scale * int(np.searchsorted(sample, key, side="right")), cap)
            for sample, scale, cap in zip(samples, scales, caps.tolist(), strict=True)
        )

    candidates = np.sort(np.concatenate(samples))

    def first_reaching(count: float) -> int | None:
        lo, hi = 0, candidates.size
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(int(candidates[mid])) >= count:
                hi = mid
            else:
                lo = mid + 1
        return int(candidates[lo]) if lo < candidates.size else None

    share = min(max(target / total, 0.0), 1.0)
    margin = WINDOW_SIGMAS * math.sqrt(share * (1 - share) / candidates.size) * total
    margin += 2 * max(scales)  # one sampled key stands for this many weights
    lo = first_reaching(target - margin) if target - margin > 0 else 0
    hi = first_reaching(target + margin)
    top = int(np.iinfo(keys).max)
    return (lo if lo is not None else top), (hi if hi is not None else top)


class GlobalSelection:
    """The capped global threshold of `target` weights, and the cut it means for each layer.

    Construction makes the first pass (it also counts each layer's zeros, which the caller needs
    before it can settle the target); `select` makes any further passes.
    """

    def __init__(
        self,
        tensors: Sequence[ir.TensorProtocol],
        keys: np.dtype,
        sizes: np.ndarray,
        keep: np.ndarray,
        target: int,
    ) -> None:
        self.tensors, self.keys = tensors, keys
        self.bits = keys.itemsize * 8
        n = len(tensors)
        self.below = np.zeros(n, dtype=np.int64)  # keys below the current bins, per layer
        self.equal = np.zeros(n, dtype=np.int64)
        self.zeros = np.zeros(n, dtype=np.int64)
        self.sizes, self.keep = sizes, keep
        self.caps = sizes.copy()
        self.window: tuple[int, int] | None = None
        self.passes = 0  # passes over all the weights, for tests and benchmarks
        if int(sizes.sum()) >= WINDOW_MIN_WEIGHTS and target > 0:
            self.window = sample_window(tensors, keys, sizes, sizes - keep, target)
            self._pending = self._pass(partial(self._layer_window, window=self.window), first=True)
        else:
            self._pending = self._pass(
                partial(self._layer_digits, shift=self._top_shift), first=True
            )

    @property
    def _top_shift(self) -> int:
        return self.bits - DIGIT_BITS

    def _pass(
        self, job: Callable[[int], tuple[np.ndarray, np.ndarray, int, int]], first: bool
    ) -> list[Sparse]:
        """Run `job` on every layer, a few at once: numpy releases the GIL in the per-chunk work."""
        self.passes += 1
        sparse: list[Sparse] = [(np.zeros(0, np.intp),) * 2] * len(self.tensors)
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            jobs = {pool.submit(job, i): i for i in range(len(self.tensors))}
            for done in as_completed(jobs):
                i = jobs[done]
                bins, counts, zeros, below = done.result()
                sparse[i] = (bins, counts)
                self.below[i] += below
                if first:
                    self.zeros[i] = zeros
                    self.caps[i] = max(self.sizes[i] - self.keep[i], zeros)
        return sparse

    def _layer_window(
        self, i: int, window: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(key offsets from lo, their counts, zeros, keys below lo) of one layer."""
        keys = self.keys
        lo, width = keys.type(window[0]), keys.type(window[1] - window[0])
        dense = int(width) < DENSE_WINDOW
        hist = np.zeros(int(width) + 1 if dense else 0, dtype=np.int64)
        parts: list[np.ndarray] = []
        zeros = below = 0
        for _, _, k, spare in key_chunks(self.tensors[i], keys):
            # a few compares per weight, each into the same two buffers (they stay in cache)
            mask = np.equal(k, 0, out=spare)
            zeros += int(np.count_nonzero(mask))
            below += int(np.count_nonzero(np.less(k, lo, out=mask)))
            k -= lo  # keys below the window wrap around above it
            inside = k[np.less_equal(k, width, out=mask)]
            if dense:
                hist += np.bincount(inside.astype(np.intp), minlength=hist.size)
            else:
                parts.append(inside)
        if dense:
            offsets = np.flatnonzero(hist)
            return offsets, hist[offsets], zeros, below
        offsets, counts = np.unique(
            np.concatenate(parts or [np.zeros(0, keys)]), return_counts=True
        )
        return offsets, counts.astype(np.int64), zeros, below

    def _layer_digits(
        self, i: int, shift: int, prefix: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(digits, their counts, zeros, 0) of one layer: the digit of the keys at `shift`, among
        the keys whose higher digits are `prefix` (all keys on the first pass)."""
        bins = 1 << DIGIT_BITS
        keys = self.keys
        first = prefix is None
        hist = np.zeros(bins, dtype=np.int64)
        zeros = 0
        raw = first and not shift and keys.itemsize == 2  # one pass over 16-bit keys
        for _, chunk in tensor_chunks(self.tensors[i]):
            if raw:  # count the raw bits, fold the two signs together below: one op fewer
                hist += np.bincount(chunk.view(keys), minlength=bins)
                continue
            k = magnitude_keys(chunk, keys)
            if first and shift:
                zeros += int(np.count_nonzero(k == 0))
            elif not first:
                k = k[(k >> keys.type(shift + DIGIT_BITS)) == keys.type(prefix)]
            if shift:
                k >>= keys.type(shift)
            if not first:
                k &= keys.type(bins - 1)
            # the sign bit is cleared, so a first digit is already below 2**15
            hist += np.bincount(k, minlength=bins)
        if raw:
            half = bins // 2
            hist[:half] += hist[half:]
            hist[half:] = 0
        if first and not shift:  # one digit is the whole key: digit 0 is exactly the zeros
            zeros = int(hist[0])
        digits = np.flatnonzero(hist)
        return digits, hist[digits], zeros, 0

    def _settle(self, n_bins: int, sparse: Sequence[Sparse], target: int) -> int | None:
        """The bin where the capped walk reaches `target`, with each layer's keys below it and
        in it; None when the walk does not reach it inside these bins."""
        reached, before = _fold(n_bins, sparse, self.below, self.caps)
        if not n_bins or before >= target or reached[-1] < target:
            return None
        b = int(np.searchsorted(reached, target, side="left"))
        for i, (bins, counts) in enumerate(sparse):
            j = int(np.searchsorted(bins, b))
            self.below[i] += int(counts[:j].sum())
            self.equal[i] = counts[j] if j < len(bins) and bins[j] == b else 0
        return b

    def select(self, target: int) -> tuple[np.ndarray, list[Cut]]:
        """Per-layer counts summing to `target`, and the cut that prunes each layer's count."""
        if target <= int(self.zeros.sum()):  # the walk takes exactly the zeros: nothing changes
            return self.zeros.copy(), [Cut(0, 0)] * len(self.tensors)
        sparse = self._pending
        if self.window is not None:
            values = np.unique(np.concatenate([offsets for offsets, _ in sparse]))
            binned = [(np.searchsorted(values, offsets), c) for offsets, c in sparse]
            b = self._settle(len(values), binned, target)
            if b is not None:
                return self._cuts(target, self.window[0] + int(values[b]))
            # the sample misplaced the window (the counts say so): find the threshold by digits
            self.below[:] = 0
            sparse = self._pass(partial(self._layer_digits, shift=self._top_shift), first=False)
        shift, prefix = self._top_shift, 0
        while True:
            b = self._settle(1 << DIGIT_BITS, sparse, target)
            assert b is not None, "the radix walk lost the threshold"
            prefix = (prefix << DIGIT_BITS) | b
            if shift == 0:
                return self._cuts(target, prefix)
            shift -= DIGIT_BITS
            sparse = self._pass(
                partial(self._layer_digits, shift=shift, prefix=prefix), first=False
            )

    def _cuts(self, target: int, threshold: int) -> tuple[np.ndarray, list[Cut]]:
        caps, below = self.caps, self.below
        counts = np.minimum(below, caps)
        remaining = target - int(counts.sum())
        cuts: list[Cut] = []
        for i, tensor in enumerate(self.tensors):
            if below[i] >= caps[i]:
                # the layer filled up before the global threshold: its own cut at its cap
                k = magnitude_keys(tensor.numpy(), self.keys)
                cuts.append(cut_for_count(k, int(caps[i])))
                continue
            ties = int(min(remaining, self.equal[i], caps[i] - below[i]))
            remaining -= ties
            counts[i] += ties
            cuts.append(Cut(threshold, ties))
        assert remaining == 0 and int(counts.sum()) == target, "global selection lost count"
        return counts, cuts
