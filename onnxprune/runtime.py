"""The ONNX Runtime sessions that calibration and validation share: CUDA when it can really run,
else the CPU, and the reason when it cannot; or the execution providers the user names
(TensorRT, OpenVINO, DirectML, CoreML...), checked against what this ONNX Runtime has.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io as _io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from onnxprune.errors import DeviceError, InvalidArgumentError, ModelLoadError
from onnxprune.options import DEVICES, Device
from onnxprune.storage import writer

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Ops that do the arithmetic of a model: with --device cuda none may run on the CPU. Everything
# else (Shape, Gather of a shape, Concat of ints, Unsqueeze, Cast...) ONNX Runtime places on the
# CPU by design when it computes shapes, and that is accepted (and reported).
COMPUTE_OPS = frozenset(
    """Conv ConvTranspose ConvInteger MatMul MatMulInteger Gemm Einsum QLinearConv QLinearMatMul
    FusedConv FusedGemm FusedMatMul NhwcConv Attention MultiHeadAttention GroupQueryAttention
    PackedAttention DecoderAttention LongformerAttention LayerNormalization SkipLayerNormalization
    SimplifiedLayerNormalization SkipSimplifiedLayerNormalization EmbedLayerNormalization
    BatchNormalization InstanceNormalization GroupNormalization BiasGelu FastGelu Gelu QuickGelu
    BiasSoftmax Softmax LogSoftmax LSTM GRU RNN MaxPool AveragePool GlobalAveragePool
    GlobalMaxPool LpPool Resize Upsample ConvTransposeWithDynamicPads""".split()  # noqa: SIM905
)


@contextlib.contextmanager
def _stderr_to(fd: int) -> Iterator[None]:
    """ONNX Runtime's own C++ log lines go to fd 2: send them to `fd` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence ONNX Runtime's log lines while probing CUDA."""
    with open(os.devnull, "w") as null, _stderr_to(null.fileno()):
        yield


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
class Placement:
    """Which execution provider runs each node of a session's (optimised) graph."""

    nodes: dict[str, list[tuple[str, str]]]  # provider -> [(op type, node name)]
    primary: str = CUDA  # the provider asked for first

    @property
    def primary_name(self) -> str:
        return short_name(self.primary)

    def counts(self) -> dict[str, int]:
        return {provider: len(nodes) for provider, nodes in self.nodes.items()}

    def off_primary(self) -> list[str]:
        """Op types that run on another provider than the first one asked for."""
        return sorted(
            {op for p, nodes in self.nodes.items() if p != self.primary for op, _ in nodes}
        )

    def fallen(self) -> list[tuple[str, str]]:
        """Compute nodes (COMPUTE_OPS) that the session left off its first provider."""
        return [
            node
            for provider, nodes in self.nodes.items()
            if provider != self.primary
            for node in nodes
            if node[0] in COMPUTE_OPS
        ]

    def summary(self) -> str:
        """One line: nodes per provider; what runs off the first provider, by op type."""
        parts = [f"{short_name(p)} {n}" for p, n in self.counts().items()]
        off = self.off_primary()
        more = " ..." if len(off) > 8 else ""
        extra = f" (off {self.primary_name}: {', '.join(off[:8])}{more})" if off else ""
        return f"nodes per provider: {', '.join(parts)}{extra}"

    def to_dict(self) -> dict[str, object]:
        compute = [f"{op} {name}" for op, name in self.fallen()]
        if self.primary == CUDA:  # the keys reports had before other providers could be asked for
            return {
                "counts": self.counts(),
                "off_cuda": self.off_primary(),
                "compute_off_cuda": compute,
            }
        return {
            "counts": self.counts(),
            "primary": self.primary,
            "off_primary": self.off_primary(),
            "compute_off_primary": compute,
        }


_PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"\s{2,}(\S+) \((.*)\)\s*")


