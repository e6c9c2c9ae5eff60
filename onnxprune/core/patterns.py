"""Fixed transforms stored as weights: tensors whose values are a formula, not training.

Exporters store signal processing as ordinary Conv or MatMul weights: an STFT done as a Conv1d
whose rows are a (windowed) DFT basis (Silero VAD's `forward_basis_buffer`), a DCT, YOLOv8's DFL
projection (the weights 0, 1, ..., reg_max - 1), an identity or permutation matrix, a box
filter. Pruning them changes the transform, not a learned function, so finding weights skips
them with the reason `fixed_transform` gives. They are recognised by their values alone, never
by names; every test is exact up to float32 rounding, which no trained weight meets.

The weight is seen as a matrix [rows, columns]: rows along its output axis, the rest flattened.
"""

from __future__ import annotations

import numpy as np

# Relative tolerance: values computed in float64 and stored as float32 (or float16: 1e-3).
TOLERANCE = 2e-3
# A sampled sinusoid needs this many columns before the recurrence test means anything.
MIN_TAPS = 8
# Rows a basis needs (fewer say nothing about a family of frequencies).
MIN_ROWS = 4


def _close(a: np.ndarray, b: np.ndarray, scale: float) -> bool:
    return bool(np.all(np.abs(a - b) <= TOLERANCE * max(scale, 1e-30)))


def _arange(flat: np.ndarray) -> str | None:
    """0, d, 2d, ... (plus an offset): a projection onto bin indices (YOLOv8's DFL)."""
    if flat.size < 4:
        return None
    step = flat[1] - flat[0]
    if step == 0:
        return None
    expected = flat[0] + step * np.arange(flat.size)
    if not _close(flat, expected, float(np.abs(expected).max())):
        return None
    return f"an arithmetic sequence of {flat.size} values ({flat[0]:g}, {flat[0] + step:g}, ...)"


def _selection(rows: np.ndarray) -> str | None:
    """One non-zero per row, all equal: an identity, permutation or one-hot selection."""
    if rows.shape[0] < 2 or rows.shape[1] < 2:
        return None
    nonzero = rows != 0
    if not np.all(nonzero.sum(axis=1) == 1):
        return None
    values = rows[nonzero]
    if not _close(values, np.full_like(values, values[0]), float(abs(values[0]))):
        return None
    cols = np.argmax(nonzero, axis=1)
    kind = "an identity" if np.array_equal(cols, np.arange(len(cols))) else "a selection"
    return f"{kind} matrix ({rows.shape[0]} rows of one non-zero value {values[0]:g})"


def _averaging(rows: np.ndarray, taps: int) -> str | None:
    """Every row 1 / taps repeated (taps: the row's length, or its spatial kernel's): a mean
    over a window, a box filter. A row of ones or of another constant is left to pruning: it
    sums rather than averages, and tests build such weights on purpose."""
    if rows.shape[1] < 4:
        return None
    value = 1.0 / taps
    if not _close(rows, np.full_like(rows, value), value):
        return None
    return f"an averaging kernel ({rows.shape[1]} values of 1/{taps})"


def _sinusoid_rows(rows: np.ndarray) -> np.ndarray | None:
    """Each row's angular frequency where every row is a sampled sinusoid a cos(w t + p) (the
    recurrence x[t-1] + x[t+1] = 2 cos(w) x[t]); None where some row is not one. A zero row is
    frequency 0 of a sine."""
    mid, around = rows[:, 1:-1], rows[:, :-2] + rows[:, 2:]
    energy = np.einsum("rt,rt->r", mid, mid)
    cosine = np.einsum("rt,rt->r", mid, around) / np.maximum(2 * energy, 1e-300)
    # a row of rounding noise (sin(pi t) stored in float32) is a zero row, measured against
    # the whole matrix
    peak = np.abs(rows).max(axis=1, keepdims=True)
    zero = peak[:, 0] <= 1e-6 * peak.max()
    cosine = np.where(zero, 1.0, cosine)
    scale = np.maximum(peak, 1e-6 * peak.max())
    fit = np.abs(around - 2 * cosine[:, None] * mid)
    if np.any(fit > 4 * TOLERANCE * np.maximum(scale, 1e-30)):
        return None
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def _harmonic(omega: np.ndarray, taps: int) -> bool:
    """Frequencies on the grid of a DFT or DCT of the rows' length (multiples of pi / taps, or of
    pi / (taps - 1)), at least three of them distinct."""
    for period in (taps, taps - 1, 2 * taps):
        k = omega * period / np.pi
        if np.all(np.abs(k - np.round(k)) < 0.02) and len(np.unique(np.round(k))) >= 3:
            return True
    return False


