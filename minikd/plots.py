"""Plots the pipeline writes (matplotlib, no display needed). Files are written atomically."""
from __future__ import annotations

import numpy as np

from .nn.serialize import atomic_write

__all__ = ["learning_curves", "sweep_heatmap", "benchmark_cpu", "benchmark_gpu"]


def _figure():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def learning_curves(histories: dict, path):
    """Validation accuracy and training loss per epoch, one line per model."""
    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, h in histories.items():
        a1.plot(np.arange(1, len(h.val_accuracy) + 1), h.val_accuracy, label=name)
        a2.plot(np.arange(1, len(h.train_loss) + 1), h.train_loss, label=name)
    a1.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    a2.set(xlabel="epoch", ylabel="training loss (its own objective)", title="Training loss", yscale="log")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def sweep_heatmap(grid, temperatures, alphas, path, best=None):
    """Validation accuracy of each (T, alpha) student."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2.5, 0.8 * len(temperatures) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set(xlabel="alpha (weight of the distillation term)", ylabel="temperature T",
           title="Student validation accuracy")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                    color="white" if grid[i, j] < grid.mean() else "black", fontsize=8,
                    fontweight="bold" if best == (i, j) else "normal")
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    plt.close(fig)


def benchmark_cpu(result, path):
    """minikd bench: ms per call (log scale) per shape: the floor, the Numba kernel, the NumPy
    reference, PyTorch eager."""
    plt = _figure()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    for i, (key, name) in enumerate([("floor_ms", "memory floor"), ("numba_ms", "Numba kernel"),
                                     ("numpy_ms", "NumPy reference"), ("torch_eager_ms", "PyTorch eager")]):
        if key in rows[0]:
            ax.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=name)
    ax.set_xticks(x, [f"({r['N']},{r['C']})" for r in rows])
    ax.set(yscale="log", ylabel="ms per call (median)", title=f"softmax-KL loss + gradient, float32, {result['machine']}")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def benchmark_gpu(result, path):
    """minikd bench --gpu: percent of the memory floor per shape: the kernel, the whole call,
    PyTorch eager and torch.compile."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, dtype in zip(axes, ("float32", "bfloat16")):
        rows = [r for r in result["rows"] if r["dtype"] == dtype]
        x = np.arange(len(rows))
        for i, (key, label) in enumerate([("kernel_ms", "minikd kernel"), ("call_ms", "minikd call"),
                                          ("torch_eager_ms", "PyTorch eager"), ("torch_compile_ms", "torch.compile")]):
            ax.bar(x + (i - 1.5) * 0.2, [100 * r["floor_ms"] / r[key] if r.get(key) else 0 for r in rows], 0.2,
                   label=label)
        ax.axhline(85, color="k", lw=0.8, ls="--", label="85%: the target at C >= 1000")
        ax.set_xticks(x, [f"({r['N']},{r['C']})" for r in rows], rotation=20)
        ax.set(title=f"{dtype}", ylabel="% of the memory floor (higher is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"softmax-KL loss + gradient on {result['device']} (copy {result['copy_bandwidth_TBps']:.2f} TB/s)")
    _save(fig, path)
    plt.close(fig)