def parse_placement(log: str) -> Placement | None:
    """The "Node placements" section ONNX Runtime's verbose log writes at session creation:

        Node placements
         All nodes placed on [CPUExecutionProvider]. Number of nodes: 7
    or, per provider,
         Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 2
          Conv (conv1)
          Relu (relu1)
    """
    lines = log.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("Node placements"))
    except StopIteration:
        return None
    nodes: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in lines[start + 1 :]:
        placed = _PLACED.search(line)
        node = _NODE.fullmatch(line)
        if placed:
            current = nodes.setdefault(placed[2], [])
            if placed[1] == "All nodes":
                current.extend(("?", "?") for _ in range(int(placed[3])))
                break
        elif node and current is not None:
            current.append((node[1], node[2]))
        elif ":onnxruntime:" in line:  # the next log record
            break
    return Placement(nodes) if nodes else None


def short_name(provider: str) -> str:
    """CUDAExecutionProvider -> CUDA: how messages and tables name a provider."""
    return provider.removesuffix("ExecutionProvider")


def placement_of(
    source: str | bytes, providers: tuple[str, ...], options: tuple[dict, ...] | None = None
) -> Placement | None:
    """Where ONNX Runtime places every node, read from its verbose log of a session made for
    that alone (the sessions that measure never log verbosely: it would slow their runs)."""
    settings = ort.SessionOptions()
    settings.log_severity_level = 0
    settings.log_verbosity_level = 0
    with tempfile.TemporaryFile(mode="w+b") as log:
        with _stderr_to(log.fileno()):
            try:
                with contextlib.redirect_stdout(_io.StringIO()):
                    ort.InferenceSession(source, settings, **_provider_args(providers, options))
            except Exception:
                return None
        log.seek(0)
        placed = parse_placement(log.read().decode(errors="replace"))
    if placed is None or not providers:
        return placed
    return Placement(placed.nodes, providers[0])


def _provider_args(providers: tuple[str, ...], options: tuple[dict, ...] | None) -> dict:
    """InferenceSession's keyword arguments for a provider list and its options."""
    if options is None or not any(options):
        return {"providers": list(providers)}
    return {"providers": list(providers), "provider_options": [dict(o) for o in options]}


@dataclass(frozen=True)
class Runtime:
    """Which providers sessions get (with their options), and why CUDA is not among them when it
    is not. `device` is auto, cuda or cpu, or "providers" for a list the user named."""

    device: str
    providers: tuple[str, ...]
    note: str | None = None
    options: tuple[dict, ...] | None = None  # one dict per provider, where any was given

    @property
    def placed(self) -> bool:
        """Whether sessions read where ONNX Runtime puts the nodes: off the CPU only."""
        return self.providers[0] != CPU if self.device == "providers" else CUDA in self.providers


def resolve_provider(name: str, available: list[str] | None = None) -> str:
    """A provider's full name from what a user writes (TensorRT, tensorrt, DmlExecutionProvider);
    one that this ONNX Runtime does not have is refused, naming those it has."""
    have = ort.get_available_providers() if available is None else available
    wanted = name.strip().lower().removesuffix("executionprovider")
    for full in have:
        if full.lower().removesuffix("executionprovider") == wanted:
            return full
    listed = ", ".join(short_name(p) for p in have)
    raise InvalidArgumentError(
        f"--provider {name}: this ONNX Runtime ({ort.__version__}) has no such execution provider "
        f"(available: {listed})"
    )


def _named_runtime(device: Device) -> Runtime:
    """The providers the user named, in their order, with the CPU last for what they cannot run."""
    names = [resolve_provider(p) for p in device.providers]
    given = {resolve_provider(p): dict(o) for p, o in device.options.items()}
    providers = tuple(dict.fromkeys([*names, CPU]))
    options = tuple(given.get(p, {}) for p in providers)
    if CUDA in providers and cuda_problem():
        raise DeviceError(f"--provider CUDA: {cuda_problem()}")
    return Runtime("providers", providers, None, options if any(options) else None)