def _windowed(rows: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Rows that pair up as (w cos, w sin) of one frequency, w a window shared by all pairs
    (cos^2 + sin^2 = w^2 for every pair): the rows with the window divided out, and the
    layout. Pairs are either the two halves (all cos rows, then all sin rows) or neighbours."""
    count = rows.shape[0]
    if count % 2:
        return None
    for layout, (a, b) in (
        ("cos rows then sin rows", (rows[: count // 2], rows[count // 2 :])),
        ("cos and sin rows interleaved", (rows[0::2], rows[1::2])),
    ):
        power = a * a + b * b
        if not _close(power, np.broadcast_to(power[:1], power.shape), float(power.max())):
            continue
        window = np.sqrt(power[0])
        inside = np.flatnonzero(window > 0.05 * window.max())
        if len(inside) < MIN_TAPS or np.any(np.diff(inside) != 1):
            continue  # the window is one stretch of taps
        return rows[:, inside] / window[inside], layout
    return None


def _fourier(rows: np.ndarray) -> str | None:
    """Rows that are sinusoids at the frequencies of a DFT or DCT of their length, possibly
    windowed (an STFT's Hann-windowed cos/sin basis, done as a Conv1d)."""
    count, taps = rows.shape
    if count < MIN_ROWS or taps < MIN_TAPS:
        return None
    omega = _sinusoid_rows(rows)
    if omega is not None and _harmonic(omega, taps):
        return f"a Fourier/cosine basis ({count} rows of sampled sinusoids, {taps} taps)"
    found = _windowed(rows)
    if found is None:
        return None
    plain, layout = found
    omega = _sinusoid_rows(plain)
    if omega is None or not _harmonic(omega, taps):
        return None
    return f"a windowed Fourier basis ({count} rows: {layout}, {taps} taps)"


def _fourier_probe(array: np.ndarray, axis: int, count: int) -> bool:
    """Whether a few rows fit a (windowed) Fourier basis: the first two are sinusoids, or rows
    0, 1 pair with the first two of the second half, or with rows 2, 3 (cos^2 + sin^2 alike)."""
    picks = sorted({0, 1, 2, 3, count // 2, count // 2 + 1} & set(range(count)))
    taken = np.moveaxis(np.asarray(np.take(array, picks, axis=axis)), axis, 0)
    rows = dict(zip(picks, taken.reshape(len(picks), -1).astype(np.float64), strict=True))
    if _sinusoid_rows(np.stack([rows[0], rows[1]])) is not None:
        return True
    for a, b in ((count // 2, count // 2 + 1), (1, 3)):
        first, second = (0, a), (1 if a != 1 else 2, b)
        if count % 2 or not all(i in rows for i in (*first, *second)):
            continue
        p = rows[first[0]] ** 2 + rows[first[1]] ** 2
        q = rows[second[0]] ** 2 + rows[second[1]] ** 2
        if p.max() > 0 and _close(p, q, float(p.max())):
            return True
    return False


def fixed_transform(array: np.ndarray, out_axis: int | None = 0) -> str | None:
    """What fixed transform a stored weight is, or None for a weight that looks learned.

    Each family is first tried on the first two rows, so a learned weight (every test fails at
    once) costs two rows' reads; only a family those rows fit reads the whole tensor."""
    if array.size < 4 or array.dtype.kind != "f" or array.ndim == 0:
        return None
    axis = 0 if out_axis is None else out_axis
    count = int(array.shape[axis])
    head = np.moveaxis(np.asarray(np.take(array, range(min(count, 2)), axis=axis)), axis, 0)
    head = head.reshape(head.shape[0], -1).astype(np.float64)
    if not np.isfinite(head).all():
        return None
    checks = []
    if (count == 1 or array.size <= 64) and _arange(head.reshape(-1)) is not None:
        checks.append(("flat", _arange))
    if count >= 2 and _selection(head) is not None:
        checks.append(("rows", _selection))
    taps = [head.shape[1], int(np.prod(array.shape[2:], dtype=np.int64))]
    for n in dict.fromkeys(t for t in taps if t > 1):
        if _averaging(head, n) is not None:
            checks.append(("rows", lambda rows, n=n: _averaging(rows, n)))
    if head.shape[1] >= MIN_TAPS and count >= MIN_ROWS and _fourier_probe(array, axis, count):
        checks.append(("rows", _fourier))
    if not checks:
        return None
    rows = np.moveaxis(np.asarray(array), axis, 0).reshape(count, -1).astype(np.float64)
    if not np.isfinite(rows).all():
        return None
    for kind, check in checks:
        found = check(rows.reshape(-1) if kind == "flat" else rows)
        if found is not None:
            return found
    return None
