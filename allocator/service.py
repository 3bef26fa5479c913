"""The planning service behind `allocator serve`: solve and frontier over HTTP.

Profiling needs the model and runs where the model is. Solving needs only the `ProfileTable`
and is cheap, so one server can plan for many clients (CI jobs, notebooks, deploy scripts):

    POST /v1/profiles          a ProfileTable -> {"id": ...}   (content-addressed, kept on disk)
    GET  /v1/profiles/{id}     the ProfileTable
    POST /v1/solve             SolveRequest -> Plan            (the CLI's plan, byte for byte)
    POST /v1/frontier          FrontierRequest -> FrontierResponse
    GET  /healthz              liveness, no auth

Solves run in a bounded thread pool, off the event loop, each with a time limit capped by the
server's own. A solve that runs out of time returns its best plan with status `timeout`; one
that found no plan at all gets 504. Requests over a limit get 413 (body) or 422 (everything
else), naming the limit; malformed or invalid JSON gets FastAPI's 422 with field paths.
Profile ids are 64 hex digits checked before any file is touched, so no request can name a
path outside the data folder.

Needs the `serve` extra (`pip install 'allocator[serve]'`: fastapi, uvicorn).
"""

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from profilers.files import atomic_write_text
from profilers.specs import ProfileError, ProfileTable

from .budget import Budget
from .errors import AllocatorError, SolveTimeoutError
from .frontier import budget_sweep, sweep
from .plan import Constraints, Plan, UniformPoint
from .planning import plan_from_profile, uniform_points

__all__ = [
    "PROFILE_ID",
    "FrontierRequest",
    "FrontierResponse",
    "ProfileStore",
    "ServiceLimits",
    "SolveOptions",
    "SolveRequest",
    "create_app",
    "is_loopback",
    "serve",
    "spawned",
]

PROFILE_ID = r"^[0-9a-f]{64}$"
TOKEN_ENV = "ALLOCATOR_TOKEN"
T = TypeVar("T")


# ---------------------------------------------------------------- request and response models


class SolveOptions(BaseModel):
    """Solver settings, as `allocator solve` takes them."""

    model_config = ConfigDict(extra="forbid")

    solver: Literal["auto", "greedy", "cpsat", "milp", "lp", "exhaustive"] = "auto"
    gap: float = Field(default=1e-6, ge=0, le=1, description="relative optimality gap accepted as optimal")
    time_limit: float = Field(
        default=10.0, gt=0, description="seconds for exact work; capped by the server's --max-time-limit"
    )


class _ProfileRef(BaseModel):
    """A profile given inline or by the id an earlier upload returned (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")

    profile: ProfileTable | None = None
    profile_id: Annotated[str | None, Field(pattern=PROFILE_ID)] = None
    constraints: Constraints = Constraints()
    options: SolveOptions = SolveOptions()

    @model_validator(mode="after")
    def _one_profile(self):
        if (self.profile is None) == (self.profile_id is None):
            raise ValueError("give exactly one of 'profile' (a ProfileTable) and 'profile_id'")
        return self


class SolveRequest(_ProfileRef):
    """One plan within every budget (at most one per resource: bytes and BOPs), as `solve` makes it."""

    budgets: list[str] = Field(default_factory=list, description="e.g. ['12MB', '40GBOPs']; may be empty with max_loss")
    ties: list[list[str]] = Field(default_factory=list, description="groups of layer names that share one choice")


class FrontierRequest(_ProfileRef):
    """Optimal plans at `points` budgets evenly spaced from `start` to `stop` (one kind of budget)."""

    start: str = Field(description="e.g. '2bpw'")
    stop: str = Field(description="e.g. '8bpw'")
    points: int = Field(default=20, ge=2)


class FrontierPoint(BaseModel):
    budget: str
    plan: Plan


class FrontierResponse(BaseModel):
    """The plans (budgets no plan fits are left out) and every uniform setting, priced alike."""

    points: list[FrontierPoint]
    uniform: list[UniformPoint]


class ProfileCreated(BaseModel):
    id: str
    layers: int
    options: int


class ServiceLimits(BaseModel):
    """What one server accepts; each limit is named in the error a request over it gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=64 << 20, ge=1024)
    max_options: int = Field(default=2_000_000, ge=1, description="layers x options of one profile")
    max_budgets: int = Field(default=8, ge=1)
    max_points: int = Field(default=200, ge=2, description="frontier points per request")
    max_time_limit: float = Field(default=60.0, gt=0, description="seconds of exact work per solve")
    workers: int = Field(default=2, ge=1, description="solves running at once")
    max_pending: int = Field(default=1024, ge=1, description="solves running or queued; more get 503")


