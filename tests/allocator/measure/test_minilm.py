"""End to end on the embedded default model (all-MiniLM-L6-v2) at the demo budget."""

import pytest

import allocator
from allocator import sources
from allocator.measure.evaluate import compare


@pytest.mark.slow
def test_plan_beats_uniform_at_12mb_measured():
    loaded = sources.load_model("minilm")
    calib_docs, eval_docs = sources.split_documents(sources.lee_documents(), 64, seed=0)
    calib = sources.text_batches(loaded.tokenizer, calib_docs)
    evals = sources.text_batches(loaded.tokenizer, eval_docs[:96])
    table = allocator.profile(loaded.model, calib, task=loaded.task, draws=2)
    assert len(table.layers) == 39  # 3 embeddings + 36 encoder Linear layers
    plan = allocator.solve(table, budget="12MB")
    assert plan.predicted.bytes <= 12_000_000
    assert plan.solver.status == "optimal"
    best = plan.best_uniform()
    larger = min((u for u in plan.uniform if u.bytes >= plan.predicted.bytes), key=lambda u: u.bytes)
    assert plan.method == "gptq"
    hessians = allocator.layer_hessians(loaded.model, calib, loaded.task)
    result = compare(loaded.model, plan, evals, loaded.task, uniform=[best, larger], hessians=hessians)
    fitting, bigger = result.uniform
    # Measured: better than the best uniform setting that fits, and than the next size up.
    assert result.plan.cosine > fitting.cosine + 0.05
    assert result.plan.cosine > bigger.cosine
    assert result.plan.cosine > 0.98
    # The prediction ranks them the same way, and is close in absolute terms.
    assert plan.predicted.loss < larger.loss < best.loss
    assert 0.5 < result.plan.divergence / plan.predicted.loss < 2.0
