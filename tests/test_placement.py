"""--device cuda accepts what ONNX Runtime itself runs on the GPU: shape computation may sit on
the CPU, compute nodes may not; the placement is read from ONNX Runtime's own log and reported.
Runs without a GPU: the CUDA provider is mocked where a session must claim it."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from onnxprune import runtime
from onnxprune.errors import DeviceError
from onnxprune.runtime import CPU, CUDA, Placement, Runtime, check_placement, parse_placement
from tests.builders import save, small_cnn

MIXED = """\
2026-11-30 05:52:47.29 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] \
Node placements
2026-11-30 05:52:47.29 [V:onnxruntime:, session_state.cc:1590 VerifyEachNodeIsAssignedToAnEp]  \
Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 3
  Conv (/conv1/Conv)
  MatMul (/head/MatMul)
  Softmax (/Softmax)

2026-11-30 05:52:47.29 [V:onnxruntime:, session_state.cc:1590 VerifyEachNodeIsAssignedToAnEp]  \
Node(s) placed on [CPUExecutionProvider]. Number of nodes: 3
  Shape (/Shape)
  Gather (/Gather_1)
  Concat (/Concat)

2026-11-30 05:52:47.29 [V:onnxruntime:, session_state.cc:193 CreateGraphInfo] Save...
"""


def test_parse_mixed_placement() -> None:
    placed = parse_placement(MIXED)
    assert placed.counts() == {CUDA: 3, CPU: 3}
    assert placed.nodes[CPU][1] == ("Gather", "/Gather_1")
    assert placed.fallen() == []  # shape computation only
    assert placed.summary() == "nodes per provider: CUDA 3, CPU 3 (off CUDA: Concat, Gather, Shape)"
    assert placed.to_dict()["compute_off_cuda"] == []


def test_parse_single_provider_and_missing_section() -> None:
    log = (
        "x [V:onnxruntime:, s.cc:1 V] Node placements\n"
        "x [V:onnxruntime:, s.cc:2 V]  All nodes placed on [CUDAExecutionProvider]. "
        "Number of nodes: 12\n"
    )
    assert parse_placement(log).counts() == {CUDA: 12}
    assert parse_placement("nothing about placements") is None


def test_compute_nodes_off_cuda_are_refused_with_their_names() -> None:
    placed = Placement(
        {CUDA: [("Conv", "c1")], CPU: [("Shape", "s"), ("LayerNormalization", "ln1")]}
    )
    with pytest.raises(DeviceError, match=r"1 compute node.*LayerNormalization 'ln1'"):
        check_placement(placed, Runtime("cuda", (CUDA, CPU)), "m.onnx")
    check_placement(placed, Runtime("auto", (CUDA, CPU)), "m.onnx")  # auto only reports
    shapes_only = Placement({CUDA: [("Conv", "c1")], CPU: [("Shape", "s"), ("Gather", "g")]})
    check_placement(shapes_only, Runtime("cuda", (CUDA, CPU)), "m.onnx")


def test_placement_read_from_a_real_session(tmp_path) -> None:
    path = save(small_cnn(), tmp_path / "m.onnx")
    placed = runtime.placement_of(str(path), (CPU,))
    assert placed is not None and list(placed.counts()) == [CPU]
    assert sum(placed.counts().values()) >= 3


class FakeCudaSession(ort.InferenceSession):
    """A CPU session that says it started on CUDA (no GPU here)."""

    def __init__(self, source, options=None, providers=None, **kwargs):
        super().__init__(source, options, providers=[CPU])

    def get_providers(self):
        return [CUDA, CPU]


def test_device_cuda_session_checks_placement(tmp_path, monkeypatch) -> None:
    path = save(small_cnn(), tmp_path / "m.onnx")
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeCudaSession)
    cuda = Runtime("cuda", (CUDA, CPU))
    # the real log of this CPU-only machine: every node, Conv and Gemm included, on the CPU
    with pytest.raises(DeviceError, match=r"placed all \d+ nodes of .*m\.onnx on CPU"):
        runtime.open_session(path, cuda)
    fine = Placement({CUDA: [("Conv", "c")], CPU: [("Shape", "s")]})
    monkeypatch.setattr(runtime, "placement_of", lambda source, providers: fine)
    session = runtime.open_session(path, cuda)
    assert session.onnxprune_placement is fine
    # auto on a CUDA machine reports the placement and never refuses
    monkeypatch.setattr(runtime, "placement_of", lambda source, providers: Placement({CPU: []}))
    assert runtime.open_session(path, Runtime("auto", (CUDA, CPU))).onnxprune_placement


def test_device_cuda_keeps_the_cpu_provider_for_shape_nodes(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cuda_problem", lambda: None)
    assert runtime.select_runtime("cuda").providers == (CUDA, CPU)


def test_validation_reports_the_placement(tmp_path, monkeypatch) -> None:
    from onnxprune.report.validation import format_validation
    from onnxprune.validate import validate

    path = save(small_cnn(), tmp_path / "m.onnx")
    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeCudaSession)
    monkeypatch.setattr(runtime, "cuda_problem", lambda: None)
    placed = Placement({CUDA: [("Conv", "c")], CPU: [("Shape", "s")]})
    monkeypatch.setattr(runtime, "placement_of", lambda source, providers: placed)
    import onnxprune.validate.measure as validate_module

    monkeypatch.setattr(validate_module, "measure_latencies", lambda *args, **kwargs: [None, None])
    result = validate(path, path, device="cuda")
    text = format_validation(result)
    assert "on CUDA: nodes per provider: CUDA 1, CPU 1 (off CUDA: Shape)" in text
    assert result.to_dict()["candidate"]["placement"]["counts"] == {CUDA: 1, CPU: 1}
