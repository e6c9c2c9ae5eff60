"""Benchmark models built with onnx.helper and random weights: real layer shapes, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10


class _Net:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def tensor(self, shape: tuple[int, ...], fan_in: int) -> str:
        self.n += 1
        name = f"w{self.n}"
        std = np.sqrt(2.0 / fan_in)
        arr = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def conv(
        self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True
    ) -> str:
        w = self.tensor((c_out, c_in, k, k), c_in * k * k)
        b = self.tensor((c_out,), c_out)
        pad = k // 2
        y = self.op(
            "Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4
        )
        return self.op("Relu", [y]) if relu else y


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50's layer shapes, BatchNorm folded into the Convs as exporters do: 25.5 M weights."""
    net = _Net(seed)
    x = net.conv("input", 3, 64, 7, stride=2)
    x = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            h = net.conv(x, c_in, width, 1)
            h = net.conv(h, width, width, 3, stride=stride)
            h = net.conv(h, width, width * 4, 1, relu=False)
            skip = x if block > 0 else net.conv(x, c_in, width * 4, 1, stride=stride, relu=False)
            x = net.op("Relu", [net.op("Add", [h, skip])])
            c_in = width * 4
    x = net.op("GlobalAveragePool", [x])
    x = net.op("Flatten", [x])
    fc = net.tensor((1000, 2048), 2048)
    net.nodes.append(
        helper.make_node(
            "Gemm", [x, fc, net.tensor((1000,), 1000)], ["logits"], name="fc", transB=1
        )
    )
    graph = helper.make_graph(
        net.nodes,
        "resnet50_shape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        net.inits,
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)]
    )


def cached(path: Path, build) -> Path:
    """Build a benchmark model once; later runs reuse the file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(build(), str(tmp))
        tmp.replace(path)
    return path