def select_runtime(device: str | Device = "auto") -> Runtime:
    """auto: CUDA if it can run, else CPU with the reason; cuda: CUDA or a DeviceError; a
    `Device` naming providers: those, checked against this ONNX Runtime."""
    if isinstance(device, Device):
        if device.providers:
            return _named_runtime(device)
        device = device.name
    if device not in DEVICES:
        raise InvalidArgumentError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return Runtime("cpu", (CPU,))
    problem = cuda_problem()
    if device == "cuda":
        if problem:
            raise DeviceError(f"--device cuda: {problem}; use --device auto or cpu")
        # the CPU provider stays listed: ONNX Runtime puts shape computation there by design;
        # compute nodes that fall back are refused after the session is made (open_session)
        return Runtime("cuda", (CUDA, CPU))
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
    said = _io.StringIO()  # ONNX Runtime prints a provider that failed to start, then falls back
    try:
        alias = writer.utf8_alias(source) if isinstance(source, str) else contextlib.nullcontext()
        with alias as readable, contextlib.redirect_stdout(said):
            model = source if readable is None else str(readable)
            session = ort.InferenceSession(
                model, options, **_provider_args(runtime.providers, runtime.options)
            )
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if runtime.device == "cuda":
            raise DeviceError(
                f"--device cuda: ONNX Runtime cannot run {path} on CUDA alone ({reason}); "
                "--device auto lets the CPU run the nodes CUDA has no kernel for"
            ) from None
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({reason})") from None
    if runtime.device == "providers":
        _check_started(session, runtime, str(path), said.getvalue())
    elif CUDA in runtime.providers and session.get_providers()[0] != CUDA:
        raise DeviceError(f"--device cuda: the session for {path} did not start on CUDA")
    if runtime.placed:
        placed = (
            placement_of(source, runtime.providers, runtime.options)
            if runtime.options
            else placement_of(source, runtime.providers)
        )
        session.onnxprune_placement = placed  # type: ignore[attr-defined]
        check_placement(placed, runtime, str(path))
    return session


def _check_started(session: ort.InferenceSession, runtime: Runtime, what: str, said: str) -> None:
    """Every provider the user named runs in the session: ONNX Runtime drops one that fails to
    start (its libraries missing, an option it refuses) and says so on stdout only."""
    running = set(session.get_providers())
    for provider in runtime.providers:
        if provider not in running:
            why = next((line for line in said.splitlines() if "EP Error" in line), "")
            reason = f" ({why.removeprefix('EP Error').strip()[:300]})" if why else ""
            raise DeviceError(
                f"--provider {short_name(provider)}: ONNX Runtime could not start it for "
                f"{what}{reason}; check its libraries and options, or leave it out"
            )


def check_placement(placed: Placement | None, runtime: Runtime, what: str) -> None:
    """--device cuda: refuse (exit 2) a model whose compute nodes ONNX Runtime would run on
    the CPU, naming them; shape computation on the CPU is ONNX Runtime's design and fine."""
    if runtime.device != "cuda" or placed is None:
        return
    elsewhere = {p: len(n) for p, n in placed.nodes.items() if p != CUDA and ("?", "?") in n}
    if elsewhere:  # the log names no node when all of them went to one provider
        provider, count = next(iter(elsewhere.items()))
        raise DeviceError(
            f"--device cuda: ONNX Runtime placed all {count} nodes of {what} on "
            f"{provider.removesuffix('ExecutionProvider')}; --device auto runs it there"
        )
    fallen = placed.fallen()
    if fallen:
        names = ", ".join(f"{op} {name!r}" for op, name in fallen[:5])
        more = f" and {len(fallen) - 5} more" if len(fallen) > 5 else ""
        raise DeviceError(
            f"--device cuda: ONNX Runtime would run {len(fallen)} compute node(s) of {what} on "
            f"the CPU (no CUDA kernel for them at this type or opset): {names}{more}; "
            "--device auto runs them there"
        )
