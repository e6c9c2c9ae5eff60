"""Every setting of a run, as small frozen dataclasses that check themselves when made.

    Selection    what to prune: sparsity or an N:M pattern, global or uniform, minimum retention
    Calibration  samples to rank and repair from: criterion, mode, batches, device
    Structured   whole channels instead of weights: what --sparsity counts, rounding, heads
    Save         how the output is written: external data, sparse storage, the checker
    Validation   what to compare the pruned model on, and the gates that fail a run
    Device       where ONNX Runtime runs: auto, cuda, cpu, or execution providers by name

The command line builds them in one place (cli/) and `pipeline.prune` takes them; a value that
cannot work raises `InvalidArgumentError` here, before any model is read. This module imports no
stage, so every stage may take these types.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxprune.errors import InvalidArgumentError

METHODS = ("global", "uniform", "owl")
DEVICES = ("auto", "cuda", "cpu")
# What validation compares besides the outputs: top-1 (accuracy with labels, agreement) or the
# perplexity of a causal language model's next-token predictions.
METRICS = ("top1", "perplexity")
TARGETS = ("params", "macs")
MODES = ("one-pass", "sequential")
# How calibrated layers' scores meet in the global ranking: row (each output's share of its
# energy, as scored), layer (over the layer's total), lamp (over the layer's scores not below it).
COMPARE = ("row", "layer", "lamp")
DEFAULT_CALIBRATION_BATCH = 16
# Statistics held at once (X^T X is K^2 float64 per layer); more layers take more passes.
DEFAULT_BUDGET_BYTES = 4 << 30
# Each gate's range: accuracy drop and agreement are fractions, cosine a cosine.
GATE_RANGES = {
    "max_accuracy_drop": ("--max-accuracy-drop", 0.0, 1.0),
    "min_agreement": ("--min-agreement", 0.0, 1.0),
    "min_cosine": ("--min-cosine", -1.0, 1.0),
    "max_perplexity_ratio": ("--max-perplexity-ratio", 1.0, math.inf),
}


# Sensitivity's per-layer minimums are weight counts: channel removal takes --min-keep alone.
SENSITIVITY_STRUCTURED = (
    "--sensitivity protects layers' weights from unstructured pruning; with --structured, give "
    "--min-keep instead"
)


def check_sparsity(sparsity: float) -> float:
    """A sparsity in [0, 1), as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise InvalidArgumentError(f"--sparsity {sparsity!r}: must be a number in [0, 1)")
    if not math.isfinite(sparsity):
        raise InvalidArgumentError(f"--sparsity {sparsity!r}: must be a number in [0, 1)")
    if not 0 <= sparsity < 1:
        raise InvalidArgumentError(
            f"--sparsity {sparsity:g}: must be in [0, 1) (0.9 removes 90% of prunable weights)"
        )
    return float(sparsity)


