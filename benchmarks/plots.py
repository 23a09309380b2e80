"""The benchmark figures (matplotlib, no display needed; written atomically like the pipeline's)."""
from __future__ import annotations

import numpy as np

from minikd.plots import new_figure, save_figure


def benchmark_cpu(result, path):
    """Percent of the memory floor per shape (the copy bandwidth on the kernel's threads): the Numba
    kernel (float32, and bfloat16 against its own 6-byte floor), the NumPy reference, PyTorch eager,
    torch.compile."""
    plt = new_figure()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(rows))
    impls = [("numba_ms", "floor_ms", "Numba kernel"), ("numba_bf16_ms", "bf16_floor_ms", "Numba kernel, bfloat16"),
             ("numpy_ms", "floor_ms", "NumPy reference"), ("torch_eager_ms", "floor_ms", "PyTorch eager"),
             ("torch_compile_ms", "floor_ms", "torch.compile")]
    impls = [i for i in impls if any(r.get(i[0]) for r in rows)]
    width = 0.8 / len(impls)
    for i, (key, floor, name) in enumerate(impls):
        ax.bar(x + (i - (len(impls) - 1) / 2) * width, [100 * r[floor] / r[key] if r.get(key) else 0 for r in rows],
               width, label=name)
    ax.axhline(70, color="k", lw=0.8, ls="--", label="70%: the target at C >= 1000")
    ax.axhline(50, color="gray", lw=0.8, ls=":", label="50%: the target at C = 10, 100")
    ax.set_xticks(x, [f"({r['N']},{r['C']})" for r in rows])
    threads = result.get("copy_threads", 1)
    ax.set(ylabel="% of the memory floor (higher is better)",
           title=f"softmax-KL loss + gradient, float32, {result['machine']} "
                 f"(floor: copy at {result['copy_bandwidth_GBps']:.1f} GB/s on {threads} threads)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def benchmark_gpu(result, path):
    """Percent of the memory floor per shape: the kernel, the whole call, PyTorch eager and torch.compile."""
    plt = new_figure()
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
    save_figure(fig, path)
    plt.close(fig)