# ---------------------------------------------------------------- profile store


class ProfileStore:
    """Profiles on disk under `root/profiles/<sha256>.json`, with a small in-memory cache.

    The id is the SHA-256 of the profile's canonical JSON, so the same profile uploaded twice
    (or after a restart) gets the same id and one file. Files are written atomically.
    """

    def __init__(self, root: str | Path, *, cache_size: int = 16):
        self.folder = Path(root) / "profiles"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, ProfileTable] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def put(self, table: ProfileTable) -> str:
        text = table.model_dump_json()
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        path = self.folder / f"{key}.json"
        if not path.exists():
            atomic_write_text(path, text)
        self._remember(key, table)
        return key

    def get(self, key: str) -> ProfileTable:
        """The stored profile; `KeyError` when there is none with this id."""
        if not re.fullmatch(PROFILE_ID, key):  # never build a path from anything else
            raise KeyError(key)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path = self.folder / f"{key}.json"
        if not path.is_file():
            raise KeyError(key)
        table = ProfileTable.load(path)
        self._remember(key, table)
        return table

    def _remember(self, key: str, table: ProfileTable) -> None:
        with self._lock:
            self._cache[key] = table
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)


# ---------------------------------------------------------------- the app


def create_app(data_dir: str | Path, *, token: str | None = None, limits: ServiceLimits | None = None):
    """The FastAPI application (run it with uvicorn, or `serve`)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    from . import __version__

    limits = limits or ServiceLimits()
    store = ProfileStore(data_dir)
    pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="allocator-solve")
    pending = asyncio.Semaphore(limits.max_pending)
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="allocator",
        version=__version__,
        summary="Budgeted mixed-precision, multi-term quantization plans from a ProfileTable.",
    )
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.router.on_shutdown.append(lambda: pool.shutdown(wait=False, cancel_futures=True))
    guarded = [Depends(authorize)]

    @app.exception_handler(AllocatorError)
    async def _user_error(request: Request, exc: AllocatorError) -> JSONResponse:
        status = 504 if isinstance(exc, SolveTimeoutError) else 422
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def check_size(table: ProfileTable) -> None:
        cells = sum(len(layer.options) for layer in table.layers)
        if cells > limits.max_options:
            raise HTTPException(
                422,
                f"the profile has {len(table.layers)} layers and {cells} options in all; this server accepts at "
                f"most {limits.max_options} (--max-options)",
            )

    def resolve(ref: _ProfileRef) -> ProfileTable:
        if ref.profile is not None:
            check_size(ref.profile)
            return ref.profile
        assert ref.profile_id is not None
        try:
            return store.get(ref.profile_id)
        except KeyError:
            raise HTTPException(404, f"no profile with id {ref.profile_id}; upload it to /v1/profiles first") from None
        except ProfileError as e:
            raise HTTPException(500, f"stored profile {ref.profile_id} is unreadable: {e}") from None

    def time_limit(options: SolveOptions) -> float:
        return min(options.time_limit, limits.max_time_limit)

    async def run(fn: Callable[[], T], seconds: float) -> T:
        """Run `fn` in the pool; 503 when the queue is full, 504 past the server's wall-clock allowance."""
        if pending.locked():
            raise HTTPException(
                503, f"{limits.max_pending} solves are running or queued (--max-pending); retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        async with pending:
            future = asyncio.get_running_loop().run_in_executor(pool, fn)
            try:
                # Solvers stop their exact work at the time limit; this only catches a runaway.
                return await asyncio.wait_for(asyncio.shield(future), timeout=2 * seconds + 30)
            except asyncio.TimeoutError:
                raise HTTPException(504, f"the solve overran the server's limit of {seconds:g}s") from None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/profiles", status_code=201, dependencies=guarded)
    async def upload(table: ProfileTable) -> ProfileCreated:
        check_size(table)
        key = await asyncio.get_running_loop().run_in_executor(None, store.put, table)  # file I/O, not a solve
        return ProfileCreated(id=key, layers=len(table.layers), options=sum(len(x.options) for x in table.layers))

    @app.get("/v1/profiles/{profile_id}", dependencies=guarded, response_model=ProfileTable)
    async def fetch(profile_id: Annotated[str, _path_id()]) -> Response:
        table = resolve(_ProfileRef(profile_id=profile_id))
        return Response(table.model_dump_json(), media_type="application/json")

    @app.post("/v1/solve", dependencies=guarded, response_model=Plan)
    async def solve(request: SolveRequest) -> Response:
        if len(request.budgets) > limits.max_budgets:
            raise HTTPException(
                422, f"{len(request.budgets)} budgets; this server accepts at most {limits.max_budgets} (--max-budgets)"
            )
        table = resolve(request)
        seconds = time_limit(request.options)
        plan = await run(
            lambda: plan_from_profile(
                table,
                [Budget.parse(b) for b in request.budgets],
                ties=request.ties,
                constraints=request.constraints,
                solver=request.options.solver,
                gap=request.options.gap,
                time_limit=seconds,
            ),
            seconds,
        )
        return Response(plan.model_dump_json(), media_type="application/json")

    @app.post("/v1/frontier", dependencies=guarded, response_model=FrontierResponse)
    async def frontier(request: FrontierRequest) -> Response:
        if request.points > limits.max_points:
            raise HTTPException(
                422, f"{request.points} points; this server accepts at most {limits.max_points} (--max-points)"
            )
        table = resolve(request)
        seconds = time_limit(request.options)
        budgets = budget_sweep(Budget.parse(request.start), Budget.parse(request.stop), request.points)

        def work() -> FrontierResponse:
            found = sweep(
                table,
                budgets,
                constraints=request.constraints,
                solver=request.options.solver,
                gap=request.options.gap,
                time_limit=seconds,
            )
            return FrontierResponse(
                points=[FrontierPoint(budget=p.budget, plan=p.plan) for p in found],
                uniform=uniform_points(table, {}),
            )

        answer = await run(work, seconds * request.points)
        return Response(answer.model_dump_json(), media_type="application/json")

    return app


def _path_id():
    from fastapi import Path as PathParam

    return PathParam(pattern=PROFILE_ID, description="the id /v1/profiles returned (64 hex digits)")


class _BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 before the app parses it
    (checked on Content-Length and again on the bytes that actually arrive)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(send, scope)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send, scope)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, scope) -> None:
        detail = f"request body over this server's limit of {self.max_bytes} bytes (--max-body-mb)"
        payload = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------- running it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    data_dir: str | Path = "allocator-data",
    token: str | None = None,
    limits: ServiceLimits | None = None,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted. A non-loopback host needs a token."""
    try:
        import uvicorn
    except ImportError:
        raise AllocatorError("allocator serve needs fastapi and uvicorn: pip install 'allocator[serve]'") from None
    if token is None and not is_loopback(host):
        raise AllocatorError(
            f"refusing to serve on {host} without a token: anyone who can reach it could use it; "
            f"pass --token or set {TOKEN_ENV}, or serve on 127.0.0.1"
        )
    app = create_app(data_dir, token=token, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextlib.contextmanager
def spawned(
    data_dir: str | Path, *args: str, env: dict[str, str] | None = None, startup_s: float = 60.0
) -> Iterator[str]:
    """Run `allocator serve` in a child process on a free loopback port, for tests, benchmarks
    and notebooks; yields its URL once /healthz answers, and stops it (SIGINT) on exit.

    Example:
        >>> with spawned("allocator-data") as url:  # doctest: +SKIP
        ...     Client(url).health()
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "allocator", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--log-level", "warning", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AllocatorError(f"allocator serve exited at start: {output.strip()[-500:]}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AllocatorError(f"allocator serve did not answer on {url} within {startup_s:g}s") from None
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
