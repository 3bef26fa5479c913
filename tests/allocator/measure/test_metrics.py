"""Measuring a variant holds one batch of its outputs at a time, and FP outputs too large to keep
are computed again when read: the same row either way."""

import copy
import time

import pytest
import torch

from allocator.measure.metrics import FpOutputs, each_output, measure_outputs
from profilers.tasks import LogitsTask
from tests.lm_models import VOCAB, tiny_lm


def test_fp_outputs_too_large_to_keep_are_recomputed_to_the_same_measurement():
    model, task = tiny_lm("llama"), LogitsTask(causal=True)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, VOCAB, (2, 16), generator=g)} for _ in range(3)]
    variant = copy.deepcopy(model)
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    kept, recomputed = FpOutputs(model, batches, task), FpOutputs(model, batches, task, keep_bytes=0)
    assert kept.kept is not None and len(kept.kept) == 3 and recomputed.kept is None
    rows = [measure_outputs("v", each_output(variant, batches, task), batches, task, ref, size=1, bpw=None,
                            predicted=None, wordsim=None, started=time.perf_counter())
            for ref in (kept, recomputed)]  # fmt: skip
    assert rows[0].divergence > 0 and rows[0].perplexity > 1 and 0 < rows[0].agreement <= 1
    assert rows[1].divergence == pytest.approx(rows[0].divergence, rel=1e-6)
    assert (rows[1].perplexity, rows[1].agreement) == (rows[0].perplexity, rows[0].agreement)
