"""Whole channels and heads removed from the tiny LLaMA-architecture decoder, every export of it
(models/decoder: TorchScript and torch.export, with and without a KV cache, Optimum), and the
held-out perplexity before and after (ONNX Runtime, CPU; exp of the mean next-token NLL over
heldout.npz, bench/torch_reference.py's `onnx_perplexity`).

    python bench/decoder_structured.py [--sparsity 0.2] [--out build/decoder_structured.json]

Settings, each at --sparsity of the MACs (counted at input_ids=1x64): plain `--structured`,
`--structured --heads`, and both calibrated on models/decoder/tokens.npz (8 x 64 tokens, only
input_ids and attention_mask: the KV exports' positions and empty pasts are made for them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from torch_reference import onnx_perplexity  # noqa: E402

import onnxprune  # noqa: E402

DECODER = ROOT / "models" / "decoder"
EXPORTS = ("legacy", "dynamo", "kv.legacy", "kv.dynamo", "optimum")
SETTINGS = {
    "structured": {"heads": False, "calibrated": False},
    "structured --heads": {"heads": True, "calibrated": False},
    "calibrated": {"heads": False, "calibrated": True},
    "calibrated --heads": {"heads": True, "calibrated": True},
}


def perplexity(path: Path) -> dict[str, float]:
    """Held-out perplexity: code rows (0-7), doc rows (8-15), all 16."""
    with np.load(DECODER / "heldout.npz") as data:
        ids, mask = data["input_ids"], data["attention_mask"]
    return {
        "code": onnx_perplexity(path, ids[:8], mask[:8])[0],
        "doc": onnx_perplexity(path, ids[8:], mask[8:])[0],
        "all": onnx_perplexity(path, ids, mask)[0],
    }


def one(name: str, setting: str, sparsity: float, folder: Path) -> dict:
    source = DECODER / f"tiny.{name}.onnx"
    flags = SETTINGS[setting]
    out = folder / f"{name}.{setting.replace(' ', '_').replace('--', '')}.onnx"
    start = time.perf_counter()
    _, report = onnxprune.prune(
        source,
        sparsity,
        structured=onnxprune.Structured(
            heads=flags["heads"], target="macs", input_shapes={"input_ids": (1, 64)}
        ),
        calibration=onnxprune.Calibration(DECODER / "tokens.npz") if flags["calibrated"] else None,
        output=out,
    )
    seconds = time.perf_counter() - start
    plan = report.channels
    before, after = plan.macs
    heads = [h.kept(plan.removed) for h in plan.graph.heads]
    return {
        "export": name,
        "setting": setting,
        "macs": [before, after],
        "achieved": plan.achieved,
        "query_heads_kept": heads,
        "perplexity": perplexity(out),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "decoder_structured.json")
    args = parser.parse_args(argv)
    rows = []
    dense = {name: perplexity(DECODER / f"tiny.{name}.onnx") for name in EXPORTS}
    with tempfile.TemporaryDirectory() as tmp:
        for name in EXPORTS:
            for setting in SETTINGS:
                row = one(name, setting, args.sparsity, Path(tmp))
                rows.append(row)
                ppl = row["perplexity"]
                print(
                    f"{name:10s} {setting:20s} MACs {row['macs'][0]:,} -> {row['macs'][1]:,} "
                    f"({row['achieved']:.3f}); heads {row['query_heads_kept']}; ppl code "
                    f"{ppl['code']:.3f} doc {ppl['doc']:.3f} all {ppl['all']:.3f} "
                    f"(dense {dense[name]['all']:.3f}); {row['seconds']:.1f} s",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
