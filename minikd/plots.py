"""Plots the pipeline writes (matplotlib, no display needed). Files are written atomically."""
from __future__ import annotations

import numpy as np

from .files import atomic_write

__all__ = ["learning_curves", "sweep_heatmap", "new_figure", "save_figure"]


def new_figure():
    """pyplot on the Agg backend (no display needed)."""
    # imported on first plot: pyplot costs about 0.4 s, which the commands that never plot
    # (evaluate, predict, gradcheck) should not pay, and the backend must be set before it loads
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save_figure(fig, path):
    """The figure as a PNG at ``path``, written atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def learning_curves(histories: dict, path):
    """Validation accuracy and training loss per epoch, one line per model."""
    plt = new_figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, h in histories.items():
        a1.plot(np.arange(1, len(h.val_accuracy) + 1), h.val_accuracy, label=name)
        a2.plot(np.arange(1, len(h.train_loss) + 1), h.train_loss, label=name)
    a1.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    a2.set(xlabel="epoch", ylabel="training loss (its own objective)", title="Training loss", yscale="log")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def sweep_heatmap(grid, temperatures, alphas, path, best=None, titles=None):
    """Validation accuracy of each (T, alpha) student: ``grid`` (T, alpha), or (panels, T, alpha)
    with a ``titles`` entry per panel (the sweep's betas); ``best``: (i, j), or (panel, i, j)."""
    grid = np.asarray(grid)
    grids = grid[None] if grid.ndim == 2 else grid
    if best is not None and len(best) == 2:
        best = (0, *best)
    plt = new_figure()
    width = 1.2 * len(alphas) + 2.5
    fig, axes = plt.subplots(1, len(grids), figsize=(width * len(grids), 0.8 * len(temperatures) + 2), squeeze=False)
    lo, hi = float(grids.min()), float(grids.max())
    for k, (ax, g) in enumerate(zip(axes[0], grids)):
        im = ax.imshow(g, cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        title = titles[k] if titles else "Student validation accuracy"
        ax.set(xlabel="alpha (weight of the distillation term)", ylabel="temperature T", title=title)
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                ax.text(j, i, f"{g[i, j]:.3f}", ha="center", va="center",
                        color="white" if g[i, j] < grids.mean() else "black", fontsize=8,
                        fontweight="bold" if best == (k, i, j) else "normal")
    if titles:
        fig.suptitle("Student validation accuracy")
    fig.colorbar(im, ax=list(axes[0]))
    save_figure(fig, path)
    plt.close(fig)
