"""A planning client needs no torch: `allocator.client` and the file types it reads import, and
plan over HTTP, in a process where `import torch` fails."""

import subprocess
import sys
import textwrap

import torch
from torch import nn

import allocator
from allocator.service import spawned

# Run in a fresh interpreter in which torch (and what needs it) cannot be imported.
CLIENT = textwrap.dedent(
    """
    import sys
    for name in ("torch", "transformers", "fastapi", "uvicorn"):
        sys.modules[name] = None  # `import name` now raises ImportError
    from allocator.client import Client
    from allocator.planning.budget import Budget
    from allocator.planning.plan import Plan
    from profilers.types import Choice, ProfileTable

    table = ProfileTable.load(sys.argv[2])
    assert Budget.parse("3.5bpw").value == 3.5 and Choice.parse("int4-g64").bits == 4
    plan = Client(sys.argv[1]).solve(table, ["4bpw"])
    plan.save(sys.argv[3])
    assert Plan.load(sys.argv[3]) == plan
    assert not [m for m in ("torch", "transformers") if sys.modules.get(m) is not None]
    print("planned", len(plan.layers), "layers without torch")
    """
)


def test_the_client_plans_over_http_without_torch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    table = allocator.profile(model, [torch.randn(8, 32) for _ in range(2)], method="rtn")
    table.save(tmp_path / "profile.json")
    with spawned(tmp_path / "server") as url:
        res = subprocess.run([sys.executable, "-c", CLIENT, url, str(tmp_path / "profile.json"),
                              str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "planned 2 layers without torch" in res.stdout
    local = allocator.solve(table, budget="4bpw")
    assert (tmp_path / "plan.json").read_text() == local.model_dump_json(indent=1) + "\n"


def test_a_blocked_torch_really_fails_to_import():
    """The check above is only meaningful if blocking works: importing the profilers' math fails."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n import profilers.quant.quantize\nexcept ImportError:\n print('blocked')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "blocked", res.stderr
