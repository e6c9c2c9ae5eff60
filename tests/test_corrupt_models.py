"""Property: whatever a valid model is corrupted into (bytes flipped, the file cut short, protobuf
fields edited), the CLI either works (exit 0) or refuses it with one line (exit 2): no traceback,
the input files unchanged, and on failure nothing left beside them.

The default suite runs a fixed set of examples; `pytest -m slow tests/test_corrupt_models.py`
runs many more, drawn afresh.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import onnx
import pytest
from builders import mlp, small_cnn
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnxprune.cli import main

Files = dict[str, bytes]  # file name -> bytes, the model first


@cache
def base_models() -> dict[str, Files]:
    """A Conv+BN+Gemm CNN, a MatMul MLP whose first weight is big enough to be memory-mapped
    (over 1 KiB), and an MLP with its weights in an external data file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ext.onnx"
        onnx.save(mlp(), str(path), save_as_external_data=True, location="ext.data")
        external = {name: (path.parent / name).read_bytes() for name in ("ext.onnx", "ext.data")}
    return {
        "cnn": {"cnn.onnx": small_cnn().SerializeToString()},
        "mlp": {"mlp.onnx": mlp(dims=(16, 64, 8)).SerializeToString()},
        "external": external,
    }


OPS = [
    "Conv", "MatMul", "Gemm", "Relu", "Add", "Identity", "Transpose", "Cast", "Flatten",
    "BatchNormalization", "MaxPool", "Reshape", "Concat", "ConvTranspose", "If", "Foo", "",
]  # fmt: skip
EDITS = [
    "dims", "rank", "data_type", "ir_version", "opset", "op_type", "domain", "input", "output",
    "graph_output", "raw_data", "drop_node", "swap_nodes", "drop_initializer", "external",
    "attribute", "input_shape",
]  # fmt: skip
DOMAINS = ["", "ai.onnx", "ai.onnx.ml", "com.microsoft", "x.y"]
NUMBERS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([-(2**63), -(2**31), 2**31, 2**32, 2**62, 2**63 - 1]),
)


