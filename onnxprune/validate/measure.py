"""Validate: run two models on the same inputs in ONNX Runtime and say what pruning cost.

The reference and the candidate run in the same runtime (CUDA when it works, else CPU, and the
provider that really ran is what gets reported), on the same batches: the user's data or generated
inputs. The result holds accuracy, agreement, per-output errors, latency and the models' costs;
`check_gates` turns it into pass or fail for CI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune import inputs as _inputs
from onnxprune.core.progress import notice_once
from onnxprune.errors import (
    DataError,
    ModelLoadError,
)
from onnxprune.inputs.readers import (
    FirstStepBatches,
    Samples,
    first_step_inputs,
    sample_keys,
)
from onnxprune.options import Device, check_metric
from onnxprune.runtime import (  # noqa: F401  (re-exported)
    CPU,
    CUDA,
    DEVICES,
    Placement,
    Runtime,
    cuda_problem,
    open_session,
    select_runtime,
)
from onnxprune.storage import io
from onnxprune.validate import metrics
from onnxprune.validate.metrics import (
    DiffAccumulator,
    Latency,
    ModelCost,
    OutputDiff,
    model_cost,
    top1,
)

log = logging.getLogger("onnxprune")

WARMUP = 3
REPEATS = 20
# Latency stops early after this long (at least MIN_REPEATS runs), so big models stay usable.
LATENCY_BUDGET_S = 5.0
MIN_REPEATS = 3

ModelSource = str | os.PathLike | ir.Model
IN_MEMORY = "(in memory)"


def measure_latency(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    *,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    budget_s: float = LATENCY_BUDGET_S,
    io_binding: bool | None = None,
    axes: dict[str, int | None] | None = None,
) -> Latency:
    """Milliseconds per run on one batch after warm-up (`measure_latencies` of one session)."""
    return measure_latencies(
        [(session, feeds)], warmup=warmup, repeats=repeats, budget_s=budget_s,
        io_binding=io_binding, axes=axes,
    )[0]  # fmt: skip


def measure_latencies(
    timed: Sequence[tuple[ort.InferenceSession, dict[str, np.ndarray]]],
    *,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    budget_s: float = LATENCY_BUDGET_S,
    io_binding: bool | None = None,
    axes: dict[str, int | None] | None = None,
) -> list[Latency]:
    """Milliseconds per run of each (session, batch), timed in turns, one run of each after the
    other: a machine that gets busier or quieter meanwhile weighs on every model alike, so
    their ratio holds where separate timings drift (the "is it faster?" question).

    On CUDA (or with `io_binding=True`) inputs are copied to the device once and outputs stay
    there (IO binding), so host-device copies are not timed, only the model.
    """
    runners = [_runner(session, feeds, io_binding) for session, feeds in timed]
    for once in runners:
        for _ in range(warmup):
            once()
    times: list[list[float]] = [[] for _ in runners]
    deadline = time.perf_counter() + budget_s * len(runners)
    while len(times[0]) < repeats and (
        len(times[0]) < MIN_REPEATS or time.perf_counter() < deadline
    ):
        for once, spent in zip(runners, times, strict=True):
            start = time.perf_counter()
            once()
            spent.append(time.perf_counter() - start)
    return [
        Latency.from_seconds(spent, _inputs.batch_rows(feeds, axes))
        for spent, (_, feeds) in zip(times, timed, strict=True)
    ]


def _runner(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], io_binding: bool | None
) -> Callable[[], None]:
    """One timed run of the session on the batch (with IO binding on CUDA)."""
    names = [o.name for o in session.get_outputs()]
    on_cuda = session.get_providers()[0] == CUDA
    if io_binding or (io_binding is None and on_cuda):
        device = "cuda" if on_cuda else "cpu"
        binding = session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, device)

        def bound() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return bound

    def once() -> None:
        session.run(names, feeds)

    return once


# ---------------------------------------------------------------------------------------------
# one model


@dataclass
class ModelResult:
    """One model's own numbers."""

    path: str
    providers: list[str]
    cost: ModelCost | None
    latency: Latency | None = None
    accuracy: float | None = None
    placement: Placement | None = None  # nodes per provider, off the CPU
    perplexity: float | None = None  # with metric "perplexity"
    tokens: int | None = None  # the predicted tokens it averages over

    def to_dict(self) -> dict[str, Any]:
        scored = (
            {} if self.tokens is None else {"perplexity": self.perplexity, "tokens": self.tokens}
        )
        return {
            "path": self.path,
            "providers": self.providers,
            "placement": None if self.placement is None else self.placement.to_dict(),
            "accuracy": self.accuracy,
            **scored,
            "latency_ms": None
            if self.latency is None
            else {
                "median": self.latency.median_ms,
                "p90": self.latency.p90_ms,
                "runs": self.latency.runs,
                "batch_size": self.latency.batch_size,
            },
            **(self.cost.to_dict() if self.cost else {}),
        }


