"""Requests and responses of the planning service, and the limits a server enforces.

The same pydantic models generate the OpenAPI schema (`/docs`) and validate every request.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from profilers.types import ProfileTable

from ..errors import BudgetError
from ..planning.budget import Budget
from ..planning.plan import Constraints, Plan, UniformPoint

__all__ = [
    "PROFILE_ID",
    "FrontierPlan",
    "FrontierRequest",
    "FrontierResponse",
    "ProfileCreated",
    "ProfileRef",
    "ServiceLimits",
    "SkippedBudget",
    "SolveOptions",
    "SolveRequest",
]

PROFILE_ID = r"^[0-9a-f]{64}$"


def _readable_budget(text: str) -> str:
    try:
        Budget.parse(text)
    except BudgetError as e:
        raise ValueError(str(e)) from None
    return text


# A budget string, refused at validation (422 with its field path) when it cannot be read.
BudgetText = Annotated[str, Field(max_length=64), AfterValidator(_readable_budget)]


class SolveOptions(BaseModel):
    """Solver settings, as `allocator solve` takes them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    solver: Literal["auto", "greedy", "cpsat", "milp", "lp", "exhaustive"] = "auto"
    gap: float = Field(default=1e-6, ge=0, le=1, description="relative optimality gap accepted as optimal")
    time_limit: float = Field(
        default=10.0, gt=0, description="seconds for exact work; capped by the server's --max-time-limit"
    )


class ProfileRef(BaseModel):
    """A profile given inline or by the id an earlier upload returned (exactly one of them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    profile: ProfileTable | None = None
    profile_id: Annotated[str | None, Field(pattern=PROFILE_ID)] = None
    constraints: Constraints = Constraints()
    options: SolveOptions = SolveOptions()

    @model_validator(mode="after")
    def _one_profile(self):
        if (self.profile is None) == (self.profile_id is None):
            raise ValueError("give exactly one of 'profile' (a ProfileTable) and 'profile_id'")
        return self


class SolveRequest(ProfileRef):
    """One plan within every budget (at most one per resource: bytes and BOPs), as `solve` makes it."""

    budgets: list[BudgetText] = Field(
        default_factory=list, description="e.g. ['12MB', '40GBOPs']; may be empty with max_loss"
    )
    ties: list[list[str]] = Field(default_factory=list, description="groups of layer names that share one choice")


class FrontierRequest(ProfileRef):
    """Optimal plans at `points` budgets evenly spaced from `start` to `stop` (one kind of budget)."""

    start: BudgetText = Field(description="e.g. '2bpw'")
    stop: BudgetText = Field(description="e.g. '8bpw'")
    points: int = Field(default=20, ge=2)


class FrontierPlan(BaseModel):
    """One plan of a frontier and the budget it was solved for."""

    budget: str
    plan: Plan


class SkippedBudget(BaseModel):
    """A budget of the sweep no plan fits, and why."""

    budget: str
    reason: str


class FrontierResponse(BaseModel):
    """The plans, the budgets no plan fits (with the reason), and every uniform setting."""

    points: list[FrontierPlan]
    skipped: list[SkippedBudget] = []
    uniform: list[UniformPoint]


class ProfileCreated(BaseModel):
    """What an upload returns: the profile's id and size."""

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
