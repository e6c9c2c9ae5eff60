"""Structured magnitude pruning without and with constant compensation: the README's table.

For each trained model (the bundled digits CNN, and those of `make mnist-models` and
`make ocr-model` where built), remove 10/30/50% of the MACs with plain magnitude (no data), once
with `compensate=False` and once as by default, and print top-1 accuracy (OCR: greedy-CTC
character accuracy) on 1000 held-out samples.

    python bench/compensation_table.py [--models digits,cnn-unfolded,vit,ocr]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_table import MODELS, accuracy, logits

import onnxprune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,cnn-folded,cnn-unfolded,vit,ocr")
    parser.add_argument("--settings", default="0.1,0.3,0.5")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    settings = [float(s) for s in args.settings.split(",")]
    print("| model (dense) | " + " | ".join(f"{s:.0%} of MACs" for s in settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for key in args.models.split(","):
        path, _, test = MODELS[key]
        if not path.exists():
            print(f"| {key}: not built (see the Makefile) |")
            continue
        data = np.load(test)
        x = data[next(k for k in data.files if k != "labels")][:1000]
        y = data["labels"][:1000]
        row = [f"{key} ({accuracy(logits(onnxprune.load_model(path), x), y):.2f})"]
        for sparsity in settings:
            cells = []
            for compensate in (False, True):
                model, _ = onnxprune.prune(
                    path,
                    sparsity,
                    structured=onnxprune.Structured(target="macs", compensate=compensate),
                )
                cells.append(f"{accuracy(logits(model, x), y):.2f}")
            row.append(" / ".join(cells))
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
