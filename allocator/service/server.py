"""Running the planning service: `serve` (uvicorn, until interrupted) and `spawned` (a child
process on a free loopback port, for tests, benchmarks and notebooks)."""

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import AllocatorError
from .schemas import ServiceLimits

__all__ = ["TOKEN_ENV", "is_loopback", "serve", "spawned"]

TOKEN_ENV = "ALLOCATOR_TOKEN"


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
    if token is not None and (not token.strip() or token != token.strip()):
        raise AllocatorError(
            "the --token is blank or has spaces around it, so no client could send it; give a token such as"
            " the output of `python -c 'import secrets; print(secrets.token_urlsafe())'`"
        )
    folder = Path(data_dir)
    if folder.exists() and not folder.is_dir():
        raise AllocatorError(f"--data-dir {folder} is a file; give a folder to keep uploaded profiles in")
    if token is None and not is_loopback(host):
        raise AllocatorError(
            f"refusing to serve on {host} without a token: anyone who can reach it could use it; "
            f"pass --token or set {TOKEN_ENV}, or serve on 127.0.0.1"
        )
    from .app import create_app

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
