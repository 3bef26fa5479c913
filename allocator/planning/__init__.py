"""Planning: a `ProfileTable`, budgets and constraints in, a `Plan` out. No torch needed
except to resolve tie presets on a model (`ties`).

- `budget`: budgets as users write them (`12MB`, `3.5bpw`, `25%`, `40GBOPs`).
- `plan`: the `Plan` file and its parts.
- `build`: `plan_from_profile` (profile -> solver problem -> solution -> plan).
- `constraints`, `uniform`: per-layer constraints; uniform settings priced on the profile.
- `ties`: tie groups from the layer graph.
- `frontier`: optimal plans over a sweep of budgets.
"""

from profilers.lazy import lazy_exports

_EXPORTS = {
    "Budget": ".budget",
    "format_bytes": ".budget",
    **dict.fromkeys(["Constraints", "LayerPlan", "Plan", "Predicted", "SolverReport", "UniformPoint"], ".plan"),
    **dict.fromkeys(["plan_from_profile", "resource_limits"], ".build"),
    "allowed_options": ".constraints",
    **dict.fromkeys(["common_choices", "uniform_points"], ".uniform"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
