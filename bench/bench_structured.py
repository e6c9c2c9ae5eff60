"""Does removing half the MACs make a ResNet-50 twice as fast? ONNX Runtime CPU, same run.

Builds a ResNet-50-shaped model (bottlenecks 3-4-6-3, BatchNorm folded, random He weights, 224x224,
batch 1) with onnx.helper, so no torch is needed; prunes half its MACs structured, with and without
--round-to; and prints dense latency / pruned latency next to the MAC ratio, which is the limit.
Issue 4 asks for a latency ratio within 15% of the MAC ratio.

    python bench/bench_structured.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from zoo import latencies_ms  # bench/ is the script's folder

from onnxprune import pipeline


def resnet50(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def name(prefix: str) -> str:
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> str:
        w, b, y = name("w"), name("b"), name("conv")
        std = np.sqrt(2 / (c_in * k * k))
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32), w
            )
        )
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), b))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [y],
                name=name("Conv"),
                pads=[k // 2] * 4,
                strides=[stride, stride],
            )
        )
        if not relu:
            return y
        r = name("relu")
        nodes.append(helper.make_node("Relu", [y], [r], name=name("Relu")))
        return r

    h = conv("x", 3, 64, 7, 2)
    pooled = name("pool")
    nodes.append(
        helper.make_node(
            "MaxPool", [h], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    h, c = pooled, 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            out = width * 4
            branch = conv(
                conv(conv(h, c, width, 1), width, width, 3, stride), width, out, 1, relu=False
            )
            short = conv(h, c, out, 1, stride, relu=False) if block == 0 else h
            added, r = name("add"), name("relu")
            nodes.append(helper.make_node("Add", [branch, short], [added]))
            nodes.append(helper.make_node("Relu", [added], [r]))
            h, c = r, out
    gap, flat = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [h], [gap]))
    nodes.append(helper.make_node("Flatten", [gap], [flat]))
    inits.append(
        numpy_helper.from_array((rng.standard_normal((1000, c)) * 0.01).astype(np.float32), "fc_w")
    )
    nodes.append(helper.make_node("Gemm", [flat, "fc_w"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet50",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])],
        inits,
    )
    opset = [helper.make_opsetid("", 17)]
    return helper.make_model(graph, ir_version=10, opset_imports=opset)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "resnet50.onnx"
        onnx.save(resnet50(), str(dense))
        variants = {}
        for round_to in (None, 8, 16):
            out = Path(tmp) / f"pruned{round_to}.onnx"
            _, report = pipeline.prune(
                dense, 0.5, structured=True, target="macs", round_to=round_to, output=out
            )
            macs = report.channels.macs
            variants[round_to] = (out, macs[1] / macs[0])
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
        paths = [dense, *(p for p, _ in variants.values())]
        times = latencies_ms(paths, feeds, args.repeats)
    print(f"ResNet-50 shape, batch 1, ORT CPU: dense {times[0]:.1f} ms")
    print(f"{'round-to':>8}  {'MAC ratio':>9}  {'latency ratio':>13}  {'speed-up / MAC limit':>20}")
    for (round_to, (_, mac_ratio)), t in zip(variants.items(), times[1:], strict=True):
        ratio = t / times[0]
        print(f"{round_to or '-':>8}  {mac_ratio:9.3f}  {ratio:13.3f}  {mac_ratio / ratio:20.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
