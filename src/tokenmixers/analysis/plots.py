"""The analyses' line plots: one line per model in a grid of panels, written as a PNG."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed (or present on a server)
import matplotlib.pyplot as plt  # noqa: E402

from ..zoo import display_name  # noqa: E402


@dataclass
class Panel:
    """One panel: ``y`` against ``x`` of the rows that match ``where``."""

    x: str
    y: str
    title: str
    xlabel: str
    ylabel: str
    where: Mapping[str, Any] = field(default_factory=dict)


def plot_panels(results: Mapping[str, Sequence[Mapping[str, Any]]], grid: Sequence[Sequence[Panel]],
                path: Union[str, Path]) -> Path:
    """Rows of panels, one line per model (its rows with a value for the panel's ``y``); returns the path."""
    rows, cols = len(grid), max(len(r) for r in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for r, panels in enumerate(grid):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            for model, records in results.items():
                points = [p for p in records if p.get(panel.y) is not None
                          and all(p.get(k) == v for k, v in panel.where.items())]
                ax.plot([p[panel.x] for p in points], [p[panel.y] for p in points], marker=".",
                        label=display_name(model))
            ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["Panel", "plot_panels"]
