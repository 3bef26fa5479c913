"""Layer graph: modules in call order, tie groups."""

import pytest
import torch
from torch import nn

from allocator.errors import AllocatorError
from allocator.planning.ties import build_graph, tie_groups
from profilers.layers import find_targets


class Attention(nn.Module):
    """Data-dependent control flow (which torch.fx cannot trace): hooks give the call order."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.dense = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent branch
            x = x * 0
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.dense(att @ v)


def test_graph_nodes_in_call_order_through_data_dependent_control_flow():
    class DenseFirst(Attention):  # registration order (dense first) is not call order
        def __init__(self):
            nn.Module.__init__(self)
            self.dense = nn.Linear(8, 8)
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.Sequential()
    model.add_module("block", DenseFirst())
    graph = build_graph(model, find_targets(model), torch.randn(2, 3, 8))
    by_order = sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])
    assert by_order == ["block.query", "block.key", "block.value", "block.dense"]


def test_tie_presets_and_patterns():
    model = nn.Sequential(Attention(), Attention())
    graph = build_graph(model, find_targets(model), torch.randn(2, 3, 8))
    assert tie_groups(graph, ["qkv"]) == [
        ["0.query", "0.key", "0.value"],
        ["1.query", "1.key", "1.value"],
    ]
    assert tie_groups(graph, ["*.dense"]) == [["0.dense", "1.dense"]]
    # Overlapping groups merge into one.
    assert tie_groups(graph, ["0.query|1.query", "1.query|1.key"]) == [["0.query", "1.query", "1.key"]]
    with pytest.raises(AllocatorError, match="unknown tie preset"):
        tie_groups(graph, ["qvk"])
    with pytest.raises(AllocatorError, match="matches no quantizable layer"):
        tie_groups(graph, ["*.nothing"])


def test_shared_weight_modules_are_one_weight_in_the_graph():
    emb = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = emb.weight

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = LM()
    targets = find_targets(model)
    graph = build_graph(model, targets, torch.randint(0, 20, (2, 5)))
    assert graph.nodes["emb"]["weight"] == graph.nodes["head"]["weight"] == "emb"
    assert graph.nodes["emb"]["order"] < graph.nodes["head"]["order"]
