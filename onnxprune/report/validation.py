"""The validation table: both models' numbers side by side, then the per-output errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onnxprune.report.tables import format_table, human_bytes, human_count, pct, shorten
from onnxprune.validate import Validation
from onnxprune.validate.metrics import Latency, ModelCost


def _ms(latency: Latency | None, p90: bool = False) -> str:
    if latency is None:
        return "-"
    return f"{latency.p90_ms if p90 else latency.median_ms:.3f} ms"


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"x{after / before:.3f}"


def _count(n: int | None) -> str:
    return "-" if n is None else human_count(n)


def mac_figure(n: int | None, unknown: Sequence[str] = ()) -> str:
    """A MAC figure as it may be read: the count, a lower bound that says how many nodes it
    leaves out ("≥ 7.7G (12 nodes unknown)"), or "unknown"; never a partial sum as a total."""
    if n is None or n < 0:
        return "unknown"
    if unknown:
        nodes = "node" if len(unknown) == 1 else "nodes"
        return f"≥ {human_count(n)} ({len(unknown)} {nodes} unknown)"
    return human_count(n)


def macs_text(cost: ModelCost | None, nonzero: bool = False) -> str:
    """A model's dense (or non-zero) MACs as `mac_figure` writes them."""
    if cost is None:
        return "-"
    return mac_figure(cost.nonzero_macs if nonzero else cost.macs, cost.macs_unknown)


def macs_ratio(before: ModelCost | None, after: ModelCost | None, nonzero: bool = False) -> str:
    """after / before, only where both are whole counts."""
    if before is None or after is None or not (before.macs_complete and after.macs_complete):
        return ""
    key = "nonzero_macs" if nonzero else "macs"
    return _ratio(getattr(before, key), getattr(after, key))


def macs_note(cost: ModelCost) -> str | None:
    """A line on the nodes a MAC figure leaves out, and why (the first of them)."""
    if cost.macs_complete:
        return None
    first = cost.macs_unknown[0]
    why = cost.macs_unknown_why.get(first)
    nodes = "node is" if len(cost.macs_unknown) == 1 else "nodes are"
    return (
        f"MACs of {len(cost.macs_unknown)} {nodes} not known (e.g. {first!r}"
        + (f": {why}" if why else "")
        + "): the figure counts the rest, a lower bound"
    )


RELATIVE_ERR = "relative err = ||candidate - reference|| / ||reference|| over each whole output"


def points(change: float) -> str:
    """An accuracy change in percentage points, never '-0.00 pts'."""
    value = round(100 * change, 2)
    return f"{value + 0.0:+.2f} pts"


def _perplexity(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


GENERATED_CAVEAT = (
    "generated inputs measure output drift only, not task accuracy: --data val.npz (with "
    "'labels') does"
)


def format_validation(result: Validation) -> str:
    """The terminal table: each model's numbers side by side, then the per-output errors."""
    ref, cand = result.reference, result.candidate
    drop = result.accuracy_drop
    rows = [
        ["model", shorten(Path(ref.path).name, 40), shorten(Path(cand.path).name, 40), ""],
        ["provider", ref.providers[0], cand.providers[0], ""],
        [
            "top-1 accuracy",
            pct(ref.accuracy),
            pct(cand.accuracy),
            "" if drop is None else points(-drop),
        ],
        ["top-1 agreement", "", pct(result.agreement), ""],
        *(
            [
                [
                    "perplexity",
                    _perplexity(ref.perplexity),
                    _perplexity(cand.perplexity),
                    _ratio(ref.perplexity, cand.perplexity),
                ]
            ]
            if ref.tokens is not None
            else []
        ),
        [
            "latency median",
            _ms(ref.latency),
            _ms(cand.latency),
            _ratio(ref.latency and ref.latency.median_ms, cand.latency and cand.latency.median_ms),
        ],
        ["latency p90", _ms(ref.latency, True), _ms(cand.latency, True), ""],
        [
            "file size",
            human_bytes(ref.cost.file_bytes),
            human_bytes(cand.cost.file_bytes),
            _ratio(ref.cost.file_bytes, cand.cost.file_bytes),
        ],
        [
            "gzip size",
            human_bytes(ref.cost.gzip_bytes),
            human_bytes(cand.cost.gzip_bytes),
            _ratio(ref.cost.gzip_bytes, cand.cost.gzip_bytes),
        ],
        ["parameters", _count(ref.cost.params), _count(cand.cost.params), ""],
        [
            "non-zero params",
            _count(ref.cost.nonzero_params),
            _count(cand.cost.nonzero_params),
            _ratio(ref.cost.nonzero_params, cand.cost.nonzero_params),
        ],
        [
            "MACs (dense)",
            macs_text(ref.cost),
            macs_text(cand.cost),
            macs_ratio(ref.cost, cand.cost),
        ],
        [
            "MACs (non-zero)",
            macs_text(ref.cost, nonzero=True),
            macs_text(cand.cost, nonzero=True),
            macs_ratio(ref.cost, cand.cost, nonzero=True),
        ],
    ]
    lines = [format_table(["", "reference", "candidate", "change"], rows)]
    lines.append(
        format_table(
            ["output", "max abs err", "mean abs err", "relative err", "cosine"],
            [
                [
                    o.name,
                    f"{o.max_abs:.4g}",
                    f"{o.mean_abs:.4g}",
                    "-" if o.rel_l2 is None else f"{o.rel_l2:.4g}",
                    f"{o.cosine:.6f}",
                ]
                for o in result.outputs
            ],
        )
    )
    batch = ref.latency.batch_size if ref.latency else result.batch_size
    lines.append(
        f"{result.samples} samples from {result.inputs}, batch {result.batch_size}; "
        f"latency per batch of {batch} on {result.provider}; MACs per inference at "
        + ", ".join(
            f"{k}={ref.cost.macs_values.get(k, 'x'.join(map(str, v)) or 'scalar')}"
            for k, v in ref.cost.macs_at.items()
        )
    )
    for label, cost in (("reference", ref.cost), ("candidate", cand.cost)):
        note = macs_note(cost) if cost is not None else None
        if note:
            lines.append(f"{label}: {note}")
    lines.append(RELATIVE_ERR)
    if ref.tokens is not None:
        lines.append(
            f"perplexity: exp(mean next-token loss) over {ref.tokens:,} predicted tokens of "
            "input_ids (padding left out); lower is better"
        )
    for label, model in (("reference", ref), ("candidate", cand)):
        if model.placement is not None:
            where = model.placement.primary_name
            lines.append(f"{label} on {where}: {model.placement.summary()}")
    if result.agreement is None and result.agreement_note:
        lines.append(f"top-1 agreement: {result.agreement_note.removeprefix('no top-1: ')}")
    if result.generated:
        lines.append(GENERATED_CAVEAT)
    return "\n".join(lines)
