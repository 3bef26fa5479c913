"""`allocator evaluate`: the plan against FP, uniform settings and peer quantizers, and a causal
LM through profile -> solve -> apply -> evaluate with perplexity."""

import json
import math

import pytest

from allocator.planning.plan import Plan


@pytest.mark.slow
def test_evaluate_measures_plan_uniform_and_peers_on_the_recorded_split(tiny_encoder_dir, tmp_path, cli, fast):
    plan_file = tmp_path / "plan.json"
    res = cli(
        "solve", "--model", str(tiny_encoder_dir), "--budget", "4bpw", "--keep", "embeddings*", "-o", str(plan_file),
        *fast,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    plan = Plan.load(plan_file)
    assert plan.data is not None and (plan.data.calibration, plan.data.max_length) == (16, 32)
    assert plan.data.evaluation == 300 - 16 and plan.data.builtin

    png = tmp_path / "cmp.png"
    res = cli("evaluate", str(plan_file), "--json", "--plot", str(png), "--no-progress", "--uniform", "2")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # stdout holds the JSON alone
    assert doc["metric"] == "cosine" and doc["held_out"]["items"] == 284
    kinds = [r["kind"] for r in doc["rows"]]
    assert kinds[:2] == ["fp", "plan"] and kinds.count("uniform") >= 1
    peers = {r["label"]: r for r in doc["rows"] if r["kind"] == "peer"}
    assert "ModelOpt AutoQuantize" in peers and any(label.startswith("HQQ int") for label in peers)
    assert any(label.startswith("RTN min/max int") for label in peers)
    limit = plan.fixed_bytes + plan.predicted.file_overhead + plan.limits["bytes"]
    for row in peers.values():
        assert row["fits"] and row["bytes"] <= limit and 0 < row["bpw"] <= 4.0
        assert -1.0 <= row["cosine"] <= 1.0 and row["quantize_seconds"] > 0
    fp, planned = doc["rows"][0], doc["rows"][1]
    assert fp["cosine"] > 0.9999 and planned["bytes"] == plan.predicted.bytes
    assert isinstance(doc["plan_beats_best_peer"], bool) and doc["best_peer"] in peers
    assert doc["plan_loss_on_calibration"] > 0  # the prediction's own batches, measured too
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the table for people names every row and says how the plan compares
    res = cli("evaluate", str(tiny_encoder_dir), str(plan_file), "--peers", "hqq", "--no-progress", "--metric", "kl")
    assert res.returncode == 0, res.stderr
    assert "HQQ int" in res.stdout and "ModelOpt" not in res.stdout
    assert "the best measured uniform setting that fits" in res.stdout and "measured loss" in res.stdout
    assert "estimate check: the plan's predicted loss" in res.stdout


@pytest.mark.slow
def test_evaluate_refuses_bad_input_in_one_line(tiny_encoder_dir, tiny_causal_dir, tmp_path, cli, fast):
    plan_file = tmp_path / "plan.json"
    res = cli("solve", "--model", str(tiny_encoder_dir), "--budget", "4bpw", "-o", str(plan_file), *fast)
    assert res.returncode == 0, res.stderr
    cases = [
        (["evaluate", str(tmp_path / "missing.json")], "missing.json"),
        (["evaluate", str(plan_file), "--metric", "bleu"], "unknown metric 'bleu'"),
        (["evaluate", str(plan_file), "--peers", "gptq"], "unknown peer 'gptq'"),
        (["evaluate", str(tiny_causal_dir), str(plan_file)], "different weights"),
    ]
    for args, message in cases:
        res = cli(*args, "--no-progress")
        assert res.returncode == 2, (args, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and message in lines[-1], res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_causal_lm_folder_goes_through_profile_solve_apply_evaluate_with_perplexity(
    tiny_causal_dir, tmp_path, cli, fast
):
    from allocator.sources import LLM_EVALUATION
    from allocator.sources.text import lee_documents

    prof, plan_file, packed = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "lm.safetensors"
    text = tmp_path / "news.txt"  # 48 documents: windows of 32 tokens to calibrate on, LLM_EVALUATION held out
    text.write_text("\n".join(lee_documents()[:48]))
    # Scores read 4 of the 16 calibration windows (2 batches of 2); GPTQ's H reads all 16.
    res = cli("profile", str(tiny_causal_dir), "-o", str(prof), "--data", str(text), "--score-on", "4", *fast)
    assert res.returncode == 0, res.stderr
    assert f"model {tiny_causal_dir} (causal-lm)" in res.stdout
    assert "from 4 samples (GPTQ's H from all 16 calibration windows)" in res.stdout
    res = cli("solve", "-p", str(prof), "--budget", "5bpw", "-o", str(plan_file), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert Plan.load(plan_file).method == "gptq-act"  # causal LMs round in activation order by default
    assert Plan.load(plan_file).scored_batches == 2 and Plan.load(plan_file).data.calibration == 16
    res = cli("apply", str(plan_file), "-o", str(packed))  # model and calibration split from the plan
    assert res.returncode == 0, res.stderr
    assert packed.stat().st_size > 0 and "reloaded model vs fake-quantized model" in res.stdout

    res = cli("evaluate", str(plan_file), "--json", "--peers", "hqq", "--no-progress")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["metric"] == "perplexity" and doc["held_out"] == {"items": LLM_EVALUATION, "unit": "windows",
                                                                "source": str(text)}
    fp, planned = doc["rows"][0], doc["rows"][1]
    assert math.isfinite(fp["perplexity"]) and fp["perplexity"] > 1
    # 5 bits per weight on a random model: the next-token distribution barely moves
    assert abs(planned["perplexity"] / fp["perplexity"] - 1) < 0.05
    assert all(r["perplexity"] is not None for r in doc["rows"])
    assert planned["agreement"] > 0.5 and planned["divergence"] >= 0
    # every row measured on text of another domain too (Wikipedia), side by side
    assert doc["other_text"].startswith("Wikipedia")
    assert all(math.isfinite(r["elsewhere"]["perplexity"]) and r["elsewhere"]["label"] == r["label"]
               for r in doc["rows"])  # fmt: skip
    assert doc["rows"][0]["elsewhere"]["divergence"] == 0  # FP against itself
    assert planned["elsewhere"]["divergence"] > 0

    # Block reconstruction and end-to-end tuning, recorded by solve, run by apply and evaluate (which also
    # measures the plan as rounded)
    refined = tmp_path / "refined.json"
    res = cli("solve", "-p", str(prof), "--budget", "3bpw", "--refine", "16", "--tune", "8", "-o", str(refined),
              "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (Plan.load(refined).refine_steps, Plan.load(refined).tune_steps) == (16, 8)
    assert "end-to-end tuning: 8 steps, run by apply and evaluate" in res.stdout
    res = cli("apply", str(refined), "-o", str(tmp_path / "refined.safetensors"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "block reconstruction: 2 blocks x 16 steps" in res.stdout
    assert "end-to-end tuning: 8 steps on " in res.stdout
    assert "max |difference| 0.00e+00" in res.stdout
    res = cli("evaluate", str(refined), "--json", "--peers", "none", "--uniform", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["label"] for r in doc["rows"]][:3] == ["FP", "plan", "plan without --refine --tune"]
    assert [b["block"] for b in doc["refined_blocks"]] == [0, 1]
    tuning = doc["tuning"]
    assert tuning["steps"] == 8 and tuning["kept"] == (tuning["loss_after"] < tuning["loss_before"])
