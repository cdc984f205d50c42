"""What every analysis's figure shares: integer layer ticks, rank axes that read, one legend outside the data.

Light on purpose: matplotlib only, no pyplot (figures are built as ``Figure`` objects, never shown).
"""

from __future__ import annotations

from collections.abc import Iterable

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FormatStrFormatter, MaxNLocator, NullFormatter, NullLocator


def layer_axis(ax: Axes, label: str = "layer") -> None:
    """An x axis of layers (or window starts): whole-number ticks only, labelled."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


RANK_TICKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


def rank_axis(ax: Axes, label: str = "median rank (1 = top)") -> None:
    """A y axis of token ranks: log scale, rank 1 at the top, ticks at 1, 2, 5, 10, 20... only (no minor labels
    to crowd each other), labelled."""
    ax.set_yscale("log")
    low, high = sorted(ax.get_ylim())
    low, high = max(low, 0.8), max(high, 1.2)
    ax.yaxis.set_major_locator(FixedLocator([t for t in RANK_TICKS if low <= t <= high * 1.0001] or [1]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(high * 1.1, low / 1.1)  # inverted: rank 1 at the top
    ax.set_ylabel(label)


def legend_outside(fig: Figure, axes: Iterable[Axes], *, title: str | None = None, ncols: int | None = None) -> None:
    """One legend for the figure, below the axes (outside every one of them), with each label once.

    The figure must use the constrained layout, which makes room for it.
    """
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels and not label.startswith("_"):
                handles.append(h)
                labels.append(label)
    if handles:
        n = ncols or min(len(labels), 4)
        fig.legend(handles, labels, loc="outside lower center", ncols=n, fontsize=8, title=title, frameon=False)
