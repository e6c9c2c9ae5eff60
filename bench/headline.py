"""The demo's last line: what the two pruned models of `make demo` are against the dense one,
read from their reports (accuracy, size, MACs, latency as ONNX Runtime measured them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(path: Path) -> str:
    report = json.loads(path.read_text())
    v = report["validation"]
    ref, cand = v["reference"], v["candidate"]
    drop = 100 * (cand["accuracy"] - ref["accuracy"])
    latency = cand["latency_ms"]["median"] / ref["latency_ms"]["median"]
    if report.get("structured"):
        metric = "MACs" if report["target_metric"] == "macs" else "parameters"
        what = f"{report['achieved_sparsity']:.0%} of the {metric} removed as channels"
        size = f"file x{cand['file_bytes'] / ref['file_bytes']:.2f}"
    else:
        what = f"{report['achieved_sparsity']:.0%} of the weights zeroed"
        size = f"gzip x{cand['gzip_bytes'] / ref['gzip_bytes']:.2f}"
    return (
        f"{what}: accuracy {100 * cand['accuracy']:.2f}% ({drop:+.2f} pts), {size}, "
        f"MACs x{cand['nonzero_macs'] / ref['nonzero_macs']:.2f} (non-zero), latency "
        f"x{latency:.2f} (batch {cand['latency_ms']['batch_size']}, {v['provider']})"
    )


def main() -> None:
    for path in sys.argv[1:]:
        print(f"headline: {summary(Path(path))}")


if __name__ == "__main__":
    main()
