"""A sentence encoder from Python: profile all-MiniLM-L6-v2 once, then plan several budgets.

Run: .venv/bin/python examples/sentence_encoder.py   (needs `pip install -e '.[examples]'`)
"""

import copy

import torch

import allocator
from allocator import sources
from allocator.measure.metrics import model_outputs


def main() -> None:
    loaded = sources.load_model("minilm")
    data = sources.load_data(loaded, calibration=64)  # gensim's lee_background.cor, disjoint splits
    model, task = loaded.model, loaded.task

    table = allocator.profile(model, data.calib, method="rtn")  # one profile serves every budget
    reference = model_outputs(model, data.evals, task)
    for budget in ("10MB", "12MB", "3.5bpw"):
        plan = allocator.solve(table, budget=budget)
        quantized = allocator.apply_plan_(copy.deepcopy(model), plan)
        outputs = model_outputs(quantized, data.evals, task)
        cosine = torch.cat([torch.cosine_similarity(r, o) for r, o in zip(reference, outputs, strict=True)]).mean()
        best = plan.best_uniform()
        print(f"{budget:>7s}: {plan.predicted.bytes / 1e6:5.2f} MB, predicted loss {plan.predicted.loss:.4f} "
              f"(best uniform {best.choice.label if best else '-'}: {best.loss if best else float('nan'):.4f}), "
              f"measured cosine to FP {float(cosine):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
