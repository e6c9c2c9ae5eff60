"""The structured-pruning part of a report: channels per layer, frozen groups and why, totals."""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxprune.channels import Layer, Unreached
from onnxprune.report.tables import format_table, human_count
from onnxprune.selection.channels import ChannelPlan

NAME_WIDTH = 44
SHOWN_LAYERS = 3


def _names(plan: ChannelPlan, layers: list[int]) -> str:
    names = [plan.graph.layers[i].name for i in layers[:SHOWN_LAYERS]]
    more = len(layers) - SHOWN_LAYERS
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _short(name: str) -> str:
    if len(name) <= NAME_WIDTH:
        return name
    return name[: NAME_WIDTH // 2 - 1] + "…" + name[-(NAME_WIDTH - NAME_WIDTH // 2) :]


def channel_dict(plan: ChannelPlan) -> dict[str, Any]:
    """The numbers of a structured run, as JSON-ready data (the same the table shows)."""
    graph = plan.graph
    params, macs = plan.params, plan.macs
    return {
        "structured": True,
        "target_metric": plan.metric,
        "target_sparsity": plan.target,
        "achieved_sparsity": plan.achieved,
        "min_keep": None if plan.min_keep is None else str(plan.min_keep),
        "round_to": plan.round_to,
        "params": {"before": params[0], "after": params[1]},
        # MACs of the prunable layers for one sample; unknown (None) where they depend on sizes
        # the model leaves open, listed in "open"
        "macs": {
            "before": None if plan.macs_open else macs[0],
            "after": None if plan.macs_open else macs[1],
            "complete": not plan.macs_open,
            "open": plan.macs_open,
            "at": plan.macs_at,
        },
        "channels_removed": int(plan.removed.sum()),
        # the most of the target metric whole channels can remove (under --min-keep)
        "reach": plan.reach,
        "layers": [
            {
                "name": layer.name,
                "op": layer.op_type,
                "weight": layer.member.value.name,
                "channels": len(layer.classes),
                "kept": plan.kept_of(layer.classes),
                **_frozen_of(plan, layer),
            }
            for layer in graph.layers
        ],
        # with heads as channel classes (channels.build(heads=True)): heads kept per attention
        "attention_heads": [
            {
                "name": entry.name,
                "heads": len(entry.classes),
                "kept": entry.kept(plan.removed),
                "head_dim": entry.head_dim,
                "frozen": int(graph.frozen[entry.classes].sum()),
            }
            for entry in graph.heads
        ],
        "frozen_groups": [
            {
                "layers": [graph.layers[i].name for i in group.layers],
                "channels": len(group.classes),
                "frozen": group.frozen,
                "reasons": group.reasons,
            }
            for group in graph.groups
            if group.frozen
        ],
        # prunable weights no layer above stands for, left whole: why
        "unreached": [dataclasses.asdict(u) for u in graph.unreached],
        "warnings": list(plan.warnings),
    }


def _macs(plan: ChannelPlan) -> str:
    """The MACs of the prunable layers before -> after, or why they are not known here."""
    before, after = plan.macs
    if not plan.macs_open:
        at = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in plan.macs_at.items())
        return f"MACs {human_count(before)} -> {human_count(after)}" + (f" at {at}" if at else "")
    return (
        f"MACs unknown ({len(plan.macs_open)} layers depend on sizes the model leaves open, "
        f"e.g. {plan.macs_open[0]!r}: `onnxprune validate` counts them at the shapes it runs)"
    )


