"""PNG plots: a measured comparison (the metric of every variant) and the cost–quality frontier.

Both are drawn with matplotlib's Agg backend (no display) and written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profilers.files import atomic_write_bytes
from profilers.types import ProfileTable

from .metrics import METRICS

if TYPE_CHECKING:
    from ..planning.frontier import FrontierPoint
    from .evaluate import Comparison

__all__ = ["plot_comparison", "plot_frontier"]

_COLORS = {"plan": "tab:blue", "uniform": "tab:orange", "peer": "tab:green"}


def _write_figure(path: str | os.PathLike[str], size: tuple[float, float], draw: Callable[[Any], None]) -> Path:
    """Draw on a fresh axes with `draw(ax)` and write the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=120)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_comparison(cmp: Comparison, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Horizontal bars of the metric per variant (FP as a dashed line), labelled with bits per
    weight."""
    rows = [m for m in cmp.rows if m is not cmp.fp]
    name = cmp.metric if cmp.fp.value(cmp.metric) is not None else "kl"
    attr, higher = METRICS[name]
    values = [getattr(m, attr) for m in rows]

    def draw(ax: Any) -> None:
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

    return _write_figure(path, (8, 1.2 + 0.45 * len(rows)), draw)


def plot_frontier(
    points: Sequence[FrontierPoint], profile: ProfileTable, path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Predicted (and measured) loss against model size, uniform settings as points."""
    from ..planning.uniform import uniform_points

    mb = [p.plan.predicted.bytes / 1e6 for p in points]
    lo, hi = min(mb), max(mb)
    uniform = [u for u in uniform_points(profile, {}) if lo * 0.8 <= u.bytes / 1e6 <= hi * 1.2]

    def draw(ax: Any) -> None:
        ax.plot(mb, [p.plan.predicted.loss for p in points], "-", color="tab:blue", lw=2, label="plan, predicted")
        measured = [(m, p.measured_loss) for m, p in zip(mb, points, strict=True) if p.measured_loss is not None]
        if measured:
            ax.plot(*zip(*measured, strict=True), "o", color="tab:blue", mfc="white", label="plan, measured")
        if uniform:
            ax.scatter([u.bytes / 1e6 for u in uniform], [u.loss for u in uniform], marker="s", color="tab:orange",
                       label="uniform settings, predicted", zorder=3)  # fmt: skip
            for u in uniform:
                ax.annotate(u.choice.label, (u.bytes / 1e6, u.loss), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("model size, MB (quantized weights with scales + everything kept in fp16)")
        ax.set_ylabel(f"loss [{profile.loss_units}]")
        ax.set_title(title or f"{profile.model_name}: optimal plans vs uniform settings")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()

    return _write_figure(path, (8, 5), draw)
