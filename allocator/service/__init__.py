"""The planning service: plans over HTTP from uploaded profiles, for many clients.

- `schemas`: requests, responses and the server's limits (pydantic; the OpenAPI schema).
- `store`: uploaded profiles on disk, content-addressed.
- `app`: the FastAPI application (`create_app`).
- `server`: `serve` and `spawned`.
- `client`: a Python client that needs neither torch nor FastAPI.
"""

from profilers.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["PlanningService", "create_app"], ".app"),
    **dict.fromkeys(["Client", "ServiceError"], ".client"),
    **dict.fromkeys(["TOKEN_ENV", "is_loopback", "serve", "spawned"], ".server"),
    **dict.fromkeys(["FrontierRequest", "FrontierResponse", "ServiceLimits", "SolveOptions", "SolveRequest"],
                    ".schemas"),
    "ProfileStore": ".store",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
