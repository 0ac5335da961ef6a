"""Speed charts as PNG: panels of grouped bars with their values written on them (matplotlib, headless).

Every benchmark command writes one beside its JSON: people compare bars faster than tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fastmae.atomic_file import atomic_write


@dataclass
class Series:
    """One bar per group label; None: no bar there (a failed or absent measurement)."""

    name: str
    values: Sequence[float | None]
    color: str | Sequence[str] | None = None  # one colour, or one per bar
    notes: Sequence[str] | None = None  # text above each bar; default: the value in the panel's value_format


@dataclass
class Panel:
    labels: Sequence[str]
    series: Sequence[Series]
    ylabel: str
    value_format: str = "{:.0f}"
    reference: float | None = None  # a horizontal line: a baseline or a bound
    reference_label: str | None = None


def write_bar_chart(path: str | Path, panels: Sequence[Panel], title: str) -> Path:
    """Panels stacked vertically, one figure, written to ``path`` (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"charts are written as PNG; {path} does not end in .png")
    widest = max(len(p.labels) * max(len(p.series), 1) for p in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(5.0, 0.75 * widest + 2.0), 3.4 * len(panels)),
                                squeeze=False)
    try:
        for axis, panel in zip(axes[:, 0], panels):
            _draw_panel(axis, panel)
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))
    finally:
        plt.close(figure)
    return path


def _draw_panel(axis, panel: Panel) -> None:
    width = 0.8 / max(len(panel.series), 1)
    for i, series in enumerate(panel.series):
        if len(series.values) != len(panel.labels):
            raise ValueError(f"series {series.name!r} has {len(series.values)} values for {len(panel.labels)} labels")
        offset = (i - (len(panel.series) - 1) / 2) * width
        xs = [j + offset for j in range(len(panel.labels))]
        heights = [v if v is not None else 0.0 for v in series.values]
        bars = axis.bar(xs, heights, width, label=series.name, color=series.color)
        notes = series.notes or [panel.value_format.format(v) if v is not None else "" for v in series.values]
        axis.bar_label(bars, labels=list(notes), fontsize=7)
    if panel.reference is not None:
        axis.axhline(panel.reference, color="black", linewidth=0.8, linestyle="--" if panel.reference_label else "-",
                     label=panel.reference_label)
    axis.set_xticks(range(len(panel.labels)), panel.labels, fontsize=8)
    axis.set_ylabel(panel.ylabel, fontsize=8)
    axis.margins(y=0.15)  # room for the labels above the tallest bar
    if len(panel.series) > 1 or panel.reference_label:
        axis.legend(fontsize=7)
