"""Numerics on calibration statistics (pure numpy): damped inverses, SparseGPT / OBS updates,
least-squares refits, bias shifts, output errors, channel errors.

Everything here works on one layer in its design layout: W [G, O, K] and per-group statistics
(H = E[x x^T] [G, K, K], means [G, K]); callers map the result back to the stored tensor.

r_i = w_i H w_i^T + DELTA * sum_j w_ij^2 H_jj is output i's mean square, floored
(`output_energy`): the calibrated scores (scoring/) divide by it to compare outputs and layers of
any scale (a BatchNorm folded or not gives the same decision). The floor (DELTA) keeps an output
that the data never excites from dividing by zero, and scales like r_i.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Relative floor of an output's energy in the score's denominator (see the module docstring).
DELTA = 0.01
# SparseGPT's column block: masks are chosen, and updates applied lazily, this many at a time.
BLOCK = 128


# Triangular blocks at most this wide are inverted directly; wider ones by halves (matmuls).
_TRIANGLE = 128


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by recursive halving: K^3/3 flops, all in matmuls
    (numpy has no triangular solver; a general solve costs five times more)."""
    n = lower.shape[0]
    if n <= _TRIANGLE:
        return np.tril(np.linalg.inv(lower))
    k = n // 2
    top = _lower_inverse(lower[:k, :k])
    bottom = _lower_inverse(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k] = top
    out[k:, k:] = bottom
    out[k:, :k] = -(bottom @ (lower[k:, :k] @ top))
    return out


def inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """U, upper triangular, with (H + damp * diag(H))^-1 = U^T U: all that scores (the diagonal
    of the inverse is the column sums of U^2) and SparseGPT need, without forming the inverse.

    With J the reversal of the indices, chol(J H J) = L gives U = J L^-1 J: one Cholesky and one
    triangular inverse. Damping each column by its own diagonal (floored at 1e-12 of the
    mean, for inputs the data never excites) keeps everything equivariant to rescaling the
    inputs: H -> C H C gives U -> U C^-1, so scores and updates do not depend on how the previous
    layer is scaled. The damping grows tenfold until the sum is positive definite; where even that
    fails (float32 sums of near-constant or near-collinear inputs can leave H slightly indefinite),
    a multiple of the identity joins it, growing tenfold from a millionth of the mean diagonal.
    """
    diagonal = np.diag(h).copy()
    mean = float(np.mean(diagonal)) if diagonal.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        mean = 1.0
    diagonal = np.maximum(diagonal, 1e-12 * mean)
    reversed_h = h[::-1, ::-1]
    scaled = damp * diagonal[::-1]
    for attempt in range(16):
        # scale-free first (tenfold per-column damping, 8 times), the identity only after
        extra = 1e-6 * 10 ** (attempt - 8) * mean if attempt >= 8 else 0.0
        damped = reversed_h + np.diag(scaled * 10 ** min(attempt, 7) + extra)
        try:
            lower = np.linalg.cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])
    raise np.linalg.LinAlgError("the layer's Hessian stays singular after damping")


def damped_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """(H + damp * diag(H))^-1, from its factor (for references and tests)."""
    upper = inverse_factor(h, damp)
    return upper.T @ upper


