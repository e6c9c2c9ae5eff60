"""Character and exact-string accuracy of the OCR measurement model (models/OCR.md).

The model (``build/ocr/ocr_rec.onnx``, made by ``models/train_ocr.py``) reads ``input`` float32
[N, 1, 28, 168] and returns ``logits`` float32 [N, T, 11]: CTC log-probabilities, class 0 the
blank and class d + 1 the digit d. Decoding is greedy CTC: the arg-max class at every time step,
repeats collapsed, blanks dropped.

The test file (``build/ocr/ocr_test.npz``) holds ``input`` and ``labels`` int64 [N, 6]: the
digits of each line, padded with -1.

* character accuracy: per line max(0, 1 - edit distance(prediction, label) / len(label)),
  averaged over the lines;
* exact accuracy: the share of lines whose prediction equals the label.

Runs ONNX Runtime on the CPU; needs only numpy and onnxruntime::

    python models/ocr_eval.py build/ocr/ocr_rec.onnx build/ocr/ocr_test.npz
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BLANK = 0
BATCH = 250


def greedy_decode(logits: np.ndarray) -> list[list[int]]:
    """Digits of each line of [N, T, classes] scores: arg-max, repeats collapsed, blanks dropped."""
    best = np.asarray(logits).argmax(axis=-1)  # [N, T]
    keep = np.ones_like(best, dtype=bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != BLANK
    return [(row[mask] - 1).tolist() for row, mask in zip(best, keep, strict=True)]


def label_digits(labels: np.ndarray) -> list[list[int]]:
    """Rows of an int [N, L] label array padded with -1 as lists of digits."""
    return [[int(d) for d in row if d >= 0] for row in np.asarray(labels)]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(predictions: Sequence[Sequence[int]], labels: np.ndarray) -> tuple[float, float]:
    """(character accuracy, exact accuracy) of decoded predictions against padded labels."""
    truth = label_digits(labels)
    if len(predictions) != len(truth):
        raise ValueError(f"{len(predictions)} predictions for {len(truth)} labels")
    chars = [
        max(0.0, 1.0 - edit_distance(p, t) / len(t))
        for p, t in zip(predictions, truth, strict=True)
    ]
    exact = [list(p) == t for p, t in zip(predictions, truth, strict=True)]
    return float(np.mean(chars)), float(np.mean(exact))


def _load_data(test_npz: str | os.PathLike | Mapping[str, np.ndarray]) -> tuple[Any, Any]:
    if isinstance(test_npz, Mapping):
        return np.asarray(test_npz["input"], dtype=np.float32), np.asarray(test_npz["labels"])
    with np.load(test_npz) as data:
        return data["input"].astype(np.float32), data["labels"]


def run_model(model: str | os.PathLike | bytes | Any, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime CPU logits of a model (a path, serialized bytes or a ModelProto)."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else os.fspath(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)]
    return np.concatenate(parts)


def character_accuracy(
    model_path_or_bytes: str | os.PathLike | bytes | Any,
    test_npz: str | os.PathLike | Mapping[str, np.ndarray],
) -> tuple[float, float]:
    """(character accuracy, exact-string accuracy) of the model on the test lines."""
    x, labels = _load_data(test_npz)
    return score(greedy_decode(run_model(model_path_or_bytes, x)), labels)


def main() -> None:
    """Print both accuracies of one model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("test_npz", help="the .npz with input and labels")
    args = parser.parse_args()
    char_acc, exact_acc = character_accuracy(args.model, args.test_npz)
    print(f"character accuracy {char_acc:.4f}  exact accuracy {exact_acc:.4f}")


if __name__ == "__main__":
    main()
