"""PNG of a measured comparison: the primary metric of every variant against its bits per weight."""

from __future__ import annotations

import io
import os
from pathlib import Path

from profilers.files import atomic_write_bytes

from .evaluate import METRICS, Comparison

__all__ = ["plot_comparison"]

_COLORS = {"plan": "tab:blue", "uniform": "tab:orange", "peer": "tab:green"}


def plot_comparison(cmp: Comparison, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Horizontal bars of the metric per variant (FP as a dashed line), labelled with bits per
    weight; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in cmp.rows if m is not cmp.fp]
    name = cmp.metric if cmp.fp.value(cmp.metric) is not None else "kl"
    attr, higher = METRICS[name]
    values = [getattr(m, attr) for m in rows]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)), dpi=120)
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=[_COLORS.get(m.kind, "tab:gray") for m in rows], alpha=0.85)
    ax.set_yticks(y, [f"{m.label}{'' if m.fits else ' (over)'}\n{m.bpw:.2f} bpw" for m in rows], fontsize=8)
    ax.axvline(getattr(cmp.fp, attr), color="black", ls="--", lw=1, label="FP")
    for yi, v in zip(y, values, strict=True):
        ax.annotate(f"{v:.4g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    finite = [v for v in values if v is not None]
    if higher and finite:  # zoom on the differences; bars start at the worst value shown
        lo = min(finite)
        top = max(max(finite), getattr(cmp.fp, attr))
        ax.set_xlim(max(0.0, lo - 0.1 * (top - lo + 1e-9)), top + 0.08 * (top - lo + 1e-9))
    ax.set_xlabel(f"{name} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(title or f"{name} of each variant, measured")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
