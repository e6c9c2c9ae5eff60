"""The command line's options, shared by the commands, and their mapping onto the option
dataclasses (onnxprune.options): the one place flags become settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from onnxprune.errors import InvalidArgumentError
from onnxprune.options import METHODS

selection_options = [
    click.option(
        "--method",
        type=click.Choice(METHODS),
        default="global",
        show_default=True,
        help="global: one magnitude ranking over all layers; uniform: the same sparsity "
        "in every layer.",
    ),
    click.option(
        "--min-keep",
        "min_keep",
        default=None,
        metavar="FRACTION|COUNT",
        help="Every layer keeps at least this many of its largest weights: a fraction of the "
        "layer when written with a decimal point or % (0.02, 2%; 1.0 = the whole layer), a "
        "count of weights when a whole number (100; 1 = one weight).",
    ),
    click.option(
        "--include",
        multiple=True,
        metavar="REGEX",
        help="Prune only weights whose name or node name matches (repeatable).",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Never prune weights whose name or node name matches (repeatable).",
    ),
]


run_options = [
    click.option(
        "--data",
        default=None,
        type=click.Path(path_type=str),
        help="Validation data: .npz with one array per model input (by input name) and an "
        "optional 'labels' array, or a folder of such .npz shards (read one at a time). Without "
        "it, inputs are generated from the model.",
    ),
    click.option(
        "--batch-size",
        type=int,
        default=None,
        help="Samples per run, at least 1 (default 32 with --data, 1 for generated inputs, 16 "
        "for --calibration); more than the samples there are runs them as one batch.",
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cuda", "cpu"]),
        default="auto",
        show_default=True,
        help="ONNX Runtime device: auto uses CUDA when it can run, else the CPU (and says why).",
    ),
    click.option(
        "--provider",
        "providers",
        multiple=True,
        metavar="NAME",
        help="An execution provider of the installed ONNX Runtime instead of --device "
        "(repeatable, in priority order): TensorRT, OpenVINO, Dml, CoreML, CUDA, CPU...; the CPU "
        "is added last for what the others cannot run.",
    ),
    click.option(
        "--provider-option",
        "provider_options",
        multiple=True,
        metavar="[NAME:]KEY=VALUE",
        help="An option of a --provider (repeatable), e.g. TensorRT:trt_sparsity_enable=1; "
        "without NAME: the first --provider.",
    ),
    click.option(
        "--input-shape",
        "input_shape",
        multiple=True,
        metavar="NAME=DIMS",
        help="Shape of a generated input, e.g. input=1x3x224x224; several at once as "
        "input_ids=1x128,attention_mask=1x128 or repeated. Needed for symbolic dimensions other "
        "than the batch (a dim named alike in another input takes the same size); MACs are "
        "counted at these shapes.",
    ),
    click.option(
        "--batch-axis",
        "batch_axis",
        multiple=True,
        metavar="NAME=AXIS",
        help="The axis of input NAME that holds the samples, in --data, --calibration and "
        "generated inputs (default: where the input holds the symbolic dim other inputs batch "
        "on, e.g. state [2, N, 128] beside input [N, 512] batches on axis 1; else 0).",
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed of the generated inputs.",
    ),
]

gate_options = [
    click.option(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="FRACTION",
        help="Fail (exit 1) if top-1 accuracy drops by more than this (0.01 = one point).",
    ),
    click.option(
        "--min-agreement",
        type=float,
        default=None,
        metavar="FRACTION",
        help="Fail (exit 1) if top-1 agreement with the original is below this.",
    ),
    click.option(
        "--min-cosine",
        type=float,
        default=None,
        metavar="VALUE",
        help="Fail (exit 1) if any output's cosine similarity to the original is below this.",
    ),
    click.option(
        "--max-perplexity-ratio",
        type=float,
        default=None,
        metavar="RATIO",
        help="With --metric perplexity: fail (exit 1) if the pruned model's perplexity exceeds "
        "the original's times this (1.05 = 5% higher).",
    ),
]

metric_option = click.option(
    "--metric",
    type=click.Choice(["top1", "perplexity"]),
    default="top1",
    show_default=True,
    help="perplexity: also score next-token perplexity of a causal language model (logits "
    "against --data's input_ids; positions where attention_mask is 0 left out).",
)


def report_option(what: str) -> Callable[..., Any]:
    return click.option(
        "--report",
        "report_path",
        default=None,
        type=click.Path(path_type=str),
        help=f"Write {what} as JSON to this file.",
    )


force_option = click.option(
    "--force", is_flag=True, help="Overwrite the files it writes if they exist."
)


structured_options = [
    click.option(
        "--structured",
        is_flag=True,
        help="Remove whole channels (smaller, faster dense model) instead of zeroing weights.",
    ),
    click.option(
        "--round-to",
        "round_to",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="With --structured: keep channel counts multiples of N where a layer allows.",
    ),
    click.option(
        "--target",
        type=click.Choice(["params", "macs"]),
        default="params",
        show_default=True,
        help="With --structured: --sparsity counts removed parameters or multiply-accumulates.",
    ),
    click.option(
        "--heads",
        is_flag=True,
        help="With --structured: remove whole attention heads (Q, K, V rows and the output "
        "projection's columns of a head; the head count in shapes rewritten) instead of "
        "shrinking head_dim in every head alike.",
    ),
]


calibration_option = click.option(
    "--calibration",
    default=None,
    type=click.Path(path_type=str),
    help="Calibration samples: .npz with one array per model input, like --data (labels "
    "ignored), or a folder of .npz shards. Weights are then ranked by what they do on these "
    "samples, and the kept ones repaired (SparseGPT updates, bias correction). With "
    "--structured: channels ranked by the output error their removal causes, and every layer "
    "that read a removed channel re-solved by least squares.",
)

calibration_mode_option = click.option(
    "--calibration-mode",
    "calibration_mode",
    type=click.Choice(["one-pass", "sequential"]),
    default="sequential",
    show_default=True,
    help="sequential: layers measured on the model pruned so far, segment by segment (the "
    "model cut where little is alive, each piece run alone from the activations kept there), "
    "and re-solved against the dense model's outputs (about one forward pass per wave of a "
    "segment, much more accurate); one-pass: every layer measured once on the dense model "
    "(fastest).",
)

calibration_options = [
    calibration_option,
    click.option(
        "--criterion",
        type=click.Choice(["magnitude", "wanda", "sparsegpt"]),
        default=None,
        help="How weights are ranked: magnitude (default without --calibration); with "
        "--calibration: sparsegpt (default; OBS scores and weight updates), wanda "
        "(|w| x input norm, no update) or magnitude. With --structured, how channels are "
        "ranked: sparsegpt (the output error of removing a channel, the layer re-solved), wanda "
        "(its output fluctuation) or magnitude (weight norms); every layer that read a removed "
        "channel is re-solved in each case.",
    ),
    calibration_mode_option,
    click.option(
        "--calibration-samples",
        "calibration_samples",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Use the first N calibration samples (default: all).",
    ),
    click.option(
        "--bias-correction/--no-bias-correction",
        "bias_correction",
        default=True,
        show_default=True,
        help="With --calibration: fold each pruned layer's mean output shift into its bias (a "
        "layer without one keeps it). "
        "With --structured alone: fold what the removed channels still carried (a BatchNorm "
        "shift, an added constant, f(0) != 0) into the biases of the layers that read them.",
    ),
]


def calibration_settings(
    path: str | None,
    criterion: str | None,
    mode: str,
    samples: int | None,
    bias_correction: bool,
    batch_size: int | None,
    device: Any,
    batch_axes: dict[str, int] | None = None,
) -> Any:
    """The Calibration settings the options ask for (None without --calibration)."""
    if path is None:
        given = [
            flag
            for flag, used in (
                ("--calibration-mode", mode != "sequential"),
                ("--calibration-samples", samples is not None),
                ("--no-bias-correction", not bias_correction),
            )
            if used
        ]
        if given:
            raise InvalidArgumentError(f"{given[0]} needs --calibration FILE.npz")
        from onnxprune import pipeline

        return pipeline.calibration_options(None, criterion)
    from onnxprune.options import Calibration

    return Calibration(
        data=path,
        criterion=criterion or "sparsegpt",
        mode=mode,
        samples=samples,
        batch_size=batch_size,
        device=device,
        bias_correction=bias_correction,
        batch_axes=batch_axes or None,
    )


def device_settings(device: str, providers: tuple[str, ...], options: tuple[str, ...]) -> Any:
    """--device, or --provider with its --provider-option entries, as one `Device`."""
    from onnxprune.options import Device, parse_provider_options

    if options and not providers:
        raise InvalidArgumentError("--provider-option needs --provider NAME")
    return Device(device, providers, parse_provider_options(options, providers))


def check_providers(settings: Any) -> None:
    """Provider names refused now, not when a session is first made (or never, without one)."""
    if settings.providers:
        from onnxprune.runtime import resolve_provider

        for name in settings.providers:
            resolve_provider(name)


def structured_settings(
    structured: bool,
    *,
    target: str = "params",
    round_to: int | None = None,
    heads: bool = False,
    compensate: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Any:
    """The Structured settings the command line's flags ask for (None without --structured);
    flags that only mean something for channel removal are refused without it, never ignored."""
    from onnxprune.options import TARGETS, Structured

    if structured:
        return Structured(target, round_to, heads, compensate, input_shapes)
    if target not in TARGETS:
        raise InvalidArgumentError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if heads:
        raise InvalidArgumentError("--heads removes whole attention heads: it needs --structured")
    if target != "params":
        raise InvalidArgumentError(
            f"--target {target} counts what removing whole channels saves: it needs --structured "
            "(zeroed weights count as parameters)"
        )
    if round_to is not None:
        raise InvalidArgumentError(
            f"--round-to {round_to} rounds channel counts: it needs --structured"
        )
    return None


def with_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
