"""`allocator serve`: the planning service over HTTP."""

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .options import Token

__all__ = ["serve"]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(metavar="DIR", help="Where uploaded profiles are kept (survive restarts).")
    ] = Path("allocator-data"),
    token: Token = None,
    workers: Annotated[int, typer.Option(min=1, help="Solves running at once.")] = 2,
    max_time_limit: Annotated[float, typer.Option(min=0.01, help="Cap on a request's seconds of exact work.")] = 60.0,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body, MB.")] = 64.0,
    max_options: Annotated[int, typer.Option(min=1, help="Largest profile, layers x options.")] = 2_000_000,
    max_budgets: Annotated[int, typer.Option(min=1, help="Most budgets in one solve.")] = 8,
    max_points: Annotated[int, typer.Option(min=2, help="Most points in one frontier.")] = 200,
    max_pending: Annotated[int, typer.Option(min=1, help="Solves running or queued; more get 503.")] = 1024,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve solve and frontier over HTTP (POST /v1/solve, /v1/frontier, /v1/profiles; GET /healthz, /docs)."""
    from ..service.schemas import ServiceLimits
    from ..service.server import serve as run_server

    limits = ServiceLimits(
        max_body_bytes=int(max_body_mb * 1e6),
        max_options=max_options,
        max_budgets=max_budgets,
        max_points=max_points,
        max_time_limit=max_time_limit,
        workers=workers,
        max_pending=max_pending,
    )
    run_server(host, port, data_dir=data_dir, token=token, limits=limits, log_level=log_level)