@dataclass
class Run:
    """A model's result plus its raw outputs, kept so that a sweep runs the reference once."""

    result: ModelResult
    output_names: list[str]
    outputs: list[list[np.ndarray]]
    predictions: np.ndarray | None


def run_model(
    path: str | os.PathLike,
    data: _inputs.Inputs,
    runtime: Runtime,
    specs: Sequence[_inputs.InputSpec],
    *,
    latency: bool = True,
    cost: bool = True,
    session: ort.InferenceSession | None = None,
    metric: str = "top1",
) -> Run:
    """Run every batch; then read the model's costs and time one batch unless told not to.
    With `metric` "perplexity", the next-token perplexity of its logits on the input ids."""
    session = session or open_session(path, runtime)
    needed = {arg.name for arg in session.get_inputs()}
    missing = sorted(needed - {s.name for s in specs})
    if missing:
        raise DataError(
            f"{path} needs input {missing[0]!r}, which the reference model does not have: "
            "the models are not comparable"
        )
    names = [o.name for o in session.get_outputs()]
    declared = {s.name: s.shape for s in _inputs.input_specs(session)}
    scorer = _perplexity_scorer(session, specs) if metric == "perplexity" else None
    outputs = []
    for i, batch in enumerate(data.batches):
        feeds = _inputs.fit_empty({k: v for k, v in batch.items() if k in needed}, declared)
        try:
            outputs.append(session.run(names, feeds))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{path}: ONNX Runtime failed on batch {i + 1}: {reason}") from None
        if scorer is not None:
            accumulator, index = scorer
            logits = np.asarray(outputs[-1][index])
            accumulator.update(logits, batch[metrics.TOKENS], batch.get(metrics.MASK))
        if i == 0 and data.labels is not None and names:
            # where the model's file does not say how many classes, its first output does
            first = np.asarray(outputs[0][0])
            if first.ndim == 2:
                _inputs.check_labels(data.labels, int(first.shape[1]), data.source)
    heads = [top1(np.asarray(out[0])) for out in outputs]
    predictions = None if any(h is None for h in heads) else np.concatenate(heads)
    accuracy = None
    if predictions is not None and data.labels is not None:
        accuracy = metrics.accuracy(predictions, data.labels)
    result = ModelResult(
        path=str(path),
        providers=list(session.get_providers()),
        placement=getattr(session, "onnxprune_placement", None),
        cost=model_cost(path, data.sample_shapes(specs), data.sample_values()) if cost else None,
        accuracy=accuracy,
    )
    if scorer is not None:
        result.perplexity, result.tokens = scorer[0].result(), scorer[0].tokens
    if latency:
        result.latency = measure_latency(session, _first_batch(session, data), axes=data.batch_axes)
    return Run(result, names, outputs, predictions)


