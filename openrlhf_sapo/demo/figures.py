"""The study report's figures: one figure style (headless Agg backend, small fonts, 110 dpi PNG)."""

from __future__ import annotations

from typing import Optional


def subplots(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure and its row of `ncols` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def label(ax, xlabel: str, ylabel: str, title: Optional[str] = None, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7)


def save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
