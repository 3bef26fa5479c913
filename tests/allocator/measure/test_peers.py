"""The built-in min/max round-to-nearest peer, and HQQ on shapes its packing cannot split."""

import torch
from torch import nn

from allocator.measure.peers import round_layers_
from profilers.quant.rounding import reconstruct
from profilers.types import Choice


def test_minmax_rounds_each_group_on_its_own_range_and_the_clip_search_does_better():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 8))
    w = net[0].weight.detach().clone()
    w[:, 7] *= 20  # an outlier column stretches the range of the first group of every row
    with torch.no_grad():
        net[0].weight.copy_(w)
    other = net[2].weight.detach().clone()
    round_layers_(net, ["0"], "minmax", 3, 64)
    q = net[0].weight.detach()
    assert len(torch.unique(q[0, :64])) <= 8 and len(torch.unique(q[0, 64:])) <= 8  # 3 bits per group
    step = (w.reshape(16, 2, 64).amax(-1) - w.reshape(16, 2, 64).amin(-1)) / 7
    err = (q - w).abs().reshape(16, 2, 64).amax(-1)
    assert torch.all(err <= step / 2 * 1.01 + 1e-3)  # nearest level of the group's own min..max grid
    torch.testing.assert_close(q.reshape(16, 2, 64).amax(-1), w.reshape(16, 2, 64).amax(-1), atol=2e-3, rtol=1e-3)
    assert torch.equal(net[2].weight, other)  # layers not named stay as they were
    searched = reconstruct(w, Choice(bits=3, group_size=64))
    assert (searched - w).pow(2).sum() < (q - w).pow(2).sum()  # the project's RTN minimises weight error


def test_hqq_rounds_a_convolution_whose_group_count_its_packing_cannot_split():
    # LeNet's first convolution: 6 rows of 25 weights, 6 groups per channel, which HQQ's 2-bit
    # packing (groups in fours) refused. The peer keeps HQQ's codes unpacked: same values.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU())
    w = net[0].weight.detach().clone()
    round_layers_(net, ["0"], "hqq", 2, None)
    q = net[0].weight.detach().reshape(6, 25)
    assert all(len(torch.unique(row)) <= 4 for row in q)  # 2 bits per channel
    assert 0 < (q - w.reshape(6, 25)).abs().mean() < w.abs().mean()
