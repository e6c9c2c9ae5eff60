"""Which normalisation of channel importance keeps the most accuracy: models/digits_cnn.onnx,
structured pruning at several sparsities, held-out accuracy without fine-tuning.

    python bench/channel_norms.py [model.onnx data.npz]
"""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune import channels
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.scoring.magnitude import CHANNEL_NORMS
from onnxprune.selection.channels import plan_channels
from onnxprune.storage import io

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)


def accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def main(path: str = "models/digits_cnn.onnx", data: str = "models/digits_val.npz") -> None:
    arrays = np.load(data)
    x, y = arrays["input"].astype(np.float32), arrays["labels"]
    print(f"{'sparsity':>8}  " + "  ".join(f"{n:>6}" for n in CHANNEL_NORMS))
    for sparsity in SPARSITIES:
        row = []
        for norm in CHANNEL_NORMS:
            model = io.load_model(path)
            channels.prepare(model)
            graph = channels.build(model)
            plan = plan_channels(model, graph, sparsity, normalize=norm)
            apply_channel_plan(model, plan)
            row.append(accuracy(model, x, y))
        print(f"{sparsity:>8}  " + "  ".join(f"{a:6.3f}" for a in row))


if __name__ == "__main__":
    main(*sys.argv[1:])
