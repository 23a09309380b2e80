"""Forward + backward time of the pipeline's default teacher CNN on a batch of 128 MNIST-1D-shaped
inputs, minikd (NumPy) next to the same network in PyTorch eager on the CPU (median of repeats).

    python benchmarks/nn_teacher.py [--out DIR]      # results in bench-out/ unless told
"""
import argparse
import json
from pathlib import Path

import numpy as np

from harness import add_out_argument, cpu_machine, median_time
from minikd.nn.models import teacher_cnn


def median_ms(fn, repeats=30):
    return 1e3 * median_time(fn, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(ap)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 40)).astype(np.float32)
    g = rng.standard_normal((128, 10)).astype(np.float32)
    model = teacher_cnn(40, 10, seed=0)

    def ours():
        model.zero_grad()
        y, c = model.forward(x, train=True)
        model.backward(g, c)
    res = {"batch": 128, "parameters": model.num_parameters(), "minikd_ms": median_ms(ours)}
    try:
        import torch
        t = torch.nn
        tm = t.Sequential(t.Unflatten(1, (1, 40)), t.Conv1d(1, 32, 5, padding=2), t.BatchNorm1d(32), t.ReLU(),
                          t.Conv1d(32, 32, 5, padding=2), t.BatchNorm1d(32), t.ReLU(), t.MaxPool1d(2),
                          t.Conv1d(32, 64, 3, padding=1), t.BatchNorm1d(64), t.ReLU(), t.MaxPool1d(2),
                          t.Conv1d(64, 64, 3, padding=1), t.ReLU(), t.AdaptiveAvgPool1d(1), t.Flatten(),
                          t.Linear(64, 10))
        X, G = torch.from_numpy(x), torch.from_numpy(g)

        def theirs():
            tm.zero_grad()
            tm(X).backward(G)
        res["torch_eager_ms"] = median_ms(theirs)
        res["torch_threads"] = torch.get_num_threads()
        res["torch_parameters"] = sum(p.numel() for p in tm.parameters())
    except ImportError:
        pass
    res["machine"] = cpu_machine()
    print(json.dumps(res, indent=1))
    out = Path(args.out) / f"nn_teacher-{res['machine']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