def format_channels(plan: ChannelPlan) -> str:
    """Per-layer channels before/after, the heads kept per attention (when heads are classes),
    then the frozen groups with their reasons."""
    graph = plan.graph
    params = plan.params
    lines = [
        format_table(["layer", "op", "channels", "kept", "kept %", "note"], _rows(plan), left=2)
    ]
    if graph.heads:
        heads = [
            [
                _short(entry.name),
                str(len(entry.classes)),
                str(entry.kept(plan.removed)),
                str(entry.head_dim),
                str(int(graph.frozen[entry.classes].sum())),
            ]
            for entry in graph.heads
        ]
        lines.append(format_table(["attention", "heads", "kept", "head dim", "frozen"], heads))
        total = sum(len(entry.classes) for entry in graph.heads)
        kept = sum(entry.kept(plan.removed) for entry in graph.heads)
        lines.append(f"heads {total} -> {kept} in {len(graph.heads)} attention blocks")
    lines.append(
        f"params {human_count(params[0])} -> {human_count(params[1])}, {_macs(plan)}: target "
        f"{plan.metric} "
        f"sparsity {plan.target:g}, achieved {plan.achieved:.4f}"
        + (f", min-keep {plan.min_keep}" if plan.min_keep else "")
        + (f", round-to {plan.round_to}" if plan.round_to else "")
    )
    if plan.reach is not None:
        before = (plan.macs if plan.metric == "macs" else params)[0]
        share = plan.reach / max(before, 1)
        held = "frozen groups, model inputs and outputs, one channel per layer" + (
            ", --min-keep" if plan.min_keep else ""
        )
        lines.append(
            f"reach: whole channels can remove at most {share:.0%} of the {plan.metric} ({held} "
            f"hold the rest): --sparsity {plan.target:g} is {plan.target / max(share, 1e-12):.0%}"
            " of that"
        )
    for group in graph.groups:
        if group.frozen:
            why = "; ".join(group.reasons) or "no reason recorded"
            lines.append(
                f"frozen: {group.frozen} of {len(group.classes)} channels of "
                f"{_names(plan, group.layers)}: {why}"
            )
    lines += _unreached_lines(graph.unreached)
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _frozen_of(plan: ChannelPlan, layer: Layer) -> dict[str, Any]:
    """How many of a layer's channels are frozen, and why."""
    graph = plan.graph
    frozen = graph.frozen[layer.classes]
    return {"frozen": int(frozen.sum()), "reasons": graph.reasons_of(layer.classes[frozen])}


def _rows(plan: ChannelPlan) -> list[list[str]]:
    """The table's rows in graph order: every layer, and every weight no layer stands for
    (channels kept whole, noted "not reached"; the reasons follow the table)."""
    graph = plan.graph
    unreached = sorted(graph.unreached, key=lambda u: u.after)
    rows = []

    def add_unreached(upto: int) -> None:
        while unreached and unreached[0].after <= upto:
            u = unreached.pop(0)
            n = "-" if u.channels is None else str(u.channels)
            rows.append([_short(u.name), u.op_type, n, n, "100.0%", "not reached"])

    for i, layer in enumerate(graph.layers):
        add_unreached(i)
        before, after = len(layer.classes), plan.kept_of(layer.classes)
        frozen = _frozen_of(plan, layer)["frozen"]
        note = "frozen" if frozen == before else f"{frozen} frozen" if frozen else ""
        rows.append(
            [
                _short(layer.name),
                layer.op_type,
                str(before),
                str(after),
                f"{100 * after / before:.1f}%",
                note,
            ]
        )
    add_unreached(len(graph.layers))
    return rows


def _unreached_lines(unreached: list[Unreached]) -> list[str]:
    """One line per reason for the weights channel removal leaves whole."""
    by_reason: dict[str, list[Unreached]] = {}
    for u in unreached:
        by_reason.setdefault(u.reason, []).append(u)
    lines = []
    for reason, items in by_reason.items():
        names = [u.name for u in items[:SHOWN_LAYERS]]
        more = len(items) - SHOWN_LAYERS
        params = sum(u.params for u in items)
        lines.append(
            f"not reached: {len(items)} layer(s), {human_count(params)} params ("
            + ", ".join(names)
            + (f" and {more} more" if more > 0 else "")
            + f"): {reason}"
        )
    return lines
