"""Models and data users bring: `module:function`, `torch.save` files, tensor files, image folders."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from allocator import sources
from allocator.errors import ModelError
from allocator.planning.plan import Plan

MODULE = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 64), nn.ReLU(), nn.Linear(64, 4)
    )
"""


def _labelled_images(n=160, seed=0):
    """Images a random CNN separates into 4 classes: the label is its own top-1 prediction."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g)


def test_module_function_model_on_a_tensor_file_through_solve_apply_and_reload(tmp_path, monkeypatch, cli):
    (tmp_path / "mymodels.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    model = sources.import_model("mymodels:build")
    inputs = _labelled_images()
    with torch.no_grad():
        labels = model(inputs).argmax(-1)
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "data.pt")

    plan_file = tmp_path / "plan.json"
    common = ["--data", "data.pt", "--calibration", "64", "--no-progress", "--bits", "2,3,4,8"]
    res = cli("solve", "--model", "mymodels:build", "--budget", "3bpw", "--evaluate", "-o", "plan.json", *common,
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "model mymodels:build (module); calibration: 64 samples of data.pt" in res.stdout
    assert "accuracy" in res.stdout and "Measured on 96 held-out samples" in res.stdout
    plan = Plan.load(plan_file)
    assert plan.data.source == "data.pt" and plan.data.unit == "samples" and not plan.data.builtin
    assert set(plan.layers) == {"0", "3", "5"}

    res = cli("apply", "plan.json", "-o", "packed.safetensors", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    import allocator
    from allocator.quantized.apply import apply_plan_, layer_hessians

    # rebuilt through mymodels:build
    reloaded = allocator.load_quantized(tmp_path / "packed.safetensors", kernels=False)
    loaded = sources.load_model("mymodels:build")
    data = sources.load_data(loaded, "data.pt", calibration=64)  # the split the plan recorded
    fake = apply_plan_(loaded.model, plan, hessians=layer_hessians(loaded.model, data.calib, loaded.task))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs[:8]), fake(inputs[:8]), rtol=1e-3, atol=1e-3)


def test_torch_save_module_and_numpy_data(tmp_path, cli):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 20))
    torch.save(mlp, tmp_path / "mlp.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((120, 20)).astype(np.float32))
    loaded = sources.load_model(str(tmp_path / "mlp.pt"))
    assert loaded.kind == "module" and loaded.task is None
    data = sources.load_data(loaded, str(tmp_path / "x.npy"), calibration=40, batch_size=16)
    assert (data.n_calib, data.n_eval, data.unit) == (40, 80, "samples")
    assert loaded.task is not None and loaded.task.output == "logits"  # a plain tensor output
    assert sum(len(b) for b in data.calib) == 40 and all(isinstance(b, torch.Tensor) for b in data.calib)

    res = cli("profile", str(tmp_path / "mlp.pt"), "--data", str(tmp_path / "x.npy"), "--calibration", "40",
              "-o", str(tmp_path / "p.json"), "--no-progress", "--bits", "2,4,8")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "p.json").read_text())["data"]["source"] == str(tmp_path / "x.npy")

    torch.save(mlp.state_dict(), tmp_path / "weights.pt")
    res = cli("profile", str(tmp_path / "weights.pt"), "--data", str(tmp_path / "x.npy"), "--no-progress")
    assert res.returncode == 2 and "holds a state dict" in res.stderr and "module:function" in res.stderr


def test_image_folder_for_lenet_mnist(tmp_path):
    from PIL import Image

    from allocator.sources.zoo import mnist_5k

    images, labels = mnist_5k()
    root = tmp_path / "digits"
    for digit in range(10):  # six of each digit, in folders whose names sort like the digits
        folder = root / str(digit)
        folder.mkdir(parents=True)
        for k in torch.nonzero(labels == digit).flatten()[:6].tolist():
            Image.fromarray((images[k, 0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
    loaded = sources.load_model("lenet-mnist")
    data = sources.load_data(loaded, str(root), calibration=20, batch_size=8)
    assert (data.unit, data.n_calib, data.n_eval) == ("images", 20, 40)
    x, _ = data.calib[0]
    assert x.shape[1:] == (1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    with torch.no_grad():  # class numbers follow the folder names, so LeNet reads the digits right
        right = sum(int((loaded.model(xb).argmax(-1) == yb).sum()) for xb, yb in data.evals)
    assert right / data.n_eval > 0.9

    odd = root / "0" / "big.png"
    Image.fromarray(np.zeros((30, 30), dtype=np.uint8)).save(odd)
    with pytest.raises(ModelError, match="differ in size"):
        sources.load_data(loaded, str(root), calibration=20)


def test_tensor_files_in_every_format(tmp_path):
    x = torch.randn(10, 3)
    y = torch.arange(10)
    from safetensors.torch import save_file

    save_file({"inputs": x, "labels": y}, str(tmp_path / "d.safetensors"))
    np.savez(tmp_path / "d.npz", inputs=x.numpy(), labels=y.numpy())
    torch.save((x, y), tmp_path / "pair.pt")
    torch.save(x, tmp_path / "plain.pt")
    for name, has_labels in (("d.safetensors", True), ("d.npz", True), ("pair.pt", True), ("plain.pt", False)):
        inputs, labels = sources.tensor_file(tmp_path / name)
        torch.testing.assert_close(inputs, x)
        assert (labels is not None) == has_labels
    torch.save({"x": x, "y": y}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="name the model inputs 'inputs'"):
        sources.tensor_file(tmp_path / "bad.pt")
    torch.save(torch.full((4, 2), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(ModelError, match="NaN"):
        sources.tensor_file(tmp_path / "nan.pt")


def test_token_id_tensor_for_a_text_model_and_unknown_sources(tiny_encoder_dir, tmp_path):
    ids = torch.randint(1000, 2000, (30, 12))
    torch.save(ids, tmp_path / "ids.pt")
    loaded = sources.load_model(str(tiny_encoder_dir))
    data = sources.load_data(loaded, str(tmp_path / "ids.pt"), calibration=10, batch_size=5)
    batch = data.calib[0]
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (5, 12)
    with pytest.raises(ModelError, match="cannot import 'no_such_module'"):
        sources.load_model("no_such_module:build")
    with pytest.raises(ModelError, match="module:function"):
        sources.load_model("not-a-model")
