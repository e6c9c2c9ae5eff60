"""Preflight: the data, batch size and gate values checked before any model is pruned or run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from onnxprune import inputs as _inputs
from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.options import check_metric
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
    max_perplexity_ratio: float | None = None,
    metric: str = "top1",
) -> None:
    """Everything about the samples and the gates that can be checked before any work.

    The commands call it first, so that bad data stops them before a model is pruned or written:
    --batch-size and the gate values; the --calibration and --data files against `model`'s
    inputs (read from the file, weights unread; each batched on its batch axis, `batch_axes`
    overriding), labels against its classes; generated inputs' shapes; and whether the gates
    asked for can be measured at all (labels, a [batch, classes] output). What only a run can
    tell (an output width the file leaves open) is checked at the first batch. `data` and
    `calibration` may be an .npz or a folder of .npz shards.
    """
    _inputs.check_batch_size(batch_size)
    check_metric(metric)
    check_gate_values(
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
        max_perplexity_ratio=max_perplexity_ratio,
    )
    if max_perplexity_ratio is not None and metric != "perplexity":
        raise InvalidArgumentError("--max-perplexity-ratio needs --metric perplexity")
    signature = _inputs.model_signature(model, batch_axes) if Path(model).is_file() else None
    if signature is not None and input_shapes:
        _inputs.check_shape_names(input_shapes, [s.name for s in signature.specs])
    if calibration is None and not validating:
        return
    if calibration is not None:
        _inputs.check_samples(calibration, signature, option="--calibration", batch_size=batch_size)
    if not validating:
        return
    if metric == "perplexity":
        _check_perplexity(signature, data)
        if signature is not None:  # a KV-cache decoder's first step needs no positions, pasts
            derived = _inputs.first_step_inputs(signature.specs, _inputs.sample_keys(data))
            specs = [s for s in signature.specs if s not in derived]
            signature = dataclasses.replace(signature, specs=specs)
    labels = False
    if data is not None:
        labels = _inputs.check_samples(data, signature, option="--data", batch_size=batch_size)
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


def _check_perplexity(signature: _inputs.Signature | None, data: object) -> None:
    """Perplexity needs real token ids (generated ones would score noise) from an input_ids."""
    if data is None:
        raise DataError(
            "--metric perplexity needs token ids: give --data with an 'input_ids' array (and "
            "'attention_mask' where rows are padded)"
        )
    names = [] if signature is None else [s.name for s in signature.specs]
    if signature is not None and metrics.TOKENS not in names:
        raise DataError(
            f"--metric perplexity reads token ids from an input named {metrics.TOKENS!r}; the "
            f"model's inputs are {', '.join(names)}"
        )