def parse_pattern(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4 consecutive weights along the input-channel axis."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, tuple):
        n, m = spec
    else:
        try:
            n, m = (int(x) for x in str(spec).split(":"))
        except ValueError:
            raise InvalidArgumentError(f"--pattern {spec!r}: write N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise InvalidArgumentError(f"--pattern {spec!r}: need 0 < N < M, e.g. 2:4")
    return int(n), int(m)


def compile_patterns(patterns: Sequence[str] | None, flag: str) -> list[re.Pattern[str]]:
    """--include / --exclude regular expressions, each checked."""
    compiled = []
    for p in patterns or ():
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise InvalidArgumentError(f"{flag} {p!r}: not a regular expression ({exc})") from None
    return compiled


@dataclass(frozen=True)
class MinKeep:
    """Per-layer minimum retention: a fraction of each layer, or an absolute count of weights."""

    fraction: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, spec: MinKeep | str | float | int | None) -> MinKeep | None:
        """A fraction of each layer or a count of weights, told apart by how it is written.

        With a decimal point or a % sign (or as a Python float) it is a fraction: '0.02', '2%',
        '1.0' (= 100%: the layer is kept whole). A whole number without a decimal point (or a
        Python int) is a count of weights: '1' is one weight, '100' a hundred.
        """
        if isinstance(spec, MinKeep):
            return spec
        if spec is None or spec == "":
            return None
        text = str(spec).strip()
        usage = "give a fraction of each layer (0.02, 2% or 1.0) or a count of weights (100)"
        try:
            if isinstance(spec, bool):
                raise ValueError
            if isinstance(spec, int) or type(spec).__name__.startswith(("int", "uint")):
                value, is_fraction = float(spec), False
            elif isinstance(spec, float) or type(spec).__name__.startswith("float"):
                value, is_fraction = float(spec), True
            elif text.endswith("%"):
                value, is_fraction = float(text[:-1]) / 100, True
            else:
                try:
                    value, is_fraction = float(int(text)), False
                except ValueError:
                    value, is_fraction = float(text), True
        except ValueError:
            raise InvalidArgumentError(f"--min-keep {spec!r}: {usage}") from None
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"--min-keep {spec!r}: must be a non-negative number")
        if is_fraction:
            if value > 1:
                raise InvalidArgumentError(
                    f"--min-keep {spec!r}: a fraction (written with a decimal point or %) must "
                    "be at most 1.0 = 100%; a count of weights is a whole number without a "
                    "decimal point, e.g. 100"
                )
            return cls(fraction=value)
        return cls(count=int(value))

    def for_layer(self, size: int) -> int:
        if self.fraction is not None:
            return min(size, math.ceil(self.fraction * size - 1e-9))
        return min(size, self.count or 0)

    def __str__(self) -> str:
        if self.fraction is None:
            return str(self.count)
        text = f"{self.fraction:g}"
        # 0 and 1 as fractions read as counts: say 0% and 100%
        return text if "." in text or "e" in text else f"{100 * self.fraction:g}%"


def parse_sparsities(text: str | Sequence[float]) -> list[float]:
    """'0.5,0.8,0.9' -> [0.5, 0.8, 0.9]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--sparsities {text!r}: give comma-separated numbers, e.g. 0.5,0.8,0.9"
        ) from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise InvalidArgumentError(f"--sparsities {text!r}: each must be in [0, 1)")
    return values


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """['x=1x3x224x224'] -> {'x': (1, 3, 224, 224)}; one entry may name several inputs,
    'ids=1x128,mask=1x128', and 'x=' is a scalar (0-d)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in (part.strip() for entry in specs or () for part in entry.split(",")):
        if not spec:
            continue
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InvalidArgumentError(
                f"--input-shape {spec!r}: write NAME=DIMS, e.g. input=1x3x224x224 (several: "
                "input_ids=1x128,attention_mask=1x128)"
            ) from None
        if 0 in shape:
            raise InvalidArgumentError(
                f"--input-shape {spec!r}: a dimension of 0 makes an empty input; every size must "
                "be at least 1"
            )
        shapes[name] = shape
    return shapes


def parse_batch_axes(specs: Sequence[str] | None) -> dict[str, int]:
    """['state=1'] -> {'state': 1}; one entry may name several inputs, 'a=1,b=0'."""
    axes: dict[str, int] = {}
    for spec in (part.strip() for entry in specs or () for part in entry.split(",")):
        if not spec:
            continue
        name, sep, axis = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            axes[name] = int(axis)
            if axes[name] < 0:
                raise ValueError
        except ValueError:
            raise InvalidArgumentError(
                f"--batch-axis {spec!r}: write NAME=AXIS, e.g. state=1 (the axis of input "
                "'state' that holds the samples)"
            ) from None
    return axes


def check_batch_size(batch_size: int | None) -> None:
    """--batch-size must be a positive count (a huge one is cut to the samples there are)."""
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"--batch-size {batch_size}: must be at least 1")


