"""`allocator serve`: the real server on a free loopback port, spoken to over HTTP."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

import allocator
from allocator.client import Client, ServiceError
from allocator.planning.build import plan_from_profile
from allocator.planning.frontier import budget_sweep, sweep
from allocator.planning.plan import Constraints, Plan
from allocator.service import is_loopback, spawned
from profilers.types import ProfileTable


def _post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def table() -> ProfileTable:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    data = [torch.randn(16, 64) for _ in range(4)]
    return allocator.profile(model, data, method="rtn")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with spawned(tmp_path_factory.mktemp("service")) as url:
        yield url


def test_solve_and_frontier_match_the_local_solver_byte_for_byte(server, table):
    client = Client(server)
    assert client.health()["status"] == "ok"
    pid = client.upload(table)
    assert client.upload(table) == pid  # content-addressed: the same profile, the same id
    assert client.profile(pid) == table

    constraints = Constraints(forbid=(("*", "int2*"),))
    local = plan_from_profile(table, ["4bpw"], constraints=constraints)
    by_id = client.solve(pid, ["4bpw"], constraints=constraints)
    inline = client.solve(table, ["4bpw"], constraints=constraints)
    assert by_id.model_dump_json() == local.model_dump_json() == inline.model_dump_json()
    assert not any(lp.choice.label.startswith("int2") for lp in by_id.layers.values())

    points = client.frontier(pid, "3bpw", "6bpw", 5)
    expected = sweep(table, budget_sweep(allocator.Budget.parse("3bpw"), allocator.Budget.parse("6bpw"), 5))
    assert [b for b, _ in points] == [p.budget for p in expected]
    assert [p.model_dump_json() for _, p in points] == [p.plan.model_dump_json() for p in expected]
    losses = [p.predicted.loss for _, p in points]
    assert losses == sorted(losses, reverse=True)


def test_the_cli_solves_on_a_server_and_writes_the_same_plan(server, table, tmp_path):
    table.save(tmp_path / "p.json")
    run = [sys.executable, "-m", "allocator", "solve", "-p", str(tmp_path / "p.json"), "--budget", "4.5bpw"]
    remote = subprocess.run([*run, "--server", server, "-o", str(tmp_path / "remote.json")], capture_output=True)
    assert remote.returncode == 0, remote.stderr.decode()
    local = subprocess.run([*run, "-o", str(tmp_path / "local.json")], capture_output=True)
    assert local.returncode == 0, local.stderr.decode()
    assert (tmp_path / "remote.json").read_bytes() == (tmp_path / "local.json").read_bytes()

    nothing = subprocess.run([*run, "--server", "http://127.0.0.1:1"], capture_output=True, text=True)
    assert nothing.returncode == 2 and "cannot reach http://127.0.0.1:1" in nothing.stderr


def test_every_error_is_a_status_with_a_message_never_a_500(server, table):
    url = server + "/v1/solve"
    pid = Client(server).upload(table)

    status, body = _post(url, b'{"profile_id": ')  # malformed JSON
    assert status == 422 and body["detail"][0]["type"] == "json_invalid"
    status, body = _post(url, json.dumps({"profile_id": pid, "budgets": ["4bpw"], "options": {"gap": -1}}).encode())
    assert status == 422 and body["detail"][0]["loc"] == ["body", "options", "gap"]
    status, body = _post(url, json.dumps({"budgets": ["4bpw"]}).encode())
    assert status == 422 and "exactly one of 'profile'" in body["detail"][0]["msg"]
    status, body = _post(url, json.dumps({"profile_id": "../../etc/passwd", "budgets": ["4bpw"]}).encode())
    assert status == 422 and body["detail"][0]["loc"] == ["body", "profile_id"]
    status, body = _post(url, json.dumps({"profile_id": "0" * 64, "budgets": ["4bpw"]}).encode())
    assert status == 404 and "upload it to /v1/profiles" in body["detail"]
    status, body = _post(url, json.dumps({"profile_id": pid, "budgets": ["12 parsecs"]}).encode())
    assert status == 422 and body["detail"][0]["loc"] == ["body", "budgets", 0]
    assert "cannot read budget '12 parsecs'" in body["detail"][0]["msg"]
    status, body = _post(url, json.dumps({"profile_id": pid, "budgets": ["1bpw"]}).encode())
    assert status == 422 and "smallest" in body["detail"]  # infeasible: names the least budget that fits
    with pytest.raises(ServiceError, match="404"):
        Client(server).profile("f" * 64)
    with urllib.request.urlopen(server + "/openapi.json") as r:
        schema = json.loads(r.read())
    assert {"/v1/solve", "/v1/frontier", "/v1/profiles", "/v1/profiles/{profile_id}"} <= set(schema["paths"])
    assert "Plan" in schema["components"]["schemas"] and "ProfileTable" in schema["components"]["schemas"]


def test_limits_are_enforced_and_named(tmp_path, table):
    small = allocator.profile(nn.Linear(32, 16), [torch.randn(8, 32)], method="rtn")
    args = ("--max-body-mb", "0.2", "--max-options", "200", "--max-budgets", "2", "--max-points", "5",
            "--max-time-limit", "0.5")  # fmt: skip
    with spawned(tmp_path, *args) as url:
        client = Client(url)
        pid = client.upload(small)
        with pytest.raises(ServiceError, match=r"422.*at most 200 \(--max-options\)"):
            client.upload(table)  # 3 layers x 91 options
        with pytest.raises(ServiceError, match=r"422.*at most 2 \(--max-budgets\)"):
            client.solve(pid, ["4bpw", "1MB", "1GBOPs"])
        with pytest.raises(ServiceError, match=r"422.*at most 5 \(--max-points\)"):
            client.frontier(pid, "3bpw", "6bpw", 6)
        status, body = _post(url + "/v1/solve", b" " * 300_000)
        assert status == 413 and "--max-body-mb" in body["detail"]
        plan = client.solve(pid, ["4bpw"], time_limit=100)
        assert plan.solver.time_limit == 0.5  # the request's limit is capped by the server's


def test_auth_when_a_token_is_set(tmp_path, table):
    with spawned(tmp_path, env={"ALLOCATOR_TOKEN": "s3cret"}) as url:
        with urllib.request.urlopen(url + "/healthz") as r:  # liveness needs no token
            assert r.status == 200
        body = json.dumps({"profile": table.model_dump(mode="json"), "budgets": ["4bpw"]}).encode()
        assert _post(url + "/v1/solve", body)[0] == 401
        assert _post(url + "/v1/solve", body, token="wrong")[0] == 401
        status, plan = _post(url + "/v1/solve", body, token="s3cret")
        assert status == 200 and Plan.model_validate(plan).predicted.bpw <= 4
        with pytest.raises(ServiceError, match="401"):
            Client(url, token="wrong").upload(table)
        assert len(Client(url, token="s3cret").upload(table)) == 64


def test_uploaded_profiles_survive_a_restart(tmp_path, table):
    with spawned(tmp_path) as url:
        pid = Client(url).upload(table)
    assert (tmp_path / "profiles" / f"{pid}.json").is_file()
    with spawned(tmp_path) as url:
        assert Client(url).profile(pid) == table
        assert (
            Client(url).solve(pid, ["4bpw"]).model_dump_json() == plan_from_profile(table, ["4bpw"]).model_dump_json()
        )


def test_a_public_host_needs_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    run = subprocess.run(
        [sys.executable, "-m", "allocator", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ALLOCATOR_TOKEN"},
        timeout=60,
    )
    assert run.returncode == 2 and "without a token" in run.stderr
