"""Bad inputs and faults, across the CLI (in a subprocess), the Python API and the service.

Every case checks the exit status (or HTTP status), that the failure is one line naming the
problem, and that every file the user had is byte for byte what it was (hashed before and
after). Interrupts (SIGINT, SIGKILL) and a closed stdout are cases too.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import allocator
from allocator.errors import AllocatorError, BudgetError, PlanError, QuantizedFileError
from allocator.planning.plan import Plan
from allocator.quantized.load import load_quantized
from allocator.service.client import Client, ServiceError
from profilers.types import ProfileError, ProfileTable

TINYNET = '''
import time
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, pause=0.0, hidden=32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.pause = nn.Linear(16, hidden), nn.Linear(hidden, 4), pause

    def forward(self, x):
        time.sleep(self.pause)
        return self.b(torch.relu(self.a(x)))


def make():
    return Net()


def slow():  # the same weights, 0.5 s per forward pass: time for a signal to land mid-work
    return Net(pause=0.5)


def wider():  # other layer shapes than make()
    return Net(hidden=48)


def raises():
    raise RuntimeError("the checkpoint is missing")


def not_a_module():
    return 42
'''


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _one_error_line(stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in stderr, stderr
    assert lines[-1].startswith(("error: ", "interrupted")), stderr
    assert message in lines[-1], (message, stderr)
    assert sum(line.startswith("error:") for line in lines) <= 1, stderr


@pytest.fixture(scope="module")
def ws(tmp_path_factory, cli):
    """A user's folder: a model module, data files, a profile, a plan and a packed file."""
    root = tmp_path_factory.mktemp("user")
    (root / "tinynet.py").write_text(TINYNET)
    (root / "broken.py").write_text("raise ValueError('bad config in broken.py')\n")
    torch.manual_seed(1)
    torch.save(torch.randn(40, 16), root / "data.pt")
    torch.save(torch.randn(40, 7), root / "wrong_shape.pt")
    torch.save(torch.zeros(0, 16), root / "no_rows.pt")
    torch.save(nn.Linear(16, 4).state_dict(), root / "state_dict.pt")
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("keep me\n")
    (root / "fake.gguf").write_bytes(b"PK\x03\x04 a zip archive named .gguf")
    (root / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x10\x00")  # the header stops inside the tensor count
    (root / "a_folder").mkdir()
    common = ["--data", "data.pt", "--calibration", "8", "--batch-size", "4", "--no-progress"]
    # the model named with --model here, positionally below: every command takes both
    res = cli("profile", "--model", "tinynet:make", "-o", "profile.json", "--bits", "2,4,8", "--fractions", "0",
              *common, cwd=root)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = cli("solve", "-p", "profile.json", "-b", "5bpw", "-o", "plan.json", "--no-progress", cwd=root)
    assert res.returncode == 0, res.stderr
    res = cli("apply", "-m", "tinynet:make", "plan.json", "-o", "packed.safetensors", cwd=root)
    assert res.returncode == 0, res.stderr
    table = json.loads((root / "profile.json").read_text())
    table["layers"][0]["spec"]["name"] = "renamed"
    (root / "renamed.json").write_text(json.dumps(table))
    (root / "truncated.json").write_text((root / "plan.json").read_text()[:300])
    text = (root / "profile.json").read_text()
    loss = json.loads(text)["layers"][0]["options"][1]["loss"]
    (root / "nan_profile.json").write_text(text.replace(f'"loss": {json.dumps(loss)}', '"loss": NaN', 1))
    return root


# ------------------------------------------------------------------ the CLI, in a subprocess

EMPTY = ""
CLI_CASES = [
    # an output that is an input is refused before any work
    ("solve-over-its-profile", ["solve", "-p", "profile.json", "-b", "4bpw", "-o", "profile.json"], 2, "also an input"),
    ("apply-over-its-plan", ["apply", "tinynet:make", "plan.json", "-o", "plan.json"], 2, "also an input"),
    ("convert-over-its-plan", ["convert", "plan.json", "--to", "gptqmodel", "-o", "plan.json"], 2, "also an input"),
    ("frontier-over-its-profile", ["frontier", "-p", "profile.json", "--from", "3bpw", "--to", "6bpw",
                                   "-o", "profile.json"], 2, "also an input"),
    ("frontier-plot-over-profile", ["frontier", "-p", "profile.json", "--from", "3bpw", "--to", "6bpw",
                                    "--plot", "profile.json"], 2, "also an input"),
    ("profile-over-its-data", ["profile", "tinynet:make", "--data", "data.pt", "-o", "data.pt"], 2, "also an input"),
    ("evaluate-plot-over-plan", ["evaluate", "tinynet:make", "plan.json", "--plot", "plan.json"], 2, "also an input"),
    # outputs that cannot be written
    ("output-is-a-folder", ["solve", "-p", "profile.json", "-b", "4bpw", "-o", "a_folder"], 2, "is a folder"),
    ("output-under-a-file", ["solve", "-p", "profile.json", "-b", "4bpw", "-o", "notes.txt/plan.json"], 2,
     "is a file, not a folder"),
    ("output-not-writable", ["solve", "-p", "profile.json", "-b", "4bpw", "-o", "/proc/sys/plan.json"], 2,
     "permission denied"),
    # budgets
    ("budget-exabyte-typo", ["solve", "-p", "profile.json", "-b", "99999999999999999999999GB"], 2,
     "larger than any model can use"),
    ("budget-tiny-scientific", ["solve", "-p", "profile.json", "-b", "1e-3MB"], 2, "raise it to at least"),
    ("budget-half-exponent", ["solve", "-p", "profile.json", "-b", "5e"], 2, "cannot read budget '5e'"),
    ("budget-nan", ["solve", "-p", "profile.json", "-b", "nanGB"], 2, "cannot read budget"),
    ("budget-no-unit", ["solve", "-p", "profile.json", "-b", "12"], 2, "has no unit"),
    ("budget-empty", ["solve", "-p", "profile.json", "-b", EMPTY], 2, "empty budget"),
    ("budget-missing", ["solve", "-p", "profile.json"], 2, "give a --budget"),
    ("budget-over-100-percent", ["solve", "-p", "profile.json", "-b", "150%"], 2, "more than the whole fp16 model"),
    ("budget-kinds-mixed", ["frontier", "-p", "profile.json", "--from", "3bpw", "--to", "1MB"], 2,
     "same kind of budget"),
    # options
    ("bits-9", ["profile", "tinynet:make", "--data", "data.pt", "--bits", "9"], 2, "--bits takes values from 2 to 8"),
    ("bits-not-numbers", ["profile", "tinynet:make", "--data", "data.pt", "--bits", "2,x"], 2,
     "--bits takes comma-separated integers"),
    ("terms-5", ["profile", "tinynet:make", "--data", "data.pt", "--terms", "5"], 2,
     "--terms takes values from 1 to 4"),
    ("group-size-0", ["profile", "tinynet:make", "--data", "data.pt", "--group-size", "0"], 2, "--group-size takes"),
    ("kinds-unknown", ["profile", "tinynet:make", "--data", "data.pt", "--kinds", "braided"], 2, "--kinds takes"),
    ("profiler-unknown", ["profile", "tinynet:make", "--data", "data.pt", "--profiler", "exact"], 2,
     "unknown profiler 'exact'"),
    ("method-unknown", ["profile", "tinynet:make", "--data", "data.pt", "--method", "awq"], 2, "unknown --method"),
    ("rotation-unknown", ["profile", "tinynet:make", "--data", "data.pt", "--rotation", "givens"], 2,
     "unknown --rotation 'givens'; choose one of none, hadamard, both"),
    ("max-memory-not-a-size", ["profile", "tinynet:make", "--data", "data.pt", "--max-memory", "4 lots"], 2,
     "--max-memory '4 lots' is not a size"),
    ("max-memory-below-one-block", ["profile", "tinynet:make", "--data", "data.pt", "--calibration", "8",
                                    "--max-memory", "1MB", "-o",
                                    "new_profile.json"], 2, "is too small: profiling model needs at least"),
    ("batch-size-0", ["profile", "tinynet:make", "--batch-size", "0"], 2, "'--batch-size'"),
    ("calibration-0", ["profile", "tinynet:make", "--calibration", "0"], 2, "'--calibration'"),
    ("calibration-too-many", ["profile", "tinynet:make", "--data", "data.pt", "--calibration", "40"], 2,
     "--calibration 40 does not fit 40 samples"),
    ("draws-0", ["profile", "tinynet:make", "--draws", "0"], 2, "'--draws'"),
    ("fractions-negative", ["profile", "tinynet:make", "--fractions", "-1"], 2, "'--fractions'"),
    ("time-limit-negative", ["solve", "-p", "profile.json", "-b", "4bpw", "--solver", "milp", "--time-limit", "-5"], 2,
     "'--time-limit'"),
    ("gap-over-1", ["solve", "-p", "profile.json", "-b", "4bpw", "--gap", "3"], 2, "'--gap'"),
    ("unknown-option", ["solve", "--budgett", "4bpw"], 2, "No such option: --budgett"),
    ("pin-without-choice", ["solve", "-p", "profile.json", "-b", "5bpw", "--pin", "oops"], 2, "LAYER-PATTERN=CHOICE"),
    ("pin-unprofiled-choice", ["solve", "-p", "profile.json", "-b", "5bpw", "--pin", "a=int3-g64"], 2,
     "no numbers for"),
    ("forbid-matches-nothing", ["solve", "-p", "profile.json", "-b", "5bpw", "--forbid", "*=int7*"], 2,
     "matches no profiled choice"),
    ("keep-matches-nothing", ["solve", "-p", "profile.json", "-b", "5bpw", "--keep", "decoder.*"], 2,
     "matches no profiled layer"),
    ("metric-without-evaluate", ["solve", "-p", "profile.json", "-b", "5bpw", "--metric", "kl"], 2,
     "add --evaluate"),
    ("metric-needs-causal-lm", ["evaluate", "tinynet:make", "plan.json", "--metric", "perplexity", "--peers", "none"],
     2, "--metric perplexity needs a causal language model"),
    ("metric-unknown", ["evaluate", "tinynet:make", "plan.json", "--metric", "bleu", "--peers", "none"], 2,
     "unknown metric 'bleu'"),
    ("convert-to-unknown", ["convert", "plan.json", "--to", "onnx"], 2, "--to takes gptqmodel or llama.cpp"),
    # models
    ("model-nowhere", ["profile", "nowhere", "--data", "data.pt"], 2, "unknown model 'nowhere'"),
    ("model-function-raises", ["profile", "tinynet:raises", "--data", "data.pt"], 2,
     "raises() raised RuntimeError: the checkpoint is missing"),
    ("model-import-raises", ["profile", "broken:make", "--data", "data.pt"], 2,
     "raised ValueError: bad config in broken.py"),
    ("model-not-a-module", ["profile", "tinynet:not_a_module", "--data", "data.pt"], 2, "returned int"),
    ("model-is-a-state-dict", ["profile", "state_dict.pt", "--data", "data.pt"], 2, "holds a state dict"),
    ("model-is-a-text-file", ["profile", "notes.txt"], 2, "neither a Hugging Face model folder"),
    ("model-gguf-not-gguf", ["profile", "fake.gguf"], 2, "fake.gguf is not a GGUF file"),
    ("model-gguf-truncated", ["profile", "cut.gguf"], 2, "cut.gguf is truncated or corrupt"),
    # data
    ("data-missing", ["profile", "tinynet:make", "--data", "missing.pt"], 2, "--data missing.pt does not exist"),
    ("data-empty-file", ["profile", "tinynet:make", "--data", "empty.pt"], 2, "is empty (0 bytes)"),
    ("data-no-rows", ["profile", "tinynet:make", "--data", "no_rows.pt"], 2, "holds 0 sample(s)"),
    ("data-wrong-shape", ["profile", "tinynet:make", "--data", "wrong_shape.pt", "--calibration", "8"], 2,
     "does not run on wrong_shape.pt: RuntimeError"),
    ("data-for-text-model", ["profile", "tinynet:make", "--data", "notes.txt"], 2, "has no tokenizer"),
    ("lenet-wrong-shape", ["profile", "lenet-mnist", "--data", "data.pt", "--calibration", "8"], 2,
     "lenet-mnist does not run on data.pt"),
    # profiles and plans
    ("profile-missing", ["solve", "-p", "nothing.json", "-b", "4bpw"], 2, "does not exist"),
    ("profile-is-a-plan", ["solve", "-p", "plan.json", "-b", "4bpw"], 2, "is not an allocator profile file"),
    ("profile-truncated", ["solve", "-p", "truncated.json", "-b", "4bpw"], 2, "is not valid JSON"),
    ("profile-holds-nan", ["solve", "-p", "nan_profile.json", "-b", "4bpw"], 2, "finite number"),
    ("profile-names-edited", ["solve", "-p", "renamed.json", "-b", "5bpw", "--model", "tinynet:make",
                              "--data", "data.pt", "--calibration", "8", "--batch-size", "4"], 2,
     "has no layer named 'renamed'"),
    ("profile-other-shapes", ["solve", "-p", "profile.json", "-b", "5bpw", "--model", "tinynet:wider",
                              "--data", "data.pt", "--calibration", "8", "--batch-size", "4"], 2,
     "made for different weights"),
    ("tie-preset-unknown", ["solve", "-p", "profile.json", "-b", "5bpw", "--tie", "bogus"], 2,
     "unknown tie preset 'bogus'"),
    ("two-models", ["profile", "tinynet:make", "--model", "tinynet:wider"], 2,
     "two models named: 'tinynet:make' and --model 'tinynet:wider'"),
    ("plan-missing", ["apply", "tinynet:make", "nothing.json"], 2, "does not exist"),
    ("plan-truncated", ["apply", "tinynet:make", "truncated.json"], 2, "is not valid JSON"),
    ("plan-for-other-model", ["apply", "tinynet:wider", "plan.json", "-o", "other.safetensors"], 2,
     "made for different weights"),
    # the service, as the CLI sees it
    ("server-not-http", ["solve", "-p", "profile.json", "-b", "4bpw", "--server", "ftp://127.0.0.1/x"], 2,
     "is not an http(s) URL"),
    ("server-not-there", ["solve", "-p", "profile.json", "-b", "4bpw", "--server", "http://127.0.0.1:9"], 2,
     "cannot reach http://127.0.0.1:9"),
    ("serve-data-dir-is-a-file", ["serve", "--data-dir", "notes.txt"], 2, "--data-dir notes.txt is a file"),
    ("serve-blank-token", ["serve", "--token", " "], 2, "the --token is blank"),
    ("serve-public-without-token", ["serve", "--host", "0.0.0.0", "--data-dir", "a_folder"], 2, "without a token"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_changes_no_file(ws, cli, args, code, message):
    before = _hashes(ws)
    res = cli(*args, cwd=ws, env={"ALLOCATOR_TOKEN": None}, timeout=300)
    assert res.returncode == code, (res.returncode, res.stderr)
    _one_error_line(res.stderr, message)
    assert _hashes(ws) == before


@pytest.mark.slow
def test_cli_closed_stdout_still_writes_the_plan(ws):
    out = ws / "piped" / "plan.json"
    shell = f"{sys.executable} -m allocator solve -p profile.json -b 5bpw -o {out} --no-progress | head -1"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=ws, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1 and "Traceback" not in res.stderr
    assert Plan.load(out).model_dump_json() == Plan.load(ws / "plan.json").model_dump_json()
    out.unlink()
    out.parent.rmdir()


def _start(ws: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "allocator", *args], cwd=ws, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "160"})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupting_apply_leaves_the_existing_output_as_it_was(ws, sig):
    before = _hashes(ws)
    # a slow model with the same weights: GPTQ's calibration passes take seconds before the write
    proc = _start(ws, "apply", "tinynet:slow", "plan.json", "-o", "packed.safetensors")
    assert proc.stdout.readline().startswith("model tinynet:slow")  # loaded: now in the calibration passes
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        _one_error_line(err, "interrupted; nothing written")
    else:
        assert proc.returncode == -signal.SIGKILL
    assert {k: v for k, v in _hashes(ws).items() if k in before} == before
    for leftover in ws.glob(".packed.safetensors.*.tmp"):  # a killed process cannot remove its temporary file
        leftover.unlink()


def _wait_until_python_catches_sigint(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the child's SIGINT handler is installed (Linux: the SigCgt mask in /proc), or a
    second elsewhere. A loaded machine can take longer than any fixed sleep to start Python."""
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        caught = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        if int(caught, 16) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_ctrl_c_in_the_first_moments_is_one_line(ws):
    proc = _start(ws, "solve", "-p", "profile.json", "-b", "5bpw", "-o", "early.json")
    _wait_until_python_catches_sigint(proc)  # before that, SIGINT kills any process silently
    time.sleep(0.1)  # the command is still importing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # the machine was faster than the interrupt: then the plan is whole
        assert Plan.load(ws / "early.json")
    else:
        assert proc.returncode == 130, err
        _one_error_line(err, "interrupted")
        assert not (ws / "early.json").exists()
    (ws / "early.json").unlink(missing_ok=True)


BUG = textwrap.dedent(
    """
    import sys
    import allocator.planning.build as build

    def boom(*args, **kwargs):
        raise RuntimeError("an invariant broke")

    build.plan_from_profile = boom
    from allocator.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_bug_is_one_line_that_says_so_and_debug_shows_the_traceback(ws, debug):
    before = _hashes(ws)
    args = ["solve", "-p", "profile.json", "-b", "5bpw", "-o", "plan.json", *(["--debug"] if debug else [])]
    res = subprocess.run([sys.executable, "-c", BUG, *args], cwd=ws, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unexpected RuntimeError: an invariant broke") and "bug in allocator" in last
    assert ("Traceback" in res.stderr) == debug
    assert _hashes(ws) == before


@pytest.mark.slow
def test_frontier_reports_the_budgets_it_could_not_plan(ws):
    res = subprocess.run([sys.executable, "-m", "allocator", "frontier", "-p", "profile.json", "--from", "0.5bpw",
                          "--to", "6bpw", "--points", "6", "-o", "f/frontier.csv", "--no-progress"], cwd=ws,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "budgets admit no plan and were left out (0.5bpw" in res.stderr and "raise it to at least" in res.stderr
    rows = (ws / "f" / "frontier.csv").read_text().splitlines()
    assert sum(r.startswith("plan,") for r in rows) < 6
    for p in (ws / "f").iterdir():
        p.unlink()
    (ws / "f").rmdir()


# ------------------------------------------------------------------ the Python API


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def api_table() -> ProfileTable:
    return allocator.profile(_mlp(), [torch.randn(8, 16) for _ in range(2)], method="rtn", fractions=0)


def _flip_byte(src: Path, dst: Path, tensor: str) -> None:
    """Copy `src` with one byte of `tensor`'s data flipped (the header left intact)."""
    raw = bytearray(src.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    start, stop = header[tensor]["data_offsets"]
    raw[8 + n + (start + stop) // 2] ^= 0xFF
    dst.write_bytes(bytes(raw))


def _nan_weights() -> nn.Module:
    m = _mlp()
    with torch.no_grad():
        m[0].weight[0, 0] = math.nan
    return m


API_CASES = [
    ("budget-half-exponent", lambda t, d: allocator.solve(t, budget="5e"), BudgetError, "cannot read budget '5e'"),
    ("budget-overflow", lambda t, d: allocator.solve(t, budget="1e999GB"), BudgetError, "larger than any model"),
    ("budget-infeasible", lambda t, d: allocator.solve(t, budget="1kB"), AllocatorError, "raise it to at least"),
    ("solve-model-without-data", lambda t, d: allocator.solve(_mlp(), budget="4bpw"), AllocatorError,
     "needs calibration data"),
    ("profile-no-batches", lambda t, d: allocator.profile(_mlp(), []), ProfileError, "no calibration batches"),
    ("profile-nan-weights", lambda t, d: allocator.profile(_nan_weights(), [torch.randn(4, 16)]), ProfileError,
     "NaN or infinite weights"),
    ("profile-nothing-to-quantize", lambda t, d: allocator.profile(nn.ReLU(), [torch.randn(4, 16)]), ProfileError,
     "nothing to quantize"),
    ("apply-other-model", lambda t, d: allocator.apply_plan_(nn.Sequential(nn.Linear(8, 4)),
                                                              allocator.solve(t, budget="4bpw")),
     PlanError, "has no layer named"),
    ("plan-file-corrupt", lambda t, d: Plan.load(d / "garbage.json"), PlanError, "is not valid JSON"),
    ("packed-byte-flipped", lambda t, d: load_quantized(d / "flipped.safetensors", model=_mlp()), QuantizedFileError,
     "fails its checksum"),
    ("packed-truncated", lambda t, d: load_quantized(d / "truncated.safetensors", model=_mlp()), QuantizedFileError,
     "not a readable safetensors file"),
    ("packed-not-ours", lambda t, d: load_quantized(d / "foreign.safetensors", model=_mlp()), QuantizedFileError,
     "is not an allocator packed model"),
    ("metric-needs-labels", lambda t, d: allocator.compare(_mlp(), allocator.solve(t, budget="4bpw"),
                                                           [torch.randn(4, 16)], allocator.LogitsTask(),
                                                           metric="accuracy"),
     AllocatorError, "--metric accuracy needs data with class labels"),
    ("client-not-http", lambda t, d: Client("file:///etc/passwd"), ServiceError, "is not an http(s) URL"),
    ("client-nobody-listens", lambda t, d: Client("http://127.0.0.1:9", connect_timeout=2).health(), ServiceError,
     "cannot reach"),
]


@pytest.fixture(scope="module")
def api_files(tmp_path_factory, api_table):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("api")
    (folder / "garbage.json").write_text('{"format": "allocator.plan", "layers": {')
    plan = allocator.solve(api_table, budget="5bpw")
    packed = allocator.export_quantized(_mlp(), plan, folder / "packed.safetensors")
    name = next(k for k in json.loads(packed.read_bytes()[8 : 8 + int.from_bytes(packed.read_bytes()[:8], "little")])
                if k.endswith(".codes"))
    _flip_byte(packed, folder / "flipped.safetensors", name)
    (folder / "truncated.safetensors").write_bytes(packed.read_bytes()[:200])
    save_file({"w": torch.zeros(3)}, str(folder / "foreign.safetensors"))
    return folder


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_one_line(api_table, api_files, call, error, message):
    before = _hashes(api_files)
    with pytest.raises(error) as info:
        call(api_table, api_files)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert _hashes(api_files) == before


def test_a_flipped_byte_names_the_tensor_and_a_whole_file_loads(api_table, api_files):
    packed = api_files / "packed.safetensors"
    with pytest.raises(QuantizedFileError, match=r"tensor '.*\.codes' fails its checksum"):
        load_quantized(api_files / "flipped.safetensors", model=_mlp())
    model = load_quantized(packed, model=_mlp())
    assert model(torch.randn(2, 16)).shape == (2, 4)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from profilers import files

    target = tmp_path / "plan.json"
    target.write_text("the user's plan")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(target, "a new plan")
    assert target.read_text() == "the user's plan"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from allocator.service import spawned

    with spawned(tmp_path_factory.mktemp("service"), "--max-points", "50") as url:
        yield url


def _post(url: str, body: bytes) -> tuple[int, object]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _profile_json(table: ProfileTable, **changes: object) -> dict:
    doc = table.model_dump(mode="json")
    for path, value in changes.items():
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return doc


SERVICE_CASES = [
    ("nan-loss", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t, **{"layers.0.options.1.loss": 123.5}),
                                                    "budgets": ["4bpw"]}).replace("123.5", "NaN"),
     ["body", "profile", "layers", 0, "options", 1, "loss"]),
    ("huge-budget", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t), "budgets": ["1e30GB"]}),
     ["body", "budgets", 0]),
    ("unreadable-budget", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t), "budgets": ["5e"]}),
     ["body", "budgets", 0]),
    ("nan-time-limit", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t), "budgets": ["4bpw"]})[:-1]
     + ', "options": {"time_limit": NaN}}', ["body", "options", "time_limit"]),
    ("nan-max-loss", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t), "budgets": []})[:-1]
     + ', "constraints": {"max_loss": Infinity}}', ["body", "constraints", "max_loss"]),
    ("huge-costs", "/v1/solve",
     lambda t: json.dumps({"profile": _profile_json(t, **{"layers.0.options.1.bytes": 10**30}), "budgets": ["4bpw"]}),
     ["body", "profile"]),
    ("too-many-points", "/v1/frontier", lambda t: json.dumps({"profile": _profile_json(t), "start": "3bpw",
                                                              "stop": "6bpw", "points": 10**12}),
     ["body", "points"]),
    ("frontier-bad-start", "/v1/frontier", lambda t: json.dumps({"profile": _profile_json(t), "start": "0bpw",
                                                                 "stop": "6bpw"}), ["body", "start"]),
    ("unknown-field", "/v1/solve", lambda t: json.dumps({"profile": _profile_json(t), "budgets": ["4bpw"],
                                                         "speed": "max"}), ["body", "speed"]),
    ("path-like-id", "/v1/solve", lambda t: json.dumps({"profile_id": "../../etc/passwd", "budgets": ["4bpw"]}),
     ["body", "profile_id"]),
]


@pytest.mark.parametrize(("route", "body", "loc"), [c[1:] for c in SERVICE_CASES], ids=[c[0] for c in SERVICE_CASES])
def test_service_answers_422_with_a_field_path_never_500(server, api_table, route, body, loc):
    status, answer = _post(server + route, body(api_table).encode())
    assert status == 422, answer
    paths = [d["loc"][: len(loc)] for d in answer["detail"]]
    assert loc in paths, answer
    assert all("\n" not in d["msg"] for d in answer["detail"])


def test_the_table_has_at_least_60_cases():
    assert len(CLI_CASES) + len(API_CASES) + len(SERVICE_CASES) >= 60
