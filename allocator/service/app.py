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
import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, TypeVar

from profilers.types import ProfileError, ProfileTable

from ..errors import AllocatorError, SolveTimeoutError
from ..planning.budget import Budget
from ..planning.build import plan_from_profile
from ..planning.frontier import budget_sweep, sweep
from ..planning.plan import Plan
from ..planning.uniform import uniform_points
from .schemas import (
    PROFILE_ID,
    FrontierPlan,
    FrontierRequest,
    FrontierResponse,
    ProfileCreated,
    ProfileRef,
    ServiceLimits,
    SkippedBudget,
    SolveOptions,
    SolveRequest,
)
from .store import ProfileStore

__all__ = ["PlanningService", "create_app"]

T = TypeVar("T")


def _http_error(status: int, detail: str, **headers: str) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status, detail, headers=headers or None)


def _field_error(loc: tuple[str, ...], message: str) -> Exception:
    """422 in the shape of FastAPI's validation errors, naming the field at fault."""
    from fastapi import HTTPException

    return HTTPException(422, [{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


class PlanningService:
    """What the routes do: profiles kept in a `ProfileStore`, solves run in a bounded pool.

    Args:
        data_dir: where uploaded profiles are kept.
        limits: what one request may ask for.
    """

    def __init__(self, data_dir: str | Path, limits: ServiceLimits) -> None:
        self.limits = limits
        self.store = ProfileStore(data_dir)
        self.pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="allocator-solve")
        self.pending = asyncio.Semaphore(limits.max_pending)

    def check_size(self, table: ProfileTable) -> None:
        cells = sum(len(layer.options) for layer in table.layers)
        if cells > self.limits.max_options:
            raise _field_error(("profile",), f"the profile has {len(table.layers)} layers and {cells} options in all;"
                               f" this server accepts at most {self.limits.max_options} (--max-options)")  # fmt: skip

    def resolve(self, ref: ProfileRef) -> ProfileTable:
        """The profile a request gives inline or by id."""
        if ref.profile is not None:
            self.check_size(ref.profile)
            return ref.profile
        assert ref.profile_id is not None
        try:
            return self.store.get(ref.profile_id)
        except KeyError:
            raise _http_error(404, f"no profile with id {ref.profile_id}; upload it to /v1/profiles first") from None
        except ProfileError as e:
            raise _http_error(500, f"stored profile {ref.profile_id} is unreadable: {e}") from None

    def time_limit(self, options: SolveOptions) -> float:
        return min(options.time_limit, self.limits.max_time_limit)

    async def run(self, fn: Callable[[], T], seconds: float) -> T:
        """Run `fn` in the pool; 503 when the queue is full, 504 past the server's wall-clock allowance."""
        if self.pending.locked():
            raise _http_error(503, f"{self.limits.max_pending} solves are running or queued (--max-pending);"
                                   " retry shortly", **{"Retry-After": "1"})  # fmt: skip
        async with self.pending:
            future = asyncio.get_running_loop().run_in_executor(self.pool, fn)
            try:
                # Solvers stop their exact work at the time limit; this only catches a runaway.
                return await asyncio.wait_for(asyncio.shield(future), timeout=2 * seconds + 30)
            except asyncio.TimeoutError:
                raise _http_error(504, f"the solve overran the server's limit of {seconds:g}s") from None

    async def upload(self, table: ProfileTable) -> ProfileCreated:
        self.check_size(table)
        key = await asyncio.get_running_loop().run_in_executor(None, self.store.put, table)  # file I/O, not a solve
        return ProfileCreated(id=key, layers=len(table.layers), options=sum(len(x.options) for x in table.layers))

    def fetch(self, profile_id: str) -> ProfileTable:
        return self.resolve(ProfileRef(profile_id=profile_id))

    async def solve(self, request: SolveRequest) -> Plan:
        if len(request.budgets) > self.limits.max_budgets:
            raise _field_error(("budgets",), f"{len(request.budgets)} budgets; this server accepts at most "
                                             f"{self.limits.max_budgets} (--max-budgets)")  # fmt: skip
        table = self.resolve(request)
        seconds = self.time_limit(request.options)
        return await self.run(
            lambda: plan_from_profile(table, [Budget.parse(b) for b in request.budgets], ties=request.ties,
                                      constraints=request.constraints, solver=request.options.solver,
                                      gap=request.options.gap, time_limit=seconds),
            seconds,
        )  # fmt: skip

    async def frontier(self, request: FrontierRequest) -> FrontierResponse:
        if request.points > self.limits.max_points:
            raise _field_error(("points",), f"{request.points} points; this server accepts at most"
                                            f" {self.limits.max_points} (--max-points)")  # fmt: skip
        table = self.resolve(request)
        seconds = self.time_limit(request.options)
        budgets = budget_sweep(Budget.parse(request.start), Budget.parse(request.stop), request.points)

        def work() -> FrontierResponse:
            skipped: list = []
            found = sweep(table, budgets, constraints=request.constraints, solver=request.options.solver,
                          gap=request.options.gap, time_limit=seconds, skipped=skipped)  # fmt: skip
            return FrontierResponse(
                points=[FrontierPlan(budget=p.budget, plan=p.plan) for p in found],
                skipped=[SkippedBudget(budget=s.budget, reason=s.reason) for s in skipped],
                uniform=uniform_points(table, {}),
            )

        return await self.run(work, seconds * request.points)


def create_app(data_dir: str | Path, *, token: str | None = None, limits: ServiceLimits | None = None):
    """The FastAPI application (run it with uvicorn, or `serve`)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    from .. import __version__

    service = PlanningService(data_dir, limits or ServiceLimits())
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise _http_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="allocator", version=__version__,
                  summary="Budgeted mixed-precision, multi-term quantization plans from a ProfileTable.")  # fmt: skip
    app.add_middleware(_BodyLimit, max_bytes=service.limits.max_body_bytes)
    app.router.on_shutdown.append(lambda: service.pool.shutdown(wait=False, cancel_futures=True))
    guarded = [Depends(authorize)]
    as_json = lambda model: Response(model.model_dump_json(), media_type="application/json")  # noqa: E731
    profile_id = PathParam(pattern=PROFILE_ID, description="the id /v1/profiles returned (64 hex digits)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The field path, the message and the kind; not the offending input, which may not even
        # be JSON (NaN, Infinity) and would turn a 422 into a 500.
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
                  for e in exc.errors()]  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(AllocatorError)
    async def _user_error(request: Request, exc: AllocatorError) -> JSONResponse:
        status = 504 if isinstance(exc, SolveTimeoutError) else 422
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/profiles", status_code=201, dependencies=guarded)
    async def upload(table: ProfileTable) -> ProfileCreated:
        return await service.upload(table)

    @app.get("/v1/profiles/{profile_id}", dependencies=guarded, response_model=ProfileTable)
    async def fetch(profile_id: Annotated[str, profile_id]) -> Response:
        return as_json(service.fetch(profile_id))

    @app.post("/v1/solve", dependencies=guarded, response_model=Plan)
    async def solve(request: SolveRequest) -> Response:
        return as_json(await service.solve(request))

    @app.post("/v1/frontier", dependencies=guarded, response_model=FrontierResponse)
    async def frontier(request: FrontierRequest) -> Response:
        return as_json(await service.frontier(request))

    return app


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