def names_of(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    names = [v.name for v in (*graph.input, *graph.output)] + [t.name for t in graph.initializer]
    return names + [o for n in graph.node for o in n.output] + ["", "ghost"]


def edit_model(model: onnx.ModelProto, data: st.DataObject) -> None:
    """A protobuf field edit of the kinds malformed models show."""
    graph = model.graph
    kind = data.draw(st.sampled_from(EDITS), label="edit")

    def pick(seq) -> int:
        return data.draw(st.integers(0, max(len(seq) - 1, 0)))

    tensor = graph.initializer[pick(graph.initializer)] if graph.initializer else None
    node = graph.node[pick(graph.node)] if graph.node else onnx.NodeProto()
    if kind == "dims" and tensor is not None and tensor.dims:
        tensor.dims[pick(tensor.dims)] = data.draw(NUMBERS)
    elif kind == "rank" and tensor is not None:
        if tensor.dims and data.draw(st.booleans()):
            del tensor.dims[-1]
        else:
            tensor.dims.append(data.draw(NUMBERS))
    elif kind == "data_type" and tensor is not None:
        tensor.data_type = data.draw(st.integers(-2, 40))
    elif kind == "ir_version":
        model.ir_version = data.draw(NUMBERS)
    elif kind == "opset":
        model.opset_import[0].version = data.draw(NUMBERS)
    elif kind == "op_type":
        node.op_type = data.draw(st.sampled_from(OPS))
    elif kind == "domain":
        node.domain = data.draw(st.sampled_from(DOMAINS))
    elif kind == "input" and node.input:
        node.input[pick(node.input)] = data.draw(st.sampled_from(names_of(model)))
    elif kind == "output":
        node.output[pick(node.output)] = data.draw(st.sampled_from(names_of(model)))
    elif kind == "graph_output":
        graph.output[0].name = data.draw(st.sampled_from(names_of(model)))
    elif kind == "raw_data" and tensor is not None and tensor.raw_data:
        cut = data.draw(st.integers(1, len(tensor.raw_data)))
        tensor.raw_data = tensor.raw_data[:-cut] if data.draw(st.booleans()) else b"\0" * cut
    elif kind == "drop_node" and graph.node:
        del graph.node[pick(graph.node)]
    elif kind == "swap_nodes" and graph.node:
        i, j = pick(graph.node), pick(graph.node)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(graph.node[i])
        b.CopyFrom(graph.node[j])
        graph.node[i].CopyFrom(b)
        graph.node[j].CopyFrom(a)
    elif kind == "drop_initializer" and tensor is not None:
        graph.initializer.remove(tensor)
    elif kind == "external" and tensor is not None and tensor.external_data:
        entry = tensor.external_data[pick(tensor.external_data)]
        entry.value = data.draw(st.sampled_from(["0", "7", "4096", "-1", "x", "", "../ext.data"]))
    elif kind == "attribute" and node.attribute:
        attr = node.attribute[pick(node.attribute)]
        if attr.type == onnx.AttributeProto.INTS:
            attr.ints[:] = data.draw(st.lists(NUMBERS, max_size=5))
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = data.draw(NUMBERS)
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = data.draw(st.floats(allow_nan=True, width=32))
        elif attr.type == onnx.AttributeProto.STRING:
            attr.s = data.draw(st.sampled_from([b"", b"SAME_UPPER", b"VALID", b"NOTSET", b"x"]))
    elif kind == "input_shape":
        dims = graph.input[0].type.tensor_type.shape.dim
        if dims:
            dim = dims[pick(dims)]
            if data.draw(st.booleans()):
                dim.dim_value = data.draw(NUMBERS)
            else:
                dim.dim_param = data.draw(st.sampled_from(["N", "M", ""]))


def corrupt(files: Files, data: st.DataObject) -> Files:
    """The files with one corruption: byte flips, a cut, or one to three field edits (to the model
    file, or bytes and cuts to the external data file)."""
    files = dict(files)
    name = data.draw(st.sampled_from(sorted(files, key=lambda n: not n.endswith(".onnx"))))
    content = files[name]
    kinds = ["flip", "cut", "edit"] if name.endswith(".onnx") else ["flip", "cut"]
    how = data.draw(st.sampled_from(kinds))
    if how == "flip":
        flipped = bytearray(content)
        flips = st.tuples(st.integers(0, len(content) - 1), st.integers(1, 255))
        for offset, mask in data.draw(st.lists(flips, min_size=1, max_size=8)):
            flipped[offset] ^= mask
        files[name] = bytes(flipped)
    elif how == "cut":
        files[name] = content[: data.draw(st.integers(0, len(content) - 1))]
    else:
        model = onnx.ModelProto.FromString(content)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            edit_model(model, data)
        files[name] = model.SerializeToString()
    return files


@contextlib.contextmanager
def debug_tracebacks() -> Iterator[None]:
    """An internal error prints its traceback, so a failing example shows where it broke."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXPRUNE_DEBUG", "1")
        yield


def check_example(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(sorted(base_models())), label="model")
    files = corrupt(base_models()[base], data)
    command = data.draw(st.sampled_from(["prune", "structured", "inspect"]), label="command")
    with tempfile.TemporaryDirectory() as tmp, debug_tracebacks():
        folder = Path(tmp)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        model = folder / next(iter(files))
        out = folder / "out.onnx"
        args = {
            "prune": [str(model), "-s", "0.5", "-o", str(out)],
            "structured": [str(model), "--structured", "-s", "0.3", "-o", str(out)],
            "inspect": ["inspect", str(model)],
        }[command]
        result = CliRunner().invoke(main, args)
        event(f"{command}: exit {result.exit_code}")  # --hypothesis-show-statistics shows the mix
        shown = f"exit {result.exit_code}, args {args}\n{result.output}"
        assert result.exception is None or isinstance(result.exception, SystemExit), shown
        assert result.exit_code in (0, 2), shown
        assert "Traceback" not in result.output, shown
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), shown
        for name, content in files.items():
            assert (folder / name).read_bytes() == content, f"{name} changed; {shown}"
        left = {p.name for p in folder.iterdir()} - files.keys()
        if result.exit_code != 0 or command == "inspect":
            assert not left, f"left {left}; {shown}"
        else:  # the output, with its data file when the input had one; no temporary
            assert "out.onnx" in left and left <= {"out.onnx", "out.onnx.data"}, shown


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_corrupt_models_exit_0_or_2(data) -> None:
    check_example(data)


@pytest.fixture
def slow_only(request: pytest.FixtureRequest) -> None:
    """Skip unless `-m slow` selected the test: the default suite stays fast."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("many examples: run with -m slow")


@pytest.mark.slow
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # slow_only runs once, before any example
    ],
)
@given(data=st.data())
def test_corrupt_models_exit_0_or_2_many(slow_only, data) -> None:
    check_example(data)
