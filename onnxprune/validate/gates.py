"""Gates: a validation's numbers turned into pass or fail (exit 1), for CI."""

from __future__ import annotations

import math

from onnxprune.errors import DataError, ValidationFailed
from onnxprune.options import check_gate_values
from onnxprune.validate.measure import Validation
from onnxprune.validate.metrics import MIN_CLASSES

NEEDS_LABELS = "--max-accuracy-drop needs labels: add a 'labels' array to --data"
NEEDS_CLASSES = f"needs a first output shaped [batch, classes] with at least {MIN_CLASSES} classes"


def check_gates(
    result: Validation,
    *,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    max_perplexity_ratio: float | None = None,
) -> None:
    """Raise `ValidationFailed` with one line naming every gate that failed.

    A measured value that is not a number (NaN outputs) fails every gate it meets.
    """
    check_gate_values(
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
        max_perplexity_ratio=max_perplexity_ratio,
    )
    failures = []
    if max_perplexity_ratio is not None:
        ratio = result.perplexity_ratio
        if ratio is None:
            raise DataError("--max-perplexity-ratio needs --metric perplexity and token ids")
        if not ratio <= max_perplexity_ratio:
            failures.append(
                f"perplexity rose x{ratio:.4f} ({result.reference.perplexity:.4f} -> "
                f"{result.candidate.perplexity:.4f}), more than --max-perplexity-ratio "
                f"{max_perplexity_ratio:g}"
            )
    if max_accuracy_drop is not None:
        drop = result.accuracy_drop
        if drop is None and not result.labels:
            raise DataError(NEEDS_LABELS)
        if drop is None:
            raise DataError(f"--max-accuracy-drop {NEEDS_CLASSES}")
        if not drop <= max_accuracy_drop:
            failures.append(
                f"accuracy dropped by {drop:.4f} ({result.reference.accuracy:.4f} -> "
                f"{result.candidate.accuracy:.4f}), more than --max-accuracy-drop "
                f"{max_accuracy_drop:g}"
            )
    if min_agreement is not None:
        if result.agreement is None:
            raise DataError(f"--min-agreement {NEEDS_CLASSES}")
        if not result.agreement >= min_agreement:
            failures.append(
                f"top-1 agreement {result.agreement:.4f} is below --min-agreement {min_agreement:g}"
            )
    below = (
        [o for o in result.outputs if not o.cosine >= min_cosine] if min_cosine is not None else []
    )
    if below:
        # NaN first: min() of a list holding NaN depends on the order
        worst = next((o for o in below if math.isnan(o.cosine)), min(below, key=lambda o: o.cosine))
        failures.append(
            f"cosine similarity of output {worst.name!r} is {worst.cosine:.6f}, below "
            f"--min-cosine {min_cosine:g}"
        )
    if failures:
        raise ValidationFailed("validation failed: " + "; ".join(failures))
