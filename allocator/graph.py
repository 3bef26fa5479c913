"""The layer graph: data flow between quantizable modules, tie groups, forward order.

Nodes are quantizable modules (by qualified name) with attributes `weight` (the `LayerSpec`
name of the tensor they use; modules sharing a weight share it), `kind` and `order` (first
call in the forward pass). Edges follow data flow: from torch.fx where the model traces,
otherwise (models with data-dependent control flow, such as most Hugging Face models) from
forward-hook order, each module linked to the next one called. `graph.graph["source"]` says
which.

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

from .errors import AllocatorError

__all__ = ["TIE_PRESETS", "build_graph", "forward_order", "tie_groups"]

# Preset name -> regex of a layer name; layers with the same group(1) (their parent) are tied.
TIE_PRESETS: dict[str, str] = {
    "qkv": r"^(?:(.*)\.)?(?:query|key|value|q_proj|k_proj|v_proj|q|k|v)$",
    "gate_up": r"^(?:(.*)\.)?(?:gate_proj|up_proj|w1|w3)$",
}


def build_graph(
    model: nn.Module, targets: Sequence[QuantTarget], batch: Any, *, task: Task | None = None
) -> nx.DiGraph:
    """Data-flow graph of the quantizable modules of `model`, from one example batch."""
    graph = nx.DiGraph()
    weight_of: dict[str, str] = {}
    kind_of: dict[str, str] = {}
    for t in targets:
        for name in t.spec.modules:
            weight_of[name] = t.spec.name
            kind_of[name] = t.spec.kind
    order = _call_order(model, targets, batch, task)
    for name in weight_of:
        graph.add_node(name, weight=weight_of[name], kind=kind_of[name], order=order.get(name, len(order)))
    edges = _fx_edges(model, set(weight_of))
    if edges is not None:
        graph.add_edges_from(edges)
        graph.graph["source"] = "fx"
    else:
        called = sorted((n for n in weight_of if n in order), key=order.__getitem__)
        graph.add_edges_from(itertools.pairwise(called))
        graph.graph["source"] = "hooks"
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


def _fx_edges(model: nn.Module, layer_names: set[str]) -> list[tuple[str, str]] | None:
    """Edges between quantizable modules through any chain of other nodes, or None if fx fails."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    edges: list[tuple[str, str]] = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or node.target not in layer_names:
            continue
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.target in layer_names:
                edges.append((str(node.target), str(user.target)))
            else:
                stack.extend(user.users)
    return edges


def forward_order(graph: nx.DiGraph) -> list[str]:
    """Weights in an order where every weight comes after those feeding it (ties by call order)."""
    if nx.is_directed_acyclic_graph(graph):
        modules = list(nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["order"]))
    else:
        modules = sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])
    return list(dict.fromkeys(graph.nodes[m]["weight"] for m in modules))


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
        if not groups:
            raise AllocatorError(f"tie preset {spec!r} matches no group of layers in this model")
        return groups
    patterns = spec.split("|") if isinstance(spec, str) else list(spec)
    if isinstance(spec, str) and len(patterns) == 1 and not any(c in spec for c in "*?["):
        raise AllocatorError(
            f"unknown tie preset {spec!r}; use one of {', '.join(TIE_PRESETS)} or patterns joined by '|'"
        )
    group: list[str] = []
    for p in patterns:
        hits = [weight[n] for n in modules if fnmatch.fnmatchcase(n, p)]
        if not hits:
            raise AllocatorError(f"tie pattern {p!r} matches no quantizable layer")
        group.extend(hits)
    return [list(dict.fromkeys(group))]
