"""The `allocator` command, run in a subprocess; what it writes is read back."""


import pytest
import torch

from allocator.planning.plan import Plan


def test_solve_writes_a_plan_that_reloads_and_evaluates(tiny_encoder_dir, tmp_path, cli, fast):
    out = tmp_path / "plans" / "plan.json"
    res = cli("solve", "--model", str(tiny_encoder_dir), "--budget", "30%", "-o", str(out), "--evaluate", *fast)
    assert res.returncode == 0, res.stderr
    plan = Plan.load(out)
    assert plan.model_name == str(tiny_encoder_dir)
    assert plan.predicted.quantized_bytes <= plan.limits["bytes"]
    assert len(plan.layers) == 3 + 2 * 6  # 3 embeddings + 6 Linear per encoder layer
    assert plan.solver.status == "optimal"
    for text in ("Plan by choice", "best uniform that fits", "Measured on 284 held-out documents", "WordSim353"):
        assert text in res.stdout, text
    assert f"plan written to {out}" in res.stdout


def test_help_tells_the_truth(cli):
    res = cli("solve", "--help")
    assert res.returncode == 0
    for option in ("--budget", "--model", "--output", "--evaluate", "--bits", "--terms", "--group-size", "--tie"):
        assert option in res.stdout
    assert "3.5bpw" in res.stdout and "minilm" in res.stdout
    top = cli("--help")
    assert "solve" in top.stdout


def test_version(cli):
    import allocator

    res = cli("version")
    assert res.returncode == 0 and res.stdout.strip() == allocator.__version__


def test_profile_once_then_solve_any_budget_and_refuse_a_stale_profile(tiny_encoder_dir, tmp_path, cli, fast):
    from transformers import BertModel

    from profilers.types import ProfileTable

    prof = tmp_path / "p.json"
    res = cli(
        "profile",
        str(tiny_encoder_dir),
        "-o",
        str(prof),
        "--fractions",
        "4",
        "--validate",
        "--validate-pairs",
        "12",
        "--validate-plans",
        "4",
        *fast,
    )
    assert res.returncode == 0, res.stderr
    table = ProfileTable.load(prof)
    assert table.validation is not None and table.validation.pairs == 12 and table.validation.plans == 4
    assert any(o.choice.extra for o in table.layers[0].options)
    assert "validation of fisher against measurement" in res.stdout

    # Re-solving from the file needs no model and no calibration data.
    for budget in ("25%", "3.5bpw"):
        out = tmp_path / f"plan-{budget}.json"
        res = cli("solve", "--profile", str(prof), "--budget", budget, "-o", str(out), "--no-progress")
        assert res.returncode == 0, res.stderr
        plan = Plan.load(out)
        assert plan.data_fingerprint == table.data_fingerprint
        for lp in plan.layers.values():
            assert len(lp.rows_with_extra_term()) == lp.choice.extra_rows(lp.shape[0])

    # The same weights pass the fingerprint check; changed weights are refused.
    res = cli("solve", "--profile", str(prof), "--model", str(tiny_encoder_dir), "--budget", "25%", "--no-progress")
    assert res.returncode == 0, res.stderr
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(tiny_encoder_dir, changed)
    model = BertModel.from_pretrained(changed)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(1.01)
    model.save_pretrained(changed)
    res = cli("solve", "--profile", str(prof), "--model", str(changed), "--budget", "25%", "--no-progress")
    assert res.returncode == 2 and "the model changed" in res.stderr and "allocator profile" in res.stderr


def test_other_profilers_from_the_command_line(tiny_encoder_dir, tmp_path, cli, fast):
    res = cli(
        "solve", "--model", str(tiny_encoder_dir), "--budget", "30%", "--profiler", "hessian", "--fractions", "0", *fast
    )
    assert res.returncode == 0, res.stderr
    assert "profile: hessian estimates" in res.stdout
    res = cli("solve", "--model", str(tiny_encoder_dir), "--budget", "30%", "--profiler", "exact", *fast)
    assert res.returncode == 2 and "unknown profiler 'exact'" in res.stderr


