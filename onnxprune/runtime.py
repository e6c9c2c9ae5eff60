"""The ONNX Runtime sessions that calibration and validation share: CUDA when it can really run,
else the CPU, and the reason when it cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io as _io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from onnxprune import writer
from onnxprune.errors import DeviceError, InvalidArgumentError, ModelLoadError

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence ONNX Runtime's own C++ log lines (they go to fd 2) while probing CUDA."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tiny_model() -> bytes:
    """A one-node model to try the CUDA provider on, built without touching the user's model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@functools.cache
def cuda_problem() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can.

    onnxruntime-gpu lists CUDA as available whether or not the CUDA libraries load, and a session
    then falls back to CPU silently; so load the provider library and start a session to know.
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from PyPI (onnxprune[cuda]) are found only once preloaded
        with (
            contextlib.redirect_stdout(_io.StringIO()),
            _quiet_stderr(),
            contextlib.suppress(Exception),
        ):
            ort.preload_dlls()
    name = (
        "onnxruntime_providers_cuda.dll" if os.name == "nt" else "libonnxruntime_providers_cuda.so"
    )
    library = Path(ort.__file__).parent / "capi" / name
    if library.exists():
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:
            reason = str(exc).split(": cannot open")[0]
            return (
                f"the CUDA provider cannot load ({reason} is missing; "
                "pip install 'onnxprune[cuda]' installs CUDA and cuDNN)"
            )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with _quiet_stderr():
            session = ort.InferenceSession(_tiny_model(), options, providers=[CUDA, CPU])
    except Exception as exc:
        return f"the CUDA provider failed to start ({str(exc).splitlines()[0]})"
    if CUDA not in session.get_providers():
        return "the CUDA provider did not start (no usable GPU or driver)"
    return None


@dataclass(frozen=True)
class Runtime:
    """Which providers sessions get, and why CUDA is not among them when it is not."""

    device: str
    providers: tuple[str, ...]
    note: str | None = None


def select_runtime(device: str = "auto") -> Runtime:
    """auto: CUDA if it can run, else CPU with the reason; cuda: CUDA or a DeviceError."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return Runtime("cpu", (CPU,))
    problem = cuda_problem()
    if device == "cuda":
        if problem:
            raise DeviceError(f"--device cuda: {problem}; use --device auto or cpu")
        return Runtime("cuda", (CUDA,))
    if problem:
        return Runtime("auto", (CPU,), f"running on CPU: {problem}")
    return Runtime("auto", (CUDA, CPU))


def open_session(
    path: str | os.PathLike | bytes,
    runtime: Runtime,
    *,
    label: str | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A session on the runtime's providers; with --device cuda no node may fall back to CPU.

    `path` may be a serialized model (bytes), named `label` in messages. `spinning=False` stops
    ONNX Runtime's threads from busy-waiting after each run: where numpy works between runs
    (calibration), spinning threads took the cores from it (X^T X sums ran 5x slower on 2 cores).
    """
    if isinstance(path, bytes):
        source: str | bytes = path
        path = label or "the model"
    else:
        source = str(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if runtime.device == "cuda":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        alias = writer.utf8_alias(source) if isinstance(source, str) else contextlib.nullcontext()
        with alias as readable:
            model = source if readable is None else str(readable)
            session = ort.InferenceSession(model, options, providers=list(runtime.providers))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if runtime.device == "cuda":
            raise DeviceError(
                f"--device cuda: ONNX Runtime cannot run {path} on CUDA alone ({reason}); "
                "--device auto lets the CPU run the nodes CUDA has no kernel for"
            ) from None
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({reason})") from None
    if runtime.device == "cuda" and session.get_providers()[0] != CUDA:
        raise DeviceError(f"--device cuda: the session for {path} did not start on CUDA")
    return session
