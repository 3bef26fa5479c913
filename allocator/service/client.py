"""Python client of `allocator serve`: the standard library, pydantic and numpy, no torch, so it
runs wherever plans are needed (`import allocator.client` works without torch installed).

Example:
    >>> from allocator.client import Client  # doctest: +SKIP
    >>> server = Client("http://127.0.0.1:8000", token=None)  # doctest: +SKIP
    >>> pid = server.upload(ProfileTable.load("profile.json"))  # doctest: +SKIP
    >>> plan = server.solve(pid, ["12MB"])  # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

from profilers.types import ProfileTable

from ..errors import AllocatorError
from ..planning.plan import Constraints, Plan

__all__ = ["Client", "ServiceError"]


class ServiceError(AllocatorError):
    """The server refused a request or could not be reached; `status` is the HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class Client:
    """Talks JSON to one server over http or https.

    Args:
        url: the server, `http://host:port` or `https://...`.
        token: bearer token; defaults to the `ALLOCATOR_TOKEN` environment variable.
        timeout: seconds to wait for an answer (solves can take a while).
        connect_timeout: seconds to wait for the connection itself.

    Raises:
        ServiceError: a URL that is not http(s).
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0, connect_timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"server URL {url!r} is not an http(s) URL; write it like http://127.0.0.1:8000")
        self.url = url.strip().rstrip("/")
        self._parts = parts
        self.token = token if token is not None else os.environ.get("ALLOCATOR_TOKEN")
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def upload(self, profile: ProfileTable) -> str:
        """Store the profile on the server; returns its id (the same profile always gets the same id)."""
        return self._call("POST", "/v1/profiles", profile.model_dump_json())["id"]

    def profile(self, profile_id: str) -> ProfileTable:
        return ProfileTable.model_validate(self._call("GET", f"/v1/profiles/{profile_id}"))

    def solve(
        self,
        profile: ProfileTable | str,
        budgets: Sequence[str] = (),
        *,
        ties: Sequence[Sequence[str]] = (),
        constraints: Constraints | None = None,
        solver: str = "auto",
        gap: float = 1e-6,
        time_limit: float = 10.0,
    ) -> Plan:
        """The plan for a profile (inline, or the id `upload` returned) within `budgets`."""
        body = self._ref(profile, constraints, solver, gap, time_limit)
        body.update(budgets=list(budgets), ties=[list(t) for t in ties])
        return Plan.model_validate(self._call("POST", "/v1/solve", json.dumps(body)))

    def frontier(
        self,
        profile: ProfileTable | str,
        start: str,
        stop: str,
        points: int = 20,
        *,
        constraints: Constraints | None = None,
        solver: str = "auto",
        gap: float = 1e-6,
        time_limit: float = 10.0,
    ) -> list[tuple[str, Plan]]:
        """(budget, plan) for each budget of the sweep that admits a plan."""
        body = self._ref(profile, constraints, solver, gap, time_limit)
        body.update(start=start, stop=stop, points=points)
        answer = self._call("POST", "/v1/frontier", json.dumps(body))
        return [(p["budget"], Plan.model_validate(p["plan"])) for p in answer["points"]]

    @staticmethod
    def _ref(profile, constraints, solver, gap, time_limit) -> dict[str, Any]:
        body: dict[str, Any] = {
            "constraints": (constraints or Constraints()).model_dump(mode="json"),
            "options": {"solver": solver, "gap": gap, "time_limit": time_limit},
        }
        if isinstance(profile, ProfileTable):
            body["profile"] = profile.model_dump(mode="json")
        else:
            body["profile_id"] = profile
        return body

    def _call(self, method: str, path: str, body: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        parts = self._parts
        https = parts.scheme == "https"
        connection_type = http.client.HTTPSConnection if https else http.client.HTTPConnection
        conn = connection_type(parts.hostname, parts.port or (443 if https else 80), timeout=self.connect_timeout)
        try:
            conn.connect()  # within connect_timeout; then the answer may take up to `timeout`
            conn.sock.settimeout(self.timeout)
            conn.request(method, parts.path.rstrip("/") + path, body=body.encode() if body else None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ServiceError(f"cannot reach {self.url} ({e}); is `allocator serve` running there?") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise ServiceError(f"{self.url} answered {response.status}: {_detail(payload, response.reason)}",
                               response.status)  # fmt: skip
        try:
            return json.loads(payload)
        except ValueError:
            raise ServiceError(f"{self.url} answered {response.status} with something that is not JSON") from None


def _detail(payload: bytes, reason: str) -> str:
    try:
        detail = json.loads(payload).get("detail", "")
    except (ValueError, AttributeError):
        return reason
    if isinstance(detail, list):  # FastAPI validation errors: name the field paths
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ()))}: {d.get('msg', '')}" for d in detail[:3])
    return str(detail)
