"""Tie groups: weights that must take one choice, resolved on the layer graph.

The layer graph has a node per quantizable module (by qualified name) with attributes
`weight` (the `LayerSpec` name of the tensor it uses; modules sharing a weight share it),
`kind` and `order` (its first call in a forward pass, from hooks).

Tie groups are sets of weights that must take one choice: modules sharing a weight tensor
(always), groups given by name patterns, and presets such as `qkv` (query/key/value of one
attention block, which fused kernels need in one format).
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch
from torch import nn

from profilers.layers import QuantTarget
from profilers.tasks import Task, call_model

from ..errors import AllocatorError

__all__ = ["TIE_PRESETS", "build_graph", "check_tie_specs", "tie_groups"]

# Preset name -> regex of a layer name; layers with the same group(1) (their parent) are tied.
TIE_PRESETS: dict[str, str] = {
    "qkv": r"^(?:(.*)\.)?(?:query|key|value|q_proj|k_proj|v_proj|q|k|v)$",
    "gate_up": r"^(?:(.*)\.)?(?:gate_proj|up_proj|w1|w3)$",
}
# Layers that hold a preset's group as one weight (phi3's qkv_proj and gate_up_proj, GPT-2's c_attn,
# Falcon's query_key_value): one layer, one choice, so the preset holds there as it is.
FUSED_PRESETS: dict[str, str] = {
    "qkv": r"^(?:.*\.)?(?:qkv_proj|query_key_value|c_attn|Wqkv|W_pack)$",
    "gate_up": r"^(?:.*\.)?(?:gate_up_proj|w13)$",
}


def build_graph(
    model: nn.Module, targets: Sequence[QuantTarget], batch: Any, *, task: Task | None = None
) -> nx.DiGraph:
    """The quantizable modules of `model` as graph nodes, in call order on one example batch."""
    graph = nx.DiGraph()
    order = _call_order(model, targets, batch, task)
    for t in targets:
        for name in t.spec.modules:
            graph.add_node(name, weight=t.spec.name, kind=t.spec.kind, order=order.get(name, len(order)))
    return graph


def _call_order(model: nn.Module, targets: Sequence[QuantTarget], batch: Any, task: Task | None) -> dict[str, int]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    order: dict[str, int] = {}

    def record(mod: nn.Module, args: Any, out: Any) -> None:
        order.setdefault(names[id(mod)], len(order))

    handles = [m.register_forward_hook(record) for t in targets for m in t.modules]
    try:
        with torch.no_grad():
            task.forward(model, batch) if task is not None else call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def tie_groups(graph: nx.DiGraph, ties: Sequence[str | Sequence[str]] = ()) -> list[list[str]]:
    """Groups of weights that must share one choice (groups of one left out).

    Modules that share one weight tensor need no group: they are one weight, one decision
    (`LayerSpec.aliases`). Groups here tie *different* weights.

    Args:
        graph: from `build_graph`.
        ties: each entry a preset name (`qkv`, `gate_up`), a list of fnmatch patterns whose
            matching layers form one group, or a single pattern string with `|` between
            alternatives (`"*.query|*.key"`).

    Raises:
        AllocatorError: an unknown preset or a pattern that matches no layer.
    """
    ties_graph = nx.Graph()
    weights = {graph.nodes[n]["weight"] for n in graph.nodes}
    ties_graph.add_nodes_from(weights)
    for spec in ties:
        for group in _resolve_tie(graph, spec):
            ties_graph.add_edges_from(itertools.pairwise(group))
    order = {graph.nodes[n]["weight"]: graph.nodes[n]["order"] for n in graph.nodes}
    groups = []
    for comp in nx.connected_components(ties_graph):
        if len(comp) > 1:
            groups.append(sorted(comp, key=lambda w: (order.get(w, 0), w)))
    return sorted(groups, key=lambda g: (order.get(g[0], 0), g[0]))


def _resolve_tie(graph: nx.DiGraph, spec: str | Sequence[str]) -> list[list[str]]:
    modules = sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])
    weight = {n: graph.nodes[n]["weight"] for n in modules}
    if isinstance(spec, str) and spec in TIE_PRESETS:
        pattern = re.compile(TIE_PRESETS[spec])
        by_parent: dict[str, list[str]] = {}
        for n in modules:
            if m := pattern.match(n):
                by_parent.setdefault(m.group(1) or "", []).append(weight[n])
        groups = [list(dict.fromkeys(g)) for g in by_parent.values() if len(set(g)) > 1]
        if not groups and not any(re.match(FUSED_PRESETS[spec], n) for n in modules):
            raise AllocatorError(
                f"tie preset {spec!r} matches no group of layers in this model (nor a fused layer such as"
                f" qkv_proj); name the layers with patterns joined by '|' instead"
            )
        return groups
    check_tie_specs([spec])
    patterns = spec.split("|") if isinstance(spec, str) else list(spec)
    group: list[str] = []
    for p in patterns:
        hits = [weight[n] for n in modules if fnmatch.fnmatchcase(n, p)]
        if not hits:
            raise AllocatorError(f"tie pattern {p!r} matches no quantizable layer")
        group.extend(hits)
    return [list(dict.fromkeys(group))]


def check_tie_specs(ties: Sequence[str | Sequence[str]]) -> None:
    """Refuse a tie that is neither a preset nor a pattern (checked before any model is loaded).

    Raises:
        AllocatorError: a single name without wildcards that no preset has.
    """
    for spec in ties:
        if isinstance(spec, str) and spec not in TIE_PRESETS and "|" not in spec and not any(c in spec for c in "*?["):
            raise AllocatorError(
                f"unknown tie preset {spec!r}; use one of {', '.join(TIE_PRESETS)} or patterns joined by '|'"
            )


def profiled_ties(
    model: nn.Module,
    targets: Sequence[QuantTarget],
    batch: Any,
    task: Task | None,
    profiled: Sequence[str],
    ties: Sequence[str | Sequence[str]],
) -> list[list[str]]:
    """`tie_groups` of a model, limited to the `profiled` layers (those that never ran stay
    fp16 and need no tie)."""
    graph = build_graph(model, targets, batch, task=task)
    keep = set(profiled)
    return [[n for n in g if n in keep] for g in tie_groups(graph, ties)]