def _perplexity_scorer(
    session: ort.InferenceSession, specs: Sequence[_inputs.InputSpec]
) -> tuple[metrics.PerplexityAccumulator, int]:
    """The accumulator and the logits output's index; a model that is no causal language model
    (no input_ids input, no [batch, sequence, vocabulary] output) is refused in one line."""
    if metrics.TOKENS not in {s.name for s in specs}:
        raise DataError(
            f"--metric perplexity reads token ids from an input named {metrics.TOKENS!r}; the "
            f"model's inputs are {', '.join(s.name for s in specs)}"
        )
    outputs = session.get_outputs()
    index = metrics.logits_index([o.name for o in outputs], [tuple(o.shape) for o in outputs])
    if index is None:
        raise DataError(
            "--metric perplexity needs next-token logits: an output named 'logits' or one shaped "
            "[batch, sequence, vocabulary]"
        )
    return metrics.PerplexityAccumulator(), index


def _first_batch(session: ort.InferenceSession, data: _inputs.Inputs) -> dict[str, np.ndarray]:
    needed = {arg.name for arg in session.get_inputs()}
    return {k: v for k, v in data.batches[0].items() if k in needed}


@contextlib.contextmanager
def model_file(model: ModelSource, name: str = "model.onnx") -> Iterator[Path]:
    """A path ONNX Runtime can open: the file itself, or an in-memory model saved to a temp dir."""
    if not isinstance(model, ir.Model):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="onnxprune-")
    try:
        yield io.save_model(model, Path(tmp) / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_inputs(
    session: ort.InferenceSession,
    *,
    data: Samples | None = None,
    batch_size: int | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    model: str | os.PathLike | None = None,
    batch_axes: dict[str, int] | None = None,
    metric: str = "top1",
) -> tuple[list[_inputs.InputSpec], _inputs.Inputs]:
    """The reference session's input specs, and the batches: the user's data (an .npz, a folder
    of shards, arrays, an iterable of input dicts) or generated ones (integers in the range
    `model`'s graph can use, when its path is given). Each input is batched on its batch axis
    (`inputs.batch_axes_of`; `batch_axes` overrides). For perplexity, a KV-cache decoder's
    position ids and pasts may be left out of the data (its first step: `first_step_inputs`)."""
    _inputs.check_batch_size(batch_size)
    specs = _inputs.input_specs(session, batch_axes)
    if data is None:
        usable = _inputs.usable_values(io.load_model(model), specs) if model is not None else None
        return specs, _inputs.generate(
            specs, shapes=input_shapes, batch_size=batch_size, seed=seed, usable=usable
        )
    derived = first_step_inputs(specs, sample_keys(data)) if metric == "perplexity" else []
    fed = [s for s in specs if s not in derived]
    prepared = _inputs.read_samples(data, fed, batch_size=batch_size)
    if derived:
        prepared.batches = FirstStepBatches(prepared.batches, specs)
        prepared.notices.append(
            f"{', '.join(s.name for s in derived)}: not in the data; fed as a decoder's first "
            "step (positions from attention_mask, empty pasts)"
        )
    if prepared.labels is not None:
        _inputs.check_labels(prepared.labels, _classes(session), prepared.source)
    if input_shapes:
        _inputs.check_shape_names(input_shapes, [s.name for s in specs])
    if input_shapes:
        prepared.notices.append("--input-shape is ignored: the shapes come from --data")
    return specs, prepared


def _classes(session: ort.InferenceSession) -> int | None:
    """The fixed width of a first output shaped [batch, classes], as the session declares it."""
    outputs = session.get_outputs()
    shape = outputs[0].shape if outputs else None
    if shape and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return int(shape[1])
    return None


@dataclass
class Baseline:
    """The dense model run once on the inputs: what a sweep's or a sensitivity analysis's every
    candidate is compared with, on the same runtime, specs and batches."""

    path: Path
    runtime: Runtime
    specs: list[_inputs.InputSpec]
    inputs: _inputs.Inputs
    reference: Run


@contextlib.contextmanager
def baseline(
    model: ModelSource,
    *,
    data: Samples | None = None,
    batch_size: int | None = None,
    device: str | Device = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    metric: str = "top1",
    batch_axes: dict[str, int] | None = None,
    latency: bool = False,
    cost: bool = True,
) -> Iterator[Baseline]:
    """Open `model` once, prepare the batches (the user's data or generated inputs) and run it:
    the reference every candidate is compared with, so that it runs only once."""
    check_metric(metric)
    runtime = select_runtime(device)
    if runtime.note:
        notice_once(runtime.note)
    with model_file(model) as path:
        session = open_session(path, runtime)
        specs, inputs = prepare_inputs(
            session, data=data, batch_size=batch_size, input_shapes=input_shapes, seed=seed,
            model=path, metric=metric, batch_axes=batch_axes,
        )  # fmt: skip
        for notice in inputs.notices:
            log.info("%s", notice)
        reference = run_model(
            path, inputs, runtime, specs, latency=latency, cost=cost, session=session,
            metric=metric,
        )  # fmt: skip
        del session
        yield Baseline(path, runtime, specs, inputs, reference)


# ---------------------------------------------------------------------------------------------
# two models


@dataclass
class Validation:
    """Reference against candidate on the same inputs and runtime."""

    reference: ModelResult
    candidate: ModelResult
    outputs: list[OutputDiff]
    agreement: float | None
    samples: int
    batch_size: int
    inputs: str
    labels: bool
    device: str
    note: str | None = None
    notices: list[str] = field(default_factory=list)
    generated: bool = False  # inputs made up from the model's types, not the user's samples
    agreement_note: str | None = None  # why there is no top-1 agreement, where there is none
    metric: str = "top1"

    @property
    def perplexity_ratio(self) -> float | None:
        """Candidate perplexity over the reference's (with metric "perplexity")."""
        ref, cand = self.reference.perplexity, self.candidate.perplexity
        if ref is None or cand is None or ref <= 0:
            return None
        return cand / ref

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference.accuracy is None or self.candidate.accuracy is None:
            return None
        return self.reference.accuracy - self.candidate.accuracy

    @property
    def min_cosine(self) -> float | None:
        return min((o.cosine for o in self.outputs), default=None)

    @property
    def provider(self) -> str:
        return self.candidate.providers[0] if self.candidate.providers else "?"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "provider": self.provider,
            "note": self.note,
            "inputs": self.inputs,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "labels": self.labels,
            "generated_inputs": self.generated,
            "accuracy_drop": self.accuracy_drop,
            "top1_agreement": self.agreement,
            "top1_agreement_note": self.agreement_note,
            "min_cosine": self.min_cosine,
            **(
                {"metric": self.metric, "perplexity_ratio": self.perplexity_ratio}
                if self.metric != "top1"
                else {}
            ),
            "outputs": [asdict(o) for o in self.outputs],
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict(),
            "notices": self.notices,
        }


