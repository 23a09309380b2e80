"""Run by test_cuda_source.py in a subprocess with NUMBA_ENABLE_CUDASIM=1: the numba.cuda twin
of the long-row CUDA algorithm against the float64 reference. Prints one line per case."""
import numpy as np

import minikd as mk
from minikd.kernels.cuda_twin import softmax_kl_rows_twin


def case(seed, N, C, T, alpha, kind):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((N, C)) * 3
    t = rng.standard_normal((N, C)) * 3
    s[rng.random(s.shape) < 0.05] *= 20                      # outliers
    pad = rng.random(s.shape) < 0.1
    pad[:, 0] = False
    s[pad] = -np.inf
    t[pad] = -np.inf                                         # shared padding
    t[rng.random(s.shape) < 0.1] = -np.inf                   # classes only the teacher rules out
    t[:, 0] = 0.5
    y = rng.integers(0, C, N)
    y = np.where(np.isneginf(np.take_along_axis(s, y[:, None], 1))[:, 0], 0, y)
    w = np.ones(N)
    w[-1] = 0.0                                              # a row that counts nowhere
    s[-1, 1] = np.nan                                        # ... and is not inspected
    s, t = s.astype(np.float32), t.astype(np.float32)
    ref_rows, cache = mk.kd_forward(s[:-1].astype(np.float64), t[:-1].astype(np.float64), y[:-1], T=T,
                                    alpha=alpha, kind=kind, reduction="none")
    ref_grad = mk.kd_backward(np.ones(N - 1), cache)
    g, rows, flags = softmax_kl_rows_twin(s, t, y.astype(np.int64), w, T, alpha * T * T, 1 - alpha, kind == "ce")
    scale = np.abs(ref_rows).max() + alpha * T * T * np.log(C)
    loss_err = np.abs(rows[:-1] - ref_rows).max() / scale
    grad_err = np.abs(g[:-1] - ref_grad).max() / np.abs(ref_grad).max()
    ok = flags.max() == 0 and np.all(g[-1] == 0) and rows[-1] == 0
    print(f"case N={N} C={C} T={T} alpha={alpha} kind={kind} loss_err={loss_err:.2e} grad_err={grad_err:.2e} ok={ok}")


def flags_case():
    s = np.zeros((3, 40), np.float32)
    t = np.zeros((3, 40), np.float32)
    s[0, 7] = np.nan
    t[1, :] = -np.inf
    s[2, 3] = np.inf
    _, _, flags = softmax_kl_rows_twin(s, t, np.zeros(3, np.int64), np.ones(3), 2.0, 4.0, 0.5, False)
    print(f"flags {[int(f) for f in flags]}")


def infinite_case():
    s = np.zeros((1, 40), np.float32)
    t = np.zeros((1, 40), np.float32)
    s[0, :20] = -np.inf                 # the teacher has mass where the student has none
    _, rows, flags = softmax_kl_rows_twin(s, t, np.zeros(1, np.int64) + 25, np.ones(1), 1.0, 1.0, 0.0, False)
    print(f"infinite {rows[0]} {flags[0]}")


if __name__ == "__main__":
    np.seterr(all="ignore")  # the flagged rows compute on NaN and inf on purpose
    for seed, (N, C, T, alpha, kind) in enumerate([(4, 70, 2.0, 0.6, "kl"), (4, 70, 2.0, 0.6, "ce"),
                                                  (3, 5, 1.0, 0.5, "kl"), (3, 200, 0.05, 0.9, "kl"),
                                                  (3, 129, 50.0, 1.0, "ce"), (3, 64, 4.0, 0.0, "kl")]):
        case(seed, N, C, T, alpha, kind)
    flags_case()
    infinite_case()
