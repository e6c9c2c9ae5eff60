"""The sweep's table (terminal and Markdown) and its plot."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from onnxprune.errors import InvalidArgumentError
from onnxprune.report.tables import format_table, human_bytes, pct
from onnxprune.report.validation import GENERATED_CAVEAT, mac_figure, macs_text
from onnxprune.storage import writer
from onnxprune.sweep import Sweep, SweepRow


def _macs(row: SweepRow, nonzero: bool = False) -> str:
    """A row's MACs as validation prints them (a lower bound says so; never a partial total)."""
    return mac_figure(row.nonzero_macs if nonzero else row.macs, row.macs_unknown)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def format_sweep(result: Sweep) -> str:
    """One row per pruned model, the dense reference first.

    Unstructured rows show what zeros buy (gzip size, non-zero MACs); structured rows what
    removed channels buy (file size, MACs, latency).
    """
    ref = result.reference
    headers = ["method", "sparsity", "achieved", "accuracy", "agreement", "min cosine"]
    if result.structured:
        headers += ["file size", "MACs", "latency"]
        dense = [
            human_bytes(ref.cost.file_bytes),
            macs_text(ref.cost),
            _ms(ref.latency.median_ms if ref.latency else None),
        ]
    else:
        headers += ["gzip size", "MACs (non-zero)"]
        dense = [human_bytes(ref.cost.gzip_bytes), macs_text(ref.cost, nonzero=True)]
    rows = [["dense", "0", "-", pct(ref.accuracy), "-", "-", *dense]]
    for row in result.rows:
        if row.error:
            rows.append([row.method, f"{row.sparsity:g}", "infeasible", *[""] * 5])
            continue
        if result.structured:
            costs = [human_bytes(row.file_bytes), _macs(row), _ms(row.latency_ms)]
        else:
            costs = [human_bytes(row.gzip_bytes), _macs(row, nonzero=True)]
        rows.append(
            [
                row.method,
                f"{row.sparsity:g}",
                f"{row.achieved:.4f}",
                pct(row.accuracy),
                pct(row.agreement),
                "-" if row.min_cosine is None else f"{row.min_cosine:.4f}",
                *costs,
            ]
        )
    lines = [format_table(headers, rows)]
    lines.append(
        f"{result.samples} samples from {result.inputs} on {ref.providers[0]}; {_meaning(result)}"
    )
    if result.agreement_note:
        lines.append(f"agreement: {result.agreement_note.removeprefix('no top-1: ')}")
    if result.generated:
        lines.append(GENERATED_CAVEAT)
    for row in result.rows:
        if row.collapsed:
            lines.append(
                f"{row.method} at {row.sparsity:g}: {row.collapsed} layer(s) kept under 1% of "
                "their weights (layer collapse)"
            )
        if row.error:
            lines.append(f"{row.method} at {row.sparsity:g}: {row.error}")
    return "\n".join(lines)


def _meaning(result: Sweep) -> str:
    """What the sparsity column counts."""
    if result.structured:
        what = "parameters" if result.target == "params" else "multiply-accumulates"
        return f"sparsity counts the {what} of prunable layers removed with their channels"
    return "sparsity counts prunable weights (Conv, Gemm, MatMul) set to zero"


def format_markdown(result: Sweep) -> str:
    """The accuracy table as Markdown: sparsity down, method across."""
    metric = "accuracy" if result.labels else "agreement"
    methods = result.methods
    lines = [
        "| sparsity | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    sparsities = list(dict.fromkeys(row.sparsity for row in result.rows))
    cell = {(row.method, row.sparsity): row for row in result.rows}
    dense = result.reference.accuracy if result.labels else 1.0
    lines.append("| 0 (dense) | " + " | ".join(pct(dense) for _ in methods) + " |")
    for s in sparsities:
        values = []
        for m in methods:
            row = cell.get((m, s))
            if row is None or row.error:
                values.append("infeasible")
            else:
                values.append(pct(getattr(row, metric)))
        lines.append(f"| {s:g} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def check_plotting() -> None:
    """Fail before a long sweep, not after it, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        raise InvalidArgumentError(
            "--plot needs matplotlib: pip install 'onnxprune[plot]' (or pip install matplotlib)"
        ) from None


def plot_sweep(result: Sweep, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Accuracy (or agreement without labels) against sparsity, one line per method."""
    return writer.write_file(path, drawing(result), force=force)


def drawing(result: Sweep) -> Callable[[Path], None]:
    """What `plot_sweep` draws, as a writer's `produce(temporary_path)` (a PNG)."""
    check_plotting()
    import matplotlib.pyplot as plt

    metric = "accuracy" if result.labels else "agreement"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # distinct markers and dashes: lines that coincide (min-keep not binding) stay visible
    styles = [("o", "-", 7), ("s", "--", 5), ("^", ":", 6), ("D", "-.", 5)]
    for i, method in enumerate(result.methods):
        marker, dashes, size = styles[i % len(styles)]
        points = [
            (row.sparsity, 100 * getattr(row, metric))
            for row in result.rows
            if row.method == method and not row.error and getattr(row, metric) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle=dashes, markersize=size, label=method)
    if result.labels and result.reference.accuracy is not None:
        ax.axhline(100 * result.reference.accuracy, color="gray", linestyle="--", label="dense")
    ax.set_xlabel(f"sparsity: {_meaning(result).removeprefix('sparsity counts ')}")
    ax.set_ylabel(f"top-1 {metric} (%)")
    ax.set_title(f"{Path(result.reference.path).name}: {metric} against sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def produce(tmp: Path) -> None:
        try:
            fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)

    return produce
