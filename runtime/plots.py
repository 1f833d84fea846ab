"""PNG plots of a running Plan (matplotlib: the optional `plot` extra).

    timeline_png(events, path)     copy streams vs compute, one bar per unit, from handle.timeline()
    placement_png(plan, path)      bytes per unit, coloured by home device
    bench_png(rows, path)          step time vs offloaded fraction per method (bench/bench_stream.py rows)

For the built-in demo DiT (compiled with a budget, one step profiled, both PNGs written):

    python -m distorch.demo --plots OUT_DIR [--offload 0.5]

Call `require()` before the work whose result is plotted: without matplotlib it fails at once, naming
the install command (the README's: `pip install -e .[plot]` in a checkout, or `pip install matplotlib`).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["require", "PlotDependencyError", "INSTALL_HINT", "timeline_png", "placement_png", "placement_groups", "bench_png"]

INSTALL_HINT = "pip install matplotlib (or, in a checkout of distorch: pip install -e .[plot])"


class PlotDependencyError(ImportError):
    """matplotlib is missing."""


def require() -> None:
    """Raise PlotDependencyError (naming the install command) unless matplotlib can be imported."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise PlotDependencyError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}")


def _plt() -> Any:
    require()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError as e:  # pragma: no cover - a broken matplotlib install
        raise PlotDependencyError(f"plots need a working matplotlib ({e}): {INSTALL_HINT}") from e


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def timeline_png(events: list[dict], path: str, title: str = "distorch timeline") -> str:
    """One lane per copy link plus the compute lane; each unit call is a bar (start..end, ms)."""
    plt = _plt()
    lanes = ["compute"] + sorted({e["lane"] for e in events if e["lane"] != "compute"})
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.8 * len(lanes)))
    streamed = {u for e in events if e["lane"].startswith("copy") for u in e.get("units", [e["unit"]])}
    for li, lane in enumerate(lanes):
        for e in events:
            if e["lane"] != lane:
                continue
            w = max(e["end_ms"] - e["start_ms"], 1e-4)
            if lane == "compute":
                c = "#d62728" if e["unit"] in streamed else "#7f7f7f"
            else:
                c = _COLORS[(li - 1) % len(_COLORS)]
            ax.barh(li, w, left=e["start_ms"], height=0.6, color=c, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(lanes)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title + "  (compute: red = streamed unit, grey = resident)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def placement_groups(plan: Any) -> list[tuple[str, dict[str, int]]]:
    """(label, {device: bytes}) per bar in execution order: one per unit, except that the layers of a split
    block (kind "sub", passes/granularity.py) share one bar, the block's, stacked by where each layer lives
    (label: the first two parts of the name, `double_blocks.3`, the block a layer list holds)."""
    groups: list[tuple[str, dict[str, int]]] = []
    for u in sorted(plan.units, key=lambda u: u.order):
        key = ".".join(u.name.split(".")[:2]) if getattr(u, "kind", "") == "sub" else u.name
        if getattr(u, "kind", "") == "sub" and groups and groups[-1][0] == key:
            per = groups[-1][1]
        else:
            per = {}
            groups.append((key, per))
        per[u.device] = per.get(u.device, 0) + u.bytes
    return groups


def placement_png(plan: Any, path: str, title: str = "placement per unit") -> str:
    """Bar per unit in execution order (a split block's layers stacked in one bar), height = MiB, colour =
    home device."""
    plt = _plt()
    groups = placement_groups(plan)
    devs = sorted({u.device for u in plan.units}, key=lambda d: (d != plan.compute, d))
    col = {d: _COLORS[i % len(_COLORS)] for i, d in enumerate(devs)}
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(groups) + 3), 4))
    xs = range(len(groups))
    bottom = [0.0] * len(groups)
    for d in devs:
        h = [per.get(d, 0) / 2**20 for _, per in groups]
        if any(h):
            ax.bar(xs, h, bottom=bottom, color=col[d], width=0.85)
            bottom = [b + x for b, x in zip(bottom, h)]
    # the legend's entries are patches in the bars' own colours (an empty bar() gives a handle with no
    # patch, which matplotlib draws in the first cycle colour: every entry blue)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(facecolor=col[d], label=f"{d} (compute)" if d == plan.compute else f"{d} (home, streamed)")
                       for d in devs])
    ax.set_xlabel("unit, or block of split layers (execution order)")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    if len(groups) <= 40:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([g for g, _ in groups], rotation=90, fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_png(rows: list[dict], path: str) -> str:
    """Step time vs offloaded fraction per method, one panel per resolution (bench_stream rows)."""
    plt = _plt()
    ress = sorted({r["res"] for r in rows})
    fig, axes = plt.subplots(1, len(ress), figsize=(6 * len(ress), 4), squeeze=False)
    for ax, res in zip(axes[0], ress):
        rr = [r for r in rows if r["res"] == res]
        for mi, m in enumerate(sorted({r["method"] for r in rr})):
            pts = sorted((r["frac"], r["step_s"]) for r in rr if r["method"] == m and r.get("step_s"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m, color=_COLORS[mi % 8])
        ax.set_title(f"{res}x{res}")
        ax.set_xlabel("offloaded %")
        ax.set_ylabel("s / step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
