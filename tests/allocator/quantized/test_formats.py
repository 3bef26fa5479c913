"""Plans converted for GPTQModel and llama.cpp: what survives, and notes for what does not."""

from allocator.planning.plan import Plan, Predicted, SolverReport
from allocator.quantized.formats import gptqmodel_dynamic, llama_cpp_tensor_types
from profilers.types import Choice
from profilers.types import encode_indices as enc


def _plan(choices):
    from allocator.planning.plan import LayerPlan

    layers = {}
    for name, label in choices.items():
        c = Choice.parse(label)
        rows = enc(list(range(c.extra_rows(8)))) if c.extra else None
        layers[name] = LayerPlan(choice=c, shape=(8, 64), bytes=1, bops=0, loss=0.0, extra_rows=rows)
    return Plan(
        model_fingerprint="x", data_fingerprint="y", profiler="fisher", loss_units="u", budgets=(), limits={},
        fixed_bytes=0, layers=layers, predicted=Predicted(bytes=1, quantized_bytes=1, bpw=1.0, bops=0, loss=0.0),
        solver=SolverReport(method="auto", backend="greedy", status="optimal", objective=0, lower_bound=0, gap=0),
    )  # fmt: skip


def test_gptqmodel_dynamic_keeps_what_it_can_and_says_what_it_drops():
    plan = _plan(
        {
            "a.q": "int4-g128",
            "a.k": "int4-g128",
            "a.v": "int8-ch",
            "a.o": "fp16",
            "b.up": "int4x2t-g64",  # tied: exactly an 8-bit grid
            "b.down": "int2x2-g64",  # residual terms: not expressible
            "b.gate": "int3+1/4-g128",  # fraction: base exported
            "embed_tokens": "int3-ch",
        }
    )
    config, notes = gptqmodel_dynamic(plan)
    assert (config["bits"], config["group_size"]) == (4, 128)
    dyn = config["dynamic"]
    assert dyn["+:^a\\.v$"] == {"bits": 8, "group_size": -1}
    assert dyn["-:^a\\.o$"] == {}
    assert dyn["+:^b\\.up$"] == {"bits": 8, "group_size": 64}
    assert dyn["+:^b\\.down$"] == {"bits": 4, "group_size": 64}
    assert dyn["+:^b\\.gate$"] == {"bits": 3, "group_size": 128}
    assert "+:^a\\.q$" not in dyn and not any("embed_tokens" in k for k in dyn)
    joined = " ".join(notes)
    assert "b.down: 2 residual terms" in joined and "not equivalent" in joined
    assert "b.gate: extra term on 1/4" in joined and "embed_tokens: embedding" in joined
    assert not any("b.up" in n for n in notes)


def test_llama_cpp_lines():
    plan = _plan({"blk.q": "int4-g64", "blk.o": "fp16", "blk.d": "int4x2t-g64", "blk.u": "int2-ch"})
    lines, notes = llama_cpp_tensor_types(plan)
    assert lines == [
        "--tensor-type blk.q.weight=q4_K",
        "--tensor-type blk.o.weight=f16",
        "--tensor-type blk.d.weight=q8_0",
        "--tensor-type blk.u.weight=q2_K",
    ]
    assert any("group sizes dropped" in n for n in notes)
