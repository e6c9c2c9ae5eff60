"""Write ``digits_calib.npz``: calibration data for ``digits_cnn.onnx`` from its training split.

The split is the one ``train_digits.py`` uses: scikit-learn's ``load_digits``, pixels divided by
16, stratified ``train_test_split`` with 25 % held out and ``random_state=0``. The held-out part
is ``digits_val.npz``; this script draws only from the 1,347 training images, so calibration
and validation data never overlap.

Selection is class-balanced and deterministic: walking the training split in its order, the
first 100 images of each class (1,000 in all), kept in training-split order. Output arrays:
``input`` float32 [1000, 1, 8, 8] and ``labels`` int64 [1000]. 1,000 rather than a few hundred:
the classifier's input is 512 wide, and fewer samples than that leave its statistics
rank-deficient (measured: sequential sparsegpt at 0.9 keeps 86.0% with 256 samples, 90.2% with
1,000). Needs only numpy and scikit-learn::

    python models/make_digits_calib.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 0
TEST_SIZE = 0.25
NUM_CALIB = 1000
NUM_CLASSES = 10


def training_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training images and labels of train_digits.py's split, plus its held-out images."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, _ = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SEED
    )
    return x_train, y_train, x_test


def balanced_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` indices spread evenly over the classes, in their original order."""
    per_class, extra = divmod(count, NUM_CLASSES)
    chosen = []
    for cls in range(NUM_CLASSES):
        want = per_class + (1 if cls < extra else 0)
        idx = np.flatnonzero(labels == cls)[:want]
        if len(idx) < want:
            raise SystemExit(f"class {cls}: only {len(idx)} training images, need {want}")
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def main() -> None:
    """Select, check against the held-out split and write the calibration file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "digits_calib.npz")
    parser.add_argument("--count", type=int, default=NUM_CALIB)
    args = parser.parse_args()

    x_train, y_train, x_test = training_split()
    idx = balanced_indices(y_train, args.count)
    x_calib = np.ascontiguousarray(x_train[idx], dtype=np.float32)
    y_calib = y_train[idx].astype(np.int64)

    held_out = {row.tobytes() for row in x_test}
    overlap = sum(row.tobytes() in held_out for row in x_calib)
    if overlap:
        raise SystemExit(f"{overlap} calibration images also occur in the held-out split")
    val_path = HERE / "digits_val.npz"
    if val_path.exists():
        with np.load(val_path, allow_pickle=False) as val:
            if not np.array_equal(val["input"], x_test):
                raise SystemExit(f"{val_path} is not the held-out split this script assumes")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, input=x_calib, labels=y_calib)
    counts = np.bincount(y_calib, minlength=NUM_CLASSES).tolist()
    print(f"wrote {args.out}: input {x_calib.shape} float32, labels per class {counts}")


if __name__ == "__main__":
    main()