def compare(reference: Run, candidate: Run) -> list[OutputDiff]:
    """Per-output differences; outputs pair by name, or by position when the names differ."""
    ref_names, cand_names = reference.output_names, candidate.output_names
    if set(ref_names) == set(cand_names):
        where = {n: j for j, n in enumerate(cand_names)}
        pairs = [(i, where[n]) for i, n in enumerate(ref_names)]
    elif len(ref_names) == len(cand_names):
        pairs = [(i, i) for i in range(len(ref_names))]
    else:
        raise DataError(
            f"the models have {len(ref_names)} and {len(cand_names)} outputs: not comparable"
        )
    diffs = []
    for i, j in pairs:
        acc = DiffAccumulator(reference.output_names[i])
        for ref_out, cand_out in zip(reference.outputs, candidate.outputs, strict=True):
            acc.update(np.asarray(ref_out[i]), np.asarray(cand_out[j]))
        diffs.append(acc.result())
    return diffs


def agreement(reference: Run, candidate: Run) -> float | None:
    """Top-1 agreement of two runs on the same inputs; None without a [batch, classes] output
    of at least 2 classes (agreement_note says why)."""
    if reference.predictions is None or candidate.predictions is None:
        return None
    return metrics.agreement(reference.predictions, candidate.predictions)


