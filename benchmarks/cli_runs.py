"""Running the `allocator` command from the benchmarks, and reading `allocator evaluate --json`."""

from __future__ import annotations

import subprocess
import sys
import time


def allocator(*args: str) -> tuple[str, float]:
    """Run the CLI (no progress bars); its stdout and wall seconds. Exits naming the command on failure."""
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "allocator.cli", *args, "--no-progress"], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        sys.exit(f"allocator {' '.join(args)} failed:\n{res.stderr}")
    return res.stdout, time.perf_counter() - start


def best(rows: list[dict], kind: str, metric: str, prefix: str = "") -> str:
    """The fitting row of `kind` (label starting with `prefix`) best by `metric` (perplexity:
    lowest; others: highest), as `value setting @bpw` (`value / value elsewhere` when the row was
    also measured on text of another domain), or "skipped"."""
    found = [r for r in rows if r["kind"] == kind and r["fits"] and r["label"].startswith(prefix)]
    if not found:
        return "skipped"
    pick = min if metric == "perplexity" else max
    r = pick(found, key=lambda r: r[metric])
    return f"{value(r, metric)} {r['label'].split()[-1]} @{r['bpw']:.2f}"


def value(row: dict, metric: str) -> str:
    """A row's `metric`, and after a slash the same on text of another domain when measured there."""
    show = (lambda v: f"{v:.2f}") if metric == "perplexity" else (lambda v: f"{v:.4f}")
    other = row.get("elsewhere")
    return show(row[metric]) + ("" if other is None else f" / {show(other[metric])}")
