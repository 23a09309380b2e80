"""Peak memory and time of the RKD angle loss (forward + backward) at N = 512, D = 256, float64.

The authors' formulation builds the N x N x D tensor of difference vectors (512 MiB here) and an
N x N x N tensor of cosines (1 GiB); minikd's Gram-matrix form keeps O(N^2 + N D). Peak memory is
measured with tracemalloc (NumPy reports its allocations to it).

    python benchmarks/rkd_memory.py [--out DIR]      # results in bench-out/ unless told
"""
import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

import minikd as mk
from harness import add_out_argument, cpu_machine


def main(N=512, D=256):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(ap)
    args = ap.parse_args()
    r = np.random.default_rng(0)
    E, F = r.standard_normal((N, D)), r.standard_normal((N, 128))
    tracemalloc.start()
    t0 = time.perf_counter()
    value, cache = mk.rkd_angle_forward(E, F)
    grad = mk.rkd_angle_backward(1.0, cache)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res = {"N": N, "D": D, "dtype": "float64", "loss": float(value), "grad_norm": float(np.linalg.norm(grad)),
           "peak_MiB": peak / 2**20, "inputs_MiB": (E.nbytes + F.nbytes) / 2**20,
           "NxNxD_tensor_MiB": N * N * D * 8 / 2**20, "NxNxN_tensor_MiB": N**3 * 8 / 2**20,
           "seconds_forward_backward": seconds, "machine": cpu_machine()}
    print(json.dumps(res, indent=1))
    out = Path(args.out) / f"rkd_memory-{res['machine']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
