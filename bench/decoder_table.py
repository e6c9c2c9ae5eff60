"""Calibrated pruning of the LLaMA-style test decoders, perplexity beside the torch reference.

    python bench/decoder_table.py                       # the tiny decoder (models/decoder)
    python bench/decoder_table.py --dir build/decoder   # the main one (make decoder-model)
    python bench/decoder_table.py --criteria sparsegpt --sparsities 0.5 --methods global,uniform

Each row prunes one export (the decoder blocks' Linears; the LM head excluded, as the torch
reference does) with `onnxprune.prune` in-process, calibrated on the same tokens as the torch
reference (bench/torch_reference.py), and measures the perplexity of the written model on the
held-out tokens with ONNX Runtime; the dense export's perplexity is measured in the same run.
Prints a Markdown table and writes bench/out/decoder_table.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from torch_reference import _load_tokens, onnx_perplexity

import onnxprune
from onnxprune.options import Calibration, Selection

REPO = Path(__file__).resolve().parent.parent


def perplexities(model: Path, heldout: dict[str, tuple]) -> dict[str, float]:
    return {k: onnx_perplexity(model, ids, mask)[0] for k, (ids, mask) in heldout.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--export", default=None, help="default tiny.legacy.onnx / decoder.legacy.onnx"
    )
    parser.add_argument("--criteria", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,0.7,2:4")
    parser.add_argument("--methods", default="global")
    parser.add_argument("--compare", default=None, help="Calibration.compare (default: its own)")
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    tiny = args.dir is None
    folder = args.dir or REPO / "models" / "decoder"
    export = folder / (args.export or ("tiny.legacy.onnx" if tiny else "decoder.legacy.onnx"))
    if tiny:
        ids, mask = _load_tokens(folder / "heldout.npz")
        half = len(ids) // 2
        heldout = {"code": (ids[:half], mask[:half]), "doc": (ids[half:], mask[half:])}
        calib = folder / "tokens.npz"
    else:
        heldout = {k: _load_tokens(folder / f"heldout_{k}.npz") for k in ("code", "doc")}
        calib = folder / "calib.npz"
    with np.load(calib) as data:
        samples = {k: data[k] for k in data.files}
    if args.samples:
        samples = {k: v[: args.samples] for k, v in samples.items()}
    rows = [{"setting": "dense", **perplexities(export, heldout)}]
    print(f"dense: {rows[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        for criterion in args.criteria.split(","):
            for method in args.methods.split(","):
                for spec in args.sparsities.split(","):
                    pattern = spec if ":" in spec else None
                    options = Selection(
                        0.0 if pattern else float(spec),
                        method=method if not pattern else "global",
                        pattern=pattern,
                        exclude=("lm_head",),
                    )
                    extra = {} if args.compare is None else {"compare": args.compare}
                    calibration = Calibration(
                        data=samples, criterion=criterion, mode=args.mode, device="cpu", **extra
                    )
                    start = time.perf_counter()
                    _, report = onnxprune.prune(
                        export, options, calibration=calibration, output=out, force=True
                    )
                    seconds = time.perf_counter() - start
                    row = {
                        "setting": f"{criterion} {method} {spec}",
                        "achieved": round(report.sparsity, 4),
                        "seconds": round(seconds, 1),
                        **perplexities(out, heldout),
                    }
                    spread = [
                        report.pruned(layer) / layer.size
                        for layer in report.plan.layers
                        if layer.changed
                    ]
                    row["layer_sparsity"] = [round(min(spread), 3), round(max(spread), 3)]
                    rows.append(row)
                    print(row, flush=True)
    print()
    print("| setting | achieved | layers min-max | ppl code | ppl doc | seconds |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        spread = "-".join(str(x) for x in r.get("layer_sparsity", [])) or "-"
        print(
            f"| {r['setting']} | {r.get('achieved', 0)} | {spread} | {r['code']:.3f} | "
            f"{r['doc']:.3f} | {r.get('seconds', '-')} |"
        )
    target = REPO / "bench" / "out" / "decoder_table.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
