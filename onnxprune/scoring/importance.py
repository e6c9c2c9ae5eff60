"""Importance criteria: one class each, registered in one place, chosen by name.

An `Importance` turns a layer's weights and its calibration statistics into scores (the higher,
the more the weight matters), and the channel criteria into the output error removing one
channel class costs. Selection then ranks the scores exactly as it ranks magnitudes. Built in:

    magnitude  |w| (no statistics: the weights' own magnitudes are ranked)
    wanda      |w_ij| ||x_j||, compared within each output row (Sun et al. 2023, "Wanda")
    sparsegpt  w_ij^2 / [H^-1]_jj, each output's share (the OBS error of removing it, updates
               allowed; Frantar & Alistarh 2023), and repair re-solves what is kept

A score compared across outputs and layers is divided by r_i, the energy of the weight's output i
(floored, see `solvers.output_energy`), so scaling an output by c > 0 (BatchNorm folded or not)
changes no decision; one compared within its row needs no such division. A criterion of your
own: subclass `Importance`, give it a `name`, decorate it with `@register`, and pass
`Calibration(criterion=name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from onnxprune.calibration import solvers
from onnxprune.errors import InvalidArgumentError

REGISTRY: dict[str, type[Importance]] = {}


class Importance:
    """How one criterion scores weights (and channels) from a layer's statistics.

    `calibrated`: needs calibration statistics (magnitude does not); `updates`: repair re-solves
    the kept weights with SparseGPT's OBS updates (choosing the final mask inside each column
    block, with the plan's counts); `conditional`: channel scores depend on which channels are
    already removed, so channel selection re-scores in steps (`selection_steps`); `per_row`:
    scores compare only within one output row, each row pruned alike (as Wanda is published).
    """

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = True
    updates: ClassVar[bool] = False
    conditional: ClassVar[bool] = False
    per_row: ClassVar[bool] = False

    def weight_scores(
        self, w: np.ndarray, h: np.ndarray, inverse: Callable[[int], np.ndarray]
    ) -> np.ndarray:
        """Scores [G, O, K] of a layer's weights w [G, O, K] before the output normalisation,
        from its Hessian h = E[x x^T] [G, K, K]; `inverse(g)` gives group g's factor U of the
        damped inverse (U^T U = (H + D)^-1)."""
        raise NotImplementedError

    def channel_errors(
        self,
        w: np.ndarray,
        cov: np.ndarray,
        columns: np.ndarray,
        classes: np.ndarray,
        damp: float,
        row_weights: np.ndarray,
    ) -> np.ndarray:
        """The output error of removing each class of `classes` alone from one consumer (w [O, K]
        in its design, cov its input covariance, columns the class of each column)."""
        errors, _ = solvers.channel_errors(w, cov, columns, classes, damp, False, row_weights)
        return errors

    def pattern_scores(self) -> bool:
        """Whether N:M masks follow this criterion's scores (else magnitude's, and repair picks
        the pattern itself when `updates`)."""
        return self.calibrated and not self.updates


def register(cls: type[Importance]) -> type[Importance]:
    """Class decorator: make a criterion available by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str | Importance) -> Importance:
    """The criterion registered under `name` (an instance passes through)."""
    if isinstance(name, Importance):
        return name
    cls = REGISTRY.get(name)
    if cls is None:
        raise InvalidArgumentError(f"--criterion {name!r}: choose one of {', '.join(REGISTRY)}")
    return cls()


def names() -> tuple[str, ...]:
    """Every registered criterion's name, in registration order."""
    return tuple(REGISTRY)


@register
class Magnitude(Importance):
    """|w|: the stored weights are ranked as they are; with calibration, only bias correction
    uses the samples."""

    name = "magnitude"
    calibrated = False


@register
class Wanda(Importance):
    """|w_ij| ||x_j||, squared: a weight's share of its output on the samples; no update. As
    channels: FLAP's fluctuation, tr(W_J C_JJ W_J^T), nothing re-solved."""

    name = "wanda"
    per_row = True

    def weight_scores(
        self, w: np.ndarray, h: np.ndarray, inverse: Callable[[int], np.ndarray]
    ) -> np.ndarray:
        return np.square(w) * np.einsum("gkk->gk", h)[:, None, :]


@register
class SparseGPT(Importance):
    """w_ij^2 / [H^-1]_jj: the OBS error of removing one weight while the rest re-solve; repair
    then re-solves them. As channels: group OBS, tr(W_J [(C + D)^-1]_JJ^-1 W_J^T)."""

    name = "sparsegpt"
    updates = True
    conditional = True

    def weight_scores(
        self, w: np.ndarray, h: np.ndarray, inverse: Callable[[int], np.ndarray]
    ) -> np.ndarray:
        out = np.empty(w.shape, dtype=np.float64)
        for g in range(w.shape[0]):
            upper = inverse(g)
            out[g] = np.square(w[g]) / np.einsum("ij,ij->j", upper, upper)
        return out

    def channel_errors(
        self,
        w: np.ndarray,
        cov: np.ndarray,
        columns: np.ndarray,
        classes: np.ndarray,
        damp: float,
        row_weights: np.ndarray,
    ) -> np.ndarray:
        errors, _ = solvers.channel_errors(w, cov, columns, classes, damp, True, row_weights)
        return errors