def parse_provider_options(
    specs: Sequence[str], providers: Sequence[str]
) -> dict[str, dict[str, str]]:
    """--provider-option entries, 'NAME:KEY=VALUE' or 'KEY=VALUE' (for the first --provider),
    grouped by provider: {'TensorRT': {'trt_sparsity_enable': '1'}}."""
    grouped: dict[str, dict[str, str]] = {}
    for spec in specs:
        head, sep, value = spec.partition("=")
        name, colon, key = head.rpartition(":")
        if not sep or not key.strip():
            raise InvalidArgumentError(
                f"--provider-option {spec!r}: write KEY=VALUE or PROVIDER:KEY=VALUE, e.g. "
                "TensorRT:trt_sparsity_enable=1"
            )
        if not colon:
            if not providers:
                raise InvalidArgumentError(
                    f"--provider-option {spec!r}: name the provider it is for with --provider"
                )
            name = providers[0]
        grouped.setdefault(name.strip(), {})[key.strip()] = value.strip()
    return grouped


@dataclass(frozen=True)
class Device:
    """Where ONNX Runtime runs validation and calibration. `name`: auto (CUDA when it can run,
    else the CPU, saying why), cuda or cpu; or `providers`, execution providers by name in
    priority order (TensorRT, OpenVINO, DirectML, CoreML, CUDA, CPU; the short or the full name),
    checked against the installed ONNX Runtime when a session is made, with `options` per
    provider ({"TensorRT": {"trt_sparsity_enable": "1"}}). A plain string means `Device(name)`."""

    name: str = "auto"
    providers: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in DEVICES:
            raise InvalidArgumentError(
                f"--device {self.name!r}: choose one of {', '.join(DEVICES)}"
            )
        object.__setattr__(self, "providers", tuple(self.providers))
        if self.providers and self.name != "auto":
            raise InvalidArgumentError(
                f"--device {self.name} and --provider exclude each other: list the providers in "
                "the order to try them (--provider CUDA --provider CPU)"
            )
        wanted = {p.lower().removesuffix("executionprovider") for p in self.providers}
        for name, settings in self.options.items():
            if name.lower().removesuffix("executionprovider") not in wanted:
                raise InvalidArgumentError(
                    f"--provider-option {name}:...: {name} is not among the --provider values"
                )
            for key, value in settings.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise InvalidArgumentError(
                        f"provider option {key!r}={value!r} of {name}: keys and values are strings"
                    )

    @classmethod
    def of(cls, device: str | Device) -> Device:
        """A `Device` from the shorthand the API takes (a name, or a Device)."""
        return device if isinstance(device, Device) else cls(device)

    def __str__(self) -> str:
        return ",".join(self.providers) if self.providers else self.name


