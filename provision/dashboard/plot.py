"""Benchmark tables as one PNG (matplotlib, headless): a panel per table, grouped bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.dashboard.benchdata import Table
from provision.errors import ClawError


def pyplot() -> Any:
    """matplotlib's pyplot, headless; asked for before a long benchmark, so that a missing
    matplotlib is said at once rather than after the run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ClawError("--plot needs matplotlib (pip install 'clawforge[dashboard]')") from None
    return plt


def plot_tables(tables: list[Table], out: Path, title: str = "") -> Path:
    """Write `out` (PNG) with a horizontal grouped bar panel per table; temp file + rename."""
    plt = pyplot()
    if not tables:
        raise ClawError("nothing to plot: no table with numbers")
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 2.2 + 3.2 * len(tables)),
                             squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        series = table.series()[:4]  # more columns than four make a panel unreadable
        labels = table.labels()
        height = 0.8 / max(len(series), 1)
        for k, (name, values) in enumerate(series):
            ys = [i + k * height for i in range(len(labels))]
            bars = ax.barh(ys, values, height=height, label=name)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_yticks([i + height * (len(series) - 1) / 2 for i in range(len(labels))],
                      [label[:40] for label in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(table.section[:90], fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9, y=0.998)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
