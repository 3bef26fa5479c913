"""The block-streamed profile fanned out over Ray (`estimators.distributed`): the same scores as
one process, a killed worker's task run again, and one line where Ray or the cluster is missing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from allocator.sources.lazy import lazy_from_folder
from profilers.estimators.fisher import FisherProfiler
from profilers.quant.options import choice_grid
from profilers.tasks import LogitsTask
from profilers.types import ProfileError

pytest.importorskip("ray")

TASK = LogitsTask(causal=True)
CHOICES = choice_grid((2, 3, 4), (1, 2), (32, None))


def _llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _batches(n: int = 4, length: int = 64):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 300, (2, length), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "llama"
    _llama().save_pretrained(path)
    return path


def _profile(model, ray=None, progress=None):
    profiler = FisherProfiler(ray=ray)
    return profiler.profile(model, _batches(), choices=CHOICES, task=TASK, method="gptq", scored=2, progress=progress)


def _scores(table):
    return [(layer.spec.name, [(o.loss, o.loss_stderr) for o in layer.options]) for layer in table.layers]


def _score_block_workers() -> list[int]:
    """Processes running a block's scoring task now (Ray titles a busy worker `ray::<function>`)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read().startswith(b"ray::score_block"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture
def one_thread():
    """torch on one thread here, so each task takes one CPU and the 2-CPU cluster runs two at once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_local_cluster_scores_every_block_as_one_process_does_and_survives_a_killed_worker(folder, one_thread):
    """Blocks scored by 2 workers at once, reading their weights from the folder: the table
    equals the single-process one exactly; one worker killed mid-task, the task is run again by
    another, same table."""
    alone = _profile(lazy_from_folder(folder, "AutoModelForCausalLM"))
    stages = []
    fanned = _profile(lazy_from_folder(folder, "AutoModelForCausalLM"), ray="local:2",
                      progress=lambda stage, done, total: stages.append((stage, done, total)))  # fmt: skip
    assert ("ray tasks", 4, 4) in stages  # the 4 blocks went to the cluster
    assert _scores(fanned) == _scores(alone)
    assert fanned.model_dump(exclude={"created"}) == alone.model_dump(exclude={"created"})

    killed = []

    def kill_the_first_task(stage, done, total):
        if stage == "ray tasks" and done == 0 and total == 1 and not killed:
            deadline = time.monotonic() + 60
            while not killed and time.monotonic() < deadline:
                for pid in _score_block_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                time.sleep(0.001)

    again = _profile(lazy_from_folder(folder, "AutoModelForCausalLM"), ray="local:2", progress=kill_the_first_task)
    assert killed, "no worker was seen running a block's task"
    assert _scores(again) == _scores(alone)


def test_a_model_in_memory_sends_its_block_weights_with_the_tasks():
    model = _llama(layers=2)
    assert _scores(_profile(model, ray="local:2")) == _scores(_profile(model))


def test_an_unreachable_cluster_is_one_line_before_any_pass():
    started = time.monotonic()
    with pytest.raises(ProfileError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        _profile(_llama(layers=1), ray="127.0.0.1:1")
    assert time.monotonic() - started < 30


def test_without_ray_the_option_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ProfileError, match=r"pip install 'allocator\[distributed\]'"):
        _profile(_llama(layers=1), ray="local")


def test_the_default_profile_imports_no_ray():
    code = (
        "import sys, torch; from torch import nn; from profilers.estimators.fisher import FisherProfiler;"
        "from profilers.quant.options import choice_grid;"
        "FisherProfiler().profile(nn.Sequential(nn.Linear(32, 32)), [torch.randn(4, 32)],"
        " choices=choice_grid((4,), (1,), (32,)));"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_the_cli_profile_with_ray_writes_the_same_profile(cli, fast, tiny_causal_dir, tmp_path):
    from profilers.types import ProfileTable

    alone, fanned = tmp_path / "alone.json", tmp_path / "ray.json"
    assert cli("profile", str(tiny_causal_dir), "-o", str(alone), *fast).returncode == 0
    res = cli("profile", str(tiny_causal_dir), "-o", str(fanned), "--ray", "local:2", *fast)
    assert res.returncode == 0, res.stderr
    assert "ray: 2 blocks scored on 2 CPUs" in res.stdout  # the folder's 2 blocks
    assert _scores(ProfileTable.load(fanned)) == _scores(ProfileTable.load(alone))


def test_the_cli_refuses_an_unreachable_cluster_in_one_line_and_writes_nothing(cli, fast, tiny_causal_dir, tmp_path):
    out = tmp_path / "p.json"
    res = cli("profile", str(tiny_causal_dir), "-o", str(out), "--ray", "127.0.0.1:1", *fast)
    assert res.returncode != 0 and not out.exists()
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in res.stderr and "Traceback" not in res.stderr
    res = cli("profile", str(tiny_causal_dir), "-o", str(out), "--ray", "local", "--profiler", "measured", *fast)
    assert res.returncode != 0 and "--ray fans out the fisher profiler's scoring" in res.stderr


def test_apply_on_a_local_cluster_writes_the_same_file(folder, tmp_path):
    """A GPTQ plan's blocks rounded by 2 workers (weights read from the folder, `H` from the
    recorded inputs): the packed file equals the one written in one process, byte for byte."""
    import allocator
    from allocator.quantized.apply import quantize_plan_
    from allocator.quantized.export import export_quantized

    batches = _batches()
    table = allocator.profile(_llama(), batches, task=TASK, method="gptq", include=["model.layers.*"],
                              choices=CHOICES)  # fmt: skip
    plan = allocator.solve(table, budget="3.5 bits")
    files = []
    for ray in (None, "local:2"):
        model = lazy_from_folder(folder, "AutoModelForCausalLM")
        made = quantize_plan_(model, plan, calibration=batches, task=TASK, ray=ray)
        files.append(export_quantized(model, plan, tmp_path / f"{ray}.safetensors", stored=made.layers))
    from safetensors import safe_open

    a, b = (safe_open(str(f), "pt") for f in files)
    assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
    for key in set(a.keys()):
        assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    with pytest.warns(UserWarning, match="sequential plan .* rounded in this process"):
        quantize_plan_(lazy_from_folder(folder, "AutoModelForCausalLM"), plan.model_copy(update={"sequential": True}),
                       calibration=batches, task=TASK, ray="local:2")  # fmt: skip
