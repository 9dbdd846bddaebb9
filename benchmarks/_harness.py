"""Side-by-side benchmark plumbing: interleaved repetitions, medians, tables, JSON, plots.

Every figure is taken in one run with the paths interleaved (A B C A B C ...), so that
noise from other tenants (steal time is 5-12 % here) hits every path alike; ratios are
computed within the run.  Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """This path cannot run on this machine; the message says why (shown in the report)."""


def corral_argv() -> list[str]:
    """How to start corral: the venv's console script if present, else ``python -m corral``."""
    script = Path(sys.executable).with_name("corral")
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral"]


def interleave(
    paths: dict[str, Callable[[], dict[str, float]]], reps: int, *, log=print
) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """Run every path ``reps`` times, interleaved.  A path that raises Unavailable is dropped.

    Returns ({path: {metric: [samples]}}, {path: reason it was dropped}).
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
    dropped: dict[str, str] = {}
    for rep in range(reps):
        for name, fn in paths.items():
            if name in dropped:
                continue
            try:
                result = fn()
            except Unavailable as exc:
                dropped[name] = str(exc)
                log(f"  {name}: skipped: {exc}")
                continue
            for metric, value in result.items():
                samples[name].setdefault(metric, []).append(value)
        log(f"  repetition {rep + 1}/{reps} done")
    return {k: v for k, v in samples.items() if k not in dropped}, dropped


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(
    summary: dict[str, dict[str, dict[str, float]]],
    metrics: list[tuple[str, str]],
    *,
    baseline: str | None = None,
) -> str:
    """Markdown: one row per path, one column per metric: ``median (min-max) ratio``."""
    head = "| path | " + " | ".join(title for _, title in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for path, stats in summary.items():
        cells = []
        for metric, _ in metrics:
            s = stats.get(metric)
            if s is None:
                cells.append("—")
                continue
            cell = f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"
            base = summary.get(baseline, {}).get(metric) if baseline else None
            if base and path != baseline and base["median"]:
                cell += f" **{s['median'] / base['median']:.2f}×**"
            cells.append(cell)
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "uid": os.getuid(),
        "loadavg": load,
    }


def save(name: str, data: dict, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    (out / f"{name}-latest.json").write_text(path.read_text())
    return path


def plot(
    name: str,
    summary: dict[str, dict[str, dict[str, float]]],
    metrics: list[tuple[str, str]],
    out: Path = RESULTS,
) -> Path | None:
    """One bar chart per metric (median, min-max whiskers); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [(m, t) for m, t in metrics if any(m in s for s in summary.values())]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], shown):
        names = [p for p in summary if metric in summary[p]]
        med = [summary[p][metric]["median"] for p in names]
        lo = [m - summary[p][metric]["min"] for p, m in zip(names, med)]
        hi = [summary[p][metric]["max"] - m for p, m in zip(names, med)]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