def output_energy(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """r_i of the module docstring, for one group: w [O, K], h [K, K]."""
    square = np.einsum("ok,ok->o", w @ h, w)
    diagonal = np.square(w) @ np.diag(h)
    return np.maximum(square, 0.0) + DELTA * diagonal


def block_counts(mask: np.ndarray, block: int = BLOCK) -> list[int]:
    """How many weights of each column block a mask [O, K] prunes."""
    return [int(mask[:, i : i + block].sum()) for i in range(0, mask.shape[1], block)]


def sparsegpt(
    w: np.ndarray,
    h: np.ndarray,
    *,
    counts: list[int] | None = None,
    pattern: tuple[int, int] | None = None,
    damp: float = 0.01,
    block: int = BLOCK,
    factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One group: prune w [O, K] and update the kept weights from H's inverse (SparseGPT).

    Columns are processed left to right in blocks; each block first chooses which of its weights
    go (the `counts[b]` lowest w^2 / U_jj^2 over the whole block, U the upper Cholesky factor of
    H^-1, as published: the layer's own output error decides; or, with an
    N:M pattern, the M-N lowest of every M columns in each row, chosen when the sweep reaches them),
    then each pruned weight's error is spread over the columns to its right (the OBS update), and
    the block's accumulated error is applied to the rest at once (lazy batch updates).
    Returns the new weights (pruned ones exactly zero) and the mask of the pruned ones.
    """
    k = w.shape[1]
    if pattern is not None:
        m = pattern[1]
        block = max(m, block - block % m)
    upper = inverse_factor(h, damp) if factor is None else factor
    w = np.array(w, dtype=np.float64, copy=True)
    pruned = np.zeros(w.shape, dtype=bool)
    for number, i1 in enumerate(range(0, k, block)):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        u1 = upper[i1:i2, i1:i2]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        mask = np.zeros(w1.shape, dtype=bool)
        if pattern is None:
            assert counts is not None
            chosen = int(counts[number])
            if chosen:
                saliency = np.square(w1) / np.square(d)[None, :]
                order = np.argsort(saliency.reshape(-1), kind="stable")[:chosen]
                mask.reshape(-1)[order] = True
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                part = np.square(w1[:, i : i + m]) / np.square(d[i : i + m])[None, :]
                lowest = np.argsort(part, axis=1, kind="stable")[:, : m - n]
                np.put_along_axis(mask[:, i : i + m], lowest, True, axis=1)
            column = w1[:, i]
            kept = np.where(mask[:, i], 0.0, column)
            e = (column - kept) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = kept
            err[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask
        if i2 < k:
            w[:, i2:] -= err @ upper[i1:i2, i2:]
    return w, pruned


def refit(
    w: np.ndarray,
    h: np.ndarray,
    cross: np.ndarray,
    inverse: Callable[[int], np.ndarray],
) -> np.ndarray:
    """The dense target seen from pruned inputs: argmin_W' E||W x_dense - W' x||^2, regularised
    towards W (ridge, with the damping of `inverse`): W + W (E[x_dense x^T] - E[x x^T]) (H + D)^-1.

    Sequential calibration feeds each layer what the already-pruned layers before it produce; this
    re-solves the layer for that input before it is pruned, so errors upstream are compensated.
    Where nothing upstream changed (cross == h), W comes back exactly.
    h = E[x x^T], cross = E[x x_dense^T]; `inverse(g)` the factor U of (h + D)^-1.
    """
    out = np.array(w, copy=True)
    for g in range(w.shape[0]):
        gap = cross[g].T - h[g]
        if not gap.any():
            continue
        upper = inverse(g)
        out[g] += ((w[g] @ gap) @ upper.T) @ upper
    return out


def bias_shift(
    w: np.ndarray, new: np.ndarray, mean: np.ndarray, dense_mean: np.ndarray | None = None
) -> np.ndarray:
    """What the bias must gain so the layer's mean output stays the dense one: [G * O].

    One-pass: (W - W') E[x]. Sequential: W E[x_dense] - W' E[x].
    """
    target = mean if dense_mean is None else dense_mean
    shift = np.einsum("gok,gk->go", w, target) - np.einsum("gok,gk->go", new, mean)
    return shift.reshape(-1)


def output_error(
    w: np.ndarray,
    new: np.ndarray,
    hessian: np.ndarray,
    mean: np.ndarray,
    *,
    cross: np.ndarray | None = None,
    dense_hessian: np.ndarray | None = None,
    dense_mean: np.ndarray | None = None,
    corrected: bool = False,
) -> float:
    """||W x_dense - W' x (- bias shift)|| / ||W x_dense|| over the calibration rows.

    Unpaired statistics mean x = x_dense. `corrected`: the bias shift is applied, so only the
    error's fluctuation around its mean remains.
    """
    hd = hessian if dense_hessian is None else dense_hessian
    c = hessian if cross is None else cross  # E[x x_dense^T]
    md = mean if dense_mean is None else dense_mean

    def form(a: np.ndarray, m: np.ndarray, b: np.ndarray) -> float:
        """sum over groups of tr(a m b^T), with matmuls (einsum's path here is far slower)."""
        return float(np.sum(np.matmul(a, m) * b))

    dense = form(w, hd, w)
    if cross is None and dense_hessian is None:  # one input for both: (W - W') H (W - W')^T
        gap = w - new
        error = form(gap, hessian, gap)
    else:
        error = dense - 2 * form(new, c, w) + form(new, hessian, new)
    if corrected:
        shift = np.einsum("gok,gk->go", w, md) - np.einsum("gok,gk->go", new, mean)
        error -= float(np.square(shift).sum())
    if dense <= 0:
        return 0.0
    return float(np.sqrt(max(error, 0.0) / dense))


# -- channels (structured pruning) ---------------------------------------------------------------
# A removed input channel takes every column of the layer's design that reads it (a Conv's k*k
# kernel positions, a Flatten's block of rows). With a free bias, what matters is how the inputs
# vary, so the statistics here are covariances: C = E[x x^T] - E[x] E[x]^T.


def covariance(h: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """E[x x^T] - E[x] E[x]^T for one group (symmetric as h is: both terms are). An input that is
    nearly constant loses its variance to the cancellation (float32 sums): floored at zero."""
    c = h - np.outer(mean, mean)
    diagonal = np.einsum("ii->i", c)  # a view: clamped in place
    np.maximum(diagonal, 0.0, out=diagonal)
    return c


def channel_errors(
    w: np.ndarray,
    cov: np.ndarray,
    columns: np.ndarray,
    classes: np.ndarray,
    damp: float,
    obs: bool = True,
    row_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The output error of removing each class alone, the mean moved into the bias. obs: the
    other inputs re-solved, tr(W_J [(C + D)^-1]_JJ^-1 W_J^T) with J the class's columns (group
    OBS); otherwise nothing re-solved, tr(W_J C_JJ W_J^T) (FLAP's fluctuation).
    Returns (error per entry of `classes`, the layer's output fluctuation tr(W C W^T)).
    `row_weights` [O] weigh each output's error (the trace is their sum with weights 1).

    w [O, K]; cov [K, K]; columns [K] the class of each column. Scale-free: a class's inputs
    scaled by s and its weights by 1/s leave its error unchanged, as the damping is per column.
    """
    if row_weights is None:
        row_weights = np.ones(w.shape[0])
    # only the diagonal blocks of the inverse are needed: [U^T U]_JJ = U_J^T U_J, K^2 m flops
    # per width m where the whole inverse would take K^3
    upper = inverse_factor(cov, damp) if obs else None
    energy = float(np.sum((w @ cov) * w))
    errors = np.zeros(len(classes), dtype=np.float64)
    order = np.argsort(columns, kind="stable")
    sorted_cols = columns[order]
    starts = np.searchsorted(sorted_cols, classes, side="left")
    ends = np.searchsorted(sorted_cols, classes, side="right")
    widths = ends - starts
    for width in np.unique(widths):
        if width == 0:
            continue
        which = np.flatnonzero(widths == width)
        idx = order[starts[which, None] + np.arange(width)]  # [n, m] columns of each class
        wj = np.moveaxis(w[:, idx], 0, -1)  # [n, m, O]
        if upper is None:
            solved = np.matmul(cov[idx[:, :, None], idx[:, None, :]], wj)
        else:
            columns_of = upper[:, idx]  # [K, n, m]
            blocks = np.einsum("kni,knj->nij", columns_of, columns_of)
            solved = np.linalg.solve(blocks, wj)
        errors[which] = np.einsum("nmo,nmo,o->n", wj, solved, row_weights)
    return np.maximum(errors, 0.0), energy


def resolve_inputs(
    w: np.ndarray,
    keep: np.ndarray,
    cov: np.ndarray,
    cross: np.ndarray,
    damp: float,
) -> np.ndarray:
    """The kept input weights re-solved so the output stays the dense one (least squares, ridge
    towards the kept weights): W_K + (W X - W_K C) (C + D)^-1.

    w [O, K_dense] the dense weights (kept outputs); keep [K_dense] bool, the kept columns;
    cov [K, K] the covariance of the inputs the layer now sees (K = keep.sum());
    cross [K_dense, K] their covariance with the dense inputs (X above). One-pass statistics
    have cross = C_dense[:, keep] and cov = C_dense[keep][:, keep]: then the update is
    W_R C_RK (C_KK + D)^-1, the removed columns' part that the kept ones can carry.
    """
    kept = w[:, keep]
    gap = w @ cross - kept @ cov
    if not gap.any():
        return np.array(kept, copy=True)
    upper = inverse_factor(cov, damp)
    return kept + (gap @ upper.T) @ upper


def fluctuation_error(
    w: np.ndarray, new: np.ndarray, dense_cov: np.ndarray, cov: np.ndarray, cross: np.ndarray
) -> float:
    """sqrt(E||W (x_d - E x_d) - W' (x - E x)||^2 / E||W (x_d - E x_d)||^2): the relative output
    error left once the bias has taken the mean shift. cross [K_dense, K] as in resolve_inputs."""
    dense = float(np.sum((w @ dense_cov) * w))
    if dense <= 0:
        return 0.0
    error = dense - 2 * float(np.sum((w @ cross) * new)) + float(np.sum((new @ cov) * new))
    return float(np.sqrt(max(error, 0.0) / dense))
