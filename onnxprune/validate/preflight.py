"""Preflight: the data, batch size and gate values checked before any model is pruned or run."""

from __future__ import annotations

import os
from pathlib import Path

from onnxprune import inputs as _inputs
from onnxprune.errors import DataError
from onnxprune.validate import metrics
from onnxprune.validate.gates import NEEDS_CLASSES, NEEDS_LABELS, check_gate_values


def preflight(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    validating: bool = True,
    batch_size: int | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch_axes: dict[str, int] | None = None,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
) -> None:
    """Everything about the samples and the gates that can be checked before any work.

    The commands call it first, so that bad data stops them before a model is pruned or written:
    --batch-size and the gate values; the --calibration and --data files against `model`'s
    inputs (read from the file, weights unread; each batched on its batch axis, `batch_axes`
    overriding), labels against its classes; generated inputs' shapes; and whether the gates
    asked for can be measured at all (labels, a [batch, classes] output). What only a run can
    tell (an output width the file leaves open) is checked at the first batch.
    """
    _inputs.check_batch_size(batch_size)
    check_gate_values(
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine
    )
    if calibration is None and not validating:
        return
    signature = _inputs.model_signature(model, batch_axes) if Path(model).is_file() else None
    if calibration is not None:
        _inputs.check_data_file(
            calibration, signature, option="--calibration", batch_size=batch_size
        )
    if not validating:
        return
    labels = False
    if data is not None:
        labels = _inputs.check_data_file(data, signature, option="--data", batch_size=batch_size)
    elif signature is not None:
        _inputs.generated_shapes(signature.specs, input_shapes, batch_size=batch_size)
    if max_accuracy_drop is not None and not labels:
        raise DataError(NEEDS_LABELS)
    rank = signature.output_rank if signature is not None else None
    classes = signature.classes if signature is not None else None
    for gate, value in (
        ("--max-accuracy-drop", max_accuracy_drop),
        ("--min-agreement", min_agreement),
    ):
        few = classes is not None and classes < metrics.MIN_CLASSES
        if value is not None and ((rank is not None and rank != 2) or few):
            raise DataError(f"{gate} {NEEDS_CLASSES}")