@dataclass(frozen=True)
class Selection:
    """What to prune. `sparsity`: the share of prunable weights (or, structured, of the target
    metric) to remove; `pattern` (N:M, e.g. "2:4") instead keeps N of every M weights along the
    input axis; `method`: one global ranking or the same sparsity per layer; `min_keep`: every
    layer keeps at least this much (MinKeep.parse); `include`/`exclude`: regular expressions
    searched in weight and node names; `sensitivity`: a minimum kept fraction per layer, by
    weight name, on top of `min_keep` (from a sensitivity analysis:
    `validate.sensitivity.protected_keep`, which protects the layers that break when pruned
    alone)."""

    sparsity: float = 0.0
    method: str = "global"
    min_keep: MinKeep | str | float | int | None = None
    pattern: str | tuple[int, int] | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sensitivity: Mapping[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"--method {self.method!r}: choose one of {', '.join(METHODS)}"
            )
        object.__setattr__(self, "min_keep", MinKeep.parse(self.min_keep))
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        for name, flag in (("include", "--include"), ("exclude", "--exclude")):
            value = tuple(getattr(self, name) or ())
            compile_patterns(value, flag)
            object.__setattr__(self, name, value)
        if self.sensitivity is not None:
            keep = dict(self.sensitivity)
            for name, fraction in keep.items():
                ok = isinstance(fraction, int | float) and not isinstance(fraction, bool)
                if not ok or not 0 <= fraction <= 1:
                    raise InvalidArgumentError(
                        f"--sensitivity: layer {name!r} keeps {fraction!r}; a kept fraction is "
                        "in [0, 1]"
                    )
            if self.pattern is not None:
                raise InvalidArgumentError(
                    "--sensitivity raises layers' minimum retention under --sparsity; an N:M "
                    "--pattern keeps N of every M in every layer alike"
                )
            object.__setattr__(self, "sensitivity", keep)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as numbers (None without one)."""
        return self.pattern  # type: ignore[return-value]

    @property
    def keep(self) -> MinKeep | None:
        """The minimum retention, parsed."""
        return self.min_keep  # type: ignore[return-value]


@dataclass(frozen=True)
class Calibration:
    """Samples to rank and repair from. `data`: an .npz path, a folder of .npz shards (read one
    at a time), a mapping of arrays, or an iterable of input dicts (an onnxruntime.quantization
    CalibrationDataReader too); `device`: auto, cuda, cpu or a `Device`; `criterion`: a
    registered importance (onnxprune.scoring: magnitude, wanda, sparsegpt, or your own); `mode`:
    sequential re-measures layers on the model pruned so far (accurate), one-pass measures the
    dense model once (fast); `samples`: use the first N;
    `bias_correction`: fold each pruned layer's
    mean output shift into its bias; `damp`, `budget_bytes`, `compare`, `steps`: solver and
    ranking settings (see calibration/)."""

    data: str | os.PathLike | Mapping[str, Any] | Iterable[Any]
    criterion: str = "sparsegpt"
    mode: str = "sequential"
    samples: int | None = None
    batch_size: int | None = None
    device: str | Device = "auto"
    bias_correction: bool = True
    damp: float = 0.01
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    compare: str = "lamp"
    # structured: channels chosen in this many steps, each re-scoring what is left (None: as
    # many as the layers' sizes allow, the criterion's choice)
    steps: int | None = None
    # input -> the axis its samples are stacked on, where the model's symbolic dims do not say
    # (inputs.batch_axes_of); --batch-axis NAME=K
    batch_axes: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        from onnxprune.scoring import importance

        importance.get(self.criterion)  # a name no importance is registered under is refused
        if self.mode not in MODES:
            raise InvalidArgumentError(
                f"--calibration-mode {self.mode!r}: choose one of {', '.join(MODES)}"
            )
        if self.compare not in COMPARE:
            raise InvalidArgumentError(f"compare {self.compare!r}: choose one of {COMPARE}")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgumentError(f"steps {self.steps}: must be >= 1")
        if self.samples is not None and self.samples < 1:
            raise InvalidArgumentError(f"--calibration-samples {self.samples}: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidArgumentError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise InvalidArgumentError(f"damp {self.damp!r}: must be a positive number")
        check_batch_axes(self.batch_axes)
        object.__setattr__(self, "device", Device.of(self.device))


@dataclass(frozen=True)
class Structured:
    """Channel removal's settings (`prune(structured=Structured(...))`; True means the defaults).

    `target`: `sparsity` counts removed parameters ("params") or multiply-accumulates ("macs");
    `round_to`: channel counts kept multiples of N where a layer allows; `heads`: each attention
    head is one channel, removed whole; `compensate`: without calibration, what removed channels
    still carried (a BatchNorm shift, a Sigmoid's 0.5...) is folded into their readers' biases,
    measured on generated inputs; `input_shapes`: the sizes open dims take there and in MAC
    counts.
    """

    target: str = "params"
    round_to: int | None = None
    heads: bool = False
    compensate: bool = True
    input_shapes: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidArgumentError(
                f"--target {self.target!r}: choose one of {', '.join(TARGETS)}"
            )
        if self.round_to is not None and (int(self.round_to) != self.round_to or self.round_to < 1):
            raise InvalidArgumentError(
                f"--round-to {self.round_to!r}: must be a positive whole number"
            )


@dataclass(frozen=True)
class Save:
    """How `pipeline.prune` writes its output (the path and --force travel beside it).

    `external_data`: weights in a data file beside the model (None: as the input, or when they
    would not fit a 2 GB protobuf); `sparse_storage`: weights as sparse initializers where that
    takes fewer bytes (None: as the input); `check`: onnx.checker with full shape inference on
    the written model before it is moved into place.
    """

    external_data: bool | None = None
    sparse_storage: bool | None = None
    check: bool = True


def check_batch_axes(axes: Mapping[str, int] | None) -> None:
    """--batch-axis values: input names to axes, each a whole number >= 0 (whether the model
    has that input and axis is checked against the model)."""
    for name, axis in (axes or {}).items():
        if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
            raise InvalidArgumentError(f"--batch-axis {name}={axis!r}: must be an axis >= 0")


def check_gate_values(**gates: float | None) -> None:
    """Gate thresholds in range and finite, before any work: a NaN threshold would pass all."""
    for key, value in gates.items():
        if value is None:
            continue
        flag, low, high = GATE_RANGES[key]
        if not (isinstance(value, int | float) and low <= value <= high):
            raise InvalidArgumentError(f"{flag} {value}: must be a number in [{low:g}, {high:g}]")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InvalidArgumentError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Validation:
    """What the pruned model is compared on, against the original, and the gates that fail the
    run (exit 1). `data`: an .npz of inputs (with optional 'labels'), a folder of .npz shards, a
    mapping of arrays or an iterable of input dicts; else inputs are generated (`input_shapes`,
    `seed`); `device`: auto, cuda, cpu or a `Device` naming execution providers; `metric`:
    "perplexity" also scores a causal language model's next-token predictions (logits against
    `input_ids`, padding per `attention_mask` left out), gated by `max_perplexity_ratio`."""

    data: str | os.PathLike | Mapping[str, Any] | Iterable[Any] | None = None
    batch_size: int | None = None
    device: str | Device = "auto"
    input_shapes: dict[str, tuple[int, ...]] | None = None
    seed: int = 0
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    latency: bool = True
    # input -> the axis its samples are stacked on, where the model's symbolic dims do not say
    # (inputs.batch_axes_of); --batch-axis NAME=K
    batch_axes: Mapping[str, int] | None = None
    metric: str = "top1"
    max_perplexity_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidArgumentError(f"--batch-size {self.batch_size}: must be at least 1")
        check_metric(self.metric)
        check_gate_values(**self.gates)
        check_batch_axes(self.batch_axes)
        if self.max_perplexity_ratio is not None and self.metric != "perplexity":
            raise InvalidArgumentError("--max-perplexity-ratio needs --metric perplexity")
        object.__setattr__(self, "device", Device.of(self.device))

    @property
    def gates(self) -> dict[str, float | None]:
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_agreement": self.min_agreement,
            "min_cosine": self.min_cosine,
            "max_perplexity_ratio": self.max_perplexity_ratio,
        }


@dataclass(frozen=True)
class Budget:
    """What a sweep that picks (`sweep.pick`) may lose against the dense model: the highest
    sparsity whose model stays within every limit given wins. At least one limit is needed."""

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    max_perplexity_ratio: float | None = None

    def __post_init__(self) -> None:
        check_gate_values(**self.limits)
        if all(v is None for v in self.limits.values()):
            raise InvalidArgumentError(
                "a sweep that picks needs a budget: --max-accuracy-drop, --min-agreement, "
                "--min-cosine or --max-perplexity-ratio"
            )

    @property
    def limits(self) -> dict[str, float | None]:
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_agreement": self.min_agreement,
            "min_cosine": self.min_cosine,
            "max_perplexity_ratio": self.max_perplexity_ratio,
        }

    def check(self, metric: str) -> None:
        """The limits measurable under `metric`."""
        check_metric(metric)
        if self.max_perplexity_ratio is not None and metric != "perplexity":
            raise InvalidArgumentError("--max-perplexity-ratio needs --metric perplexity")