def test_frontier_writes_csv_and_plot_and_lossless_solve(tiny_encoder_dir, tmp_path, cli, fast):
    import csv

    prof = tmp_path / "p.json"
    assert cli("profile", str(tiny_encoder_dir), "-o", str(prof), *fast).returncode == 0
    out = tmp_path / "f.csv"
    res = cli(
        "frontier", "-p", str(prof), "--from", "3bpw", "--to", "6bpw", "--points", "7", "-o", str(out), "--no-progress"
    )
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    plans = [r for r in rows if r["kind"] == "plan"]
    assert len(plans) == 7 and all(r["status"] == "optimal" for r in plans)
    losses = [float(r["predicted_loss"]) for r in plans]
    assert losses == sorted(losses, reverse=True)  # more bytes, less loss
    assert any(r["kind"] == "uniform" for r in rows)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = cli("frontier", "-p", str(prof), "--from", "6bpw", "--to", "3MB", "--no-progress")
    assert bad.returncode == 2 and "same kind of budget" in bad.stderr

    plan_file = tmp_path / "lossless.json"
    from profilers.types import ProfileTable

    table = ProfileTable.load(prof)
    low_bit = [[o.loss for o in layer.options if o.choice.quantized and o.choice.bits <= 4] for layer in table.layers]
    least = sum(min(losses) for losses in low_bit)
    lossless = ("solve", "-p", str(prof), "--device-bits", "4", "-o", str(plan_file), "--no-progress")
    res = cli(*lossless, "--max-loss", str(1.5 * least))  # reachable with 2-4 bit terms alone
    assert res.returncode == 0, res.stderr
    plan = Plan.load(plan_file)
    assert plan.predicted.loss <= 1.5 * least * (1 + 1e-9)
    assert all(lp.choice.bits <= 4 for lp in plan.layers.values())
    res = cli(*lossless, "--max-loss", str(0.5 * least))  # below what any plan of 2-4 bit terms reaches
    assert res.returncode == 2 and "no plan reaches predicted loss" in res.stderr
    res = cli("solve", "-p", str(prof), "--no-progress")
    assert res.returncode == 2 and "--budget" in res.stderr and "--max-loss" in res.stderr
    res = cli("solve", "-p", str(prof), "--budget", "5bpw", "--pin", "oops", "--no-progress")
    assert res.returncode == 2 and "LAYER-PATTERN=CHOICE" in res.stderr


def test_same_inputs_give_the_same_plan_file(tiny_encoder_dir, tmp_path, cli, fast):
    prof = tmp_path / "p.json"
    assert cli("profile", str(tiny_encoder_dir), "-o", str(prof), *fast).returncode == 0
    files = []
    for k in range(2):
        out = tmp_path / f"plan{k}.json"
        for solver in ("auto",):
            assert (
                cli(
                    "solve", "-p", str(prof), "--budget", "4bpw", "--solver", solver, "-o", str(out), "--no-progress"
                ).returncode
                == 0
            )
        files.append(out.read_bytes())
    assert files[0] == files[1]


@pytest.mark.slow
def test_apply_writes_a_packed_file_that_reloads_and_convert(tiny_encoder_dir, tmp_path, cli, fast):
    import json

    import allocator

    plan_file = tmp_path / "plan.json"
    res = cli("solve", "--model", str(tiny_encoder_dir), "--budget", "40%", "-o", str(plan_file), *fast)
    assert res.returncode == 0, res.stderr
    plan = Plan.load(plan_file)
    assert plan.method == "gptq"
    out = tmp_path / "packed.safetensors"
    calib = ["--calibration", "16", "--max-length", "32"]
    res = cli("apply", str(tiny_encoder_dir), str(plan_file), "-o", str(out), *calib)
    assert res.returncode == 0, res.stderr
    assert "max |difference| 0.00e+00" in res.stdout
    assert out.stat().st_size <= plan.predicted.bytes
    from allocator.quantized.kernels import kernel_report

    model = allocator.load_quantized(out)  # rebuilt from the config in the file
    where = kernel_report(model)  # every packed layer: on the int4 kernel, or why it dequantizes
    quantized = [n for n, lp in plan.layers.items() if lp.choice.quantized]
    assert quantized and all(n in where for n in quantized)
    # A GPTQ plan needs the calibration data it was profiled on: the plan records the split, so
    # no options rebuild it, and other options are refused.
    res = cli("apply", str(plan_file), "-o", str(tmp_path / "same.safetensors"))
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    first, again = load_file(str(out)), load_file(str(tmp_path / "same.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    res = cli("apply", str(plan_file), "-o", str(tmp_path / "other.safetensors"), "--calibration", "20")
    assert res.returncode == 2 and "other calibration data" in res.stderr
    assert not (tmp_path / "other.safetensors").exists()
    res = cli("convert", str(plan_file), "--to", "gptqmodel", "-o", str(tmp_path / "q.json"))
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "q.json").read_text())
    assert {"bits", "group_size", "dynamic"} <= set(config)
    res = cli("convert", str(plan_file), "--to", "onnx")
    assert res.returncode == 2 and "--to takes gptqmodel or llama.cpp" in res.stderr
