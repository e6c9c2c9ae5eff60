"""The sensitivity table: each layer pruned alone, in graph order, the most sensitive marked."""

from __future__ import annotations

import math

from onnxprune.report.tables import format_table, human_count, pct, shorten
from onnxprune.report.validation import GENERATED_CAVEAT
from onnxprune.report.weights import NAME_WIDTH, skipped_lines
from onnxprune.validate.sensitivity import Sensitivity


def _number(x: float | None) -> str:
    return "-" if x is None else "nan" if math.isnan(x) else f"{x:.4f}"


def format_sensitivity(result: Sensitivity) -> str:
    """One row per prunable layer: its size, then at each sparsity the smallest output cosine
    and the largest relative output error (and top-1 agreement where the model has classes)
    with that layer alone pruned; the most sensitive layers ranked in the last column."""
    top1 = result.agreement_note is None
    headers = ["layer", "op", "params"]
    for s in result.sparsities:
        headers += [f"cos@{s:g}", f"err@{s:g}"] + ([f"top-1@{s:g}"] if top1 else [])
    headers.append("most sensitive")
    ranks = {name: i + 1 for i, name in enumerate(result.most_sensitive())}
    rows = []
    for layer in result.layers:
        row = [shorten(layer.name, NAME_WIDTH), layer.op, human_count(layer.params)]
        for point in layer.points:
            row += [_number(point.min_cosine), _number(point.rel_error)]
            row += [pct(point.agreement)] if top1 else []
        row.append(f"#{ranks[layer.name]}" if layer.name in ranks else "")
        rows.append(row)
    lines = [format_table(headers, rows, left=2)]
    provider = result.reference.providers[0] if result.reference.providers else "?"
    lines.append(
        f"{result.samples} samples from {result.inputs} on {provider}; each layer pruned alone by "
        "magnitude: cos, the smallest output cosine; err, the largest relative L2 error "
        "||pruned - dense|| / ||dense|| of an output"
    )
    if ranks:
        lines.append(
            f"most sensitive (err at {max(result.sparsities):g}): {', '.join(ranks)}; "
            "prune --sensitivity FILE.json keeps more of the layers over its tolerance"
        )
    if result.agreement_note:
        lines.append(f"top-1: {result.agreement_note.removeprefix('no top-1: ')}")
    if result.generated:
        lines.append(GENERATED_CAVEAT)
    lines += skipped_lines(result.skipped)
    return "\n".join(lines)