def agreement_note(run: Run) -> str | None:
    """Why a run has no top-1 predictions (None where it has them)."""
    if run.predictions is not None:
        return None
    if not run.outputs or not run.outputs[0]:
        return "no top-1: the model has no outputs"
    first = np.asarray(run.outputs[0][0])
    name = run.output_names[0]
    if first.ndim == 2:
        entries = "entry" if first.shape[1] == 1 else "entries"
        return (
            f"no top-1: output {name!r} has {first.shape[1]} {entries} on its class axis (shape "
            f"{list(first.shape)}); agreement needs at least {metrics.MIN_CLASSES} classes, since "
            "one value always agrees"
        )
    return (
        f"no top-1: output {name!r} has shape {list(first.shape)}, not [batch, classes] with at "
        f"least {metrics.MIN_CLASSES} classes"
    )


def validate(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    data: Samples | None = None,
    batch_size: int | None = None,
    device: str | Device = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    latency: bool = True,
    batch_axes: dict[str, int] | None = None,
    metric: str = "top1",
) -> Validation:
    """Run both models on the same inputs and compare; either may be a path or an `ir.Model`.
    `data`: an .npz path, a folder of .npz shards, arrays, or an iterable of input dicts;
    `device`: auto, cuda, cpu or a `Device` naming execution providers; `metric` "perplexity"
    also scores both models' next-token predictions; `batch_axes` (input -> axis) overrides the
    batch axes read from the model."""
    check_metric(metric)
    runtime = select_runtime(device)
    if runtime.note:
        notice_once(runtime.note)
    with contextlib.ExitStack() as stack:
        ref_path = stack.enter_context(model_file(reference, "reference.onnx"))
        cand_path = stack.enter_context(model_file(candidate, "candidate.onnx"))
        session = open_session(ref_path, runtime)
        specs, data_ = prepare_inputs(
            session,
            data=data,
            batch_size=batch_size,
            input_shapes=input_shapes,
            seed=seed,
            model=ref_path,
            batch_axes=batch_axes,
            metric=metric,
        )
        for notice in data_.notices:
            log.info("%s", notice)
        # Costs (gzip of both files, zero counts) are read in threads while the models run;
        # latency is timed only after they are done, with nothing else busy.
        shapes, values = data_.sample_shapes(specs), data_.sample_values()
        with ThreadPoolExecutor(max_workers=2) as pool:
            costs = [pool.submit(model_cost, p, shapes, values) for p in (ref_path, cand_path)]
            ref_run = run_model(
                ref_path, data_, runtime, specs, latency=False, cost=False, session=session,
                metric=metric,
            )  # fmt: skip
            del session
            cand_run = run_model(
                cand_path, data_, runtime, specs, latency=False, cost=False, metric=metric
            )
            ref_run.result.cost, cand_run.result.cost = (c.result() for c in costs)
        if latency:  # both timed in turns: their ratio is what the user asks of pruning
            sessions = [open_session(path, runtime) for path in (ref_path, cand_path)]
            timed = [(session, _first_batch(session, data_)) for session in sessions]
            ref_run.result.latency, cand_run.result.latency = measure_latencies(
                timed, axes=data_.batch_axes
            )
            del sessions, timed
    for run, source in ((ref_run, reference), (cand_run, candidate)):
        if isinstance(source, ir.Model):
            run.result.path = IN_MEMORY
    return Validation(
        reference=ref_run.result,
        candidate=cand_run.result,
        outputs=compare(ref_run, cand_run),
        agreement=agreement(ref_run, cand_run),
        samples=data_.samples,
        batch_size=data_.batch_size,
        inputs=data_.source,
        labels=data_.labels is not None,
        device=runtime.device,
        note=runtime.note,
        notices=list(data_.notices),
        generated=data_.generated,
        agreement_note=agreement_note(ref_run),
        metric=metric,
    )
