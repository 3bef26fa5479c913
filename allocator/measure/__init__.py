"""How good a plan is, measured: against FP, uniform settings and peer quantizers.

- `metrics`: one variant's measured quality (divergence, cosine, accuracy, perplexity, ...).
- `evaluate`: `compare`, the plan-vs-everything table.
- `peers`: other quantizers (HQQ, ModelOpt AutoQuantize) at the plan's size.
- `validation`: a proxy profile against measured single-layer and whole-plan divergence.
- `plots`: PNGs of a comparison and of the frontier.
"""

__all__ = ["METRICS"]

# metric name -> (attribute of `metrics.Measured`, higher is better); torch-free, for the CLI
METRICS: dict[str, tuple[str, bool]] = {
    "cosine": ("cosine", True),
    "accuracy": ("accuracy", True),
    "agreement": ("agreement", True),
    "perplexity": ("perplexity", False),
    "wordsim": ("wordsim", True),
    "kl": ("divergence", False),
}
