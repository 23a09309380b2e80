"""How long one ``minikd diagnose`` takes: every loss of the test gallery and the held-out set
(tests/diagnose_gallery.py, tests/diagnose_heldout.py), timed in one process (the framework's import
excluded, its first calls included), with the diagnosis checked before its time counts.

    python benchmarks/diagnose_time.py [--out benchmarks/results]

The issue's target: under 10 s for a PyTorch loss on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness import add_out_argument, cpu_machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(ap)
    args = ap.parse_args()
    from diagnose_gallery import GALLERY   # noqa: PLC0415  (tests/ on the path above)
    from diagnose_heldout import HELDOUT   # noqa: PLC0415

    from minikd.diagnose import diagnose   # noqa: PLC0415
    rows = []
    for e in GALLERY + HELDOUT:
        t0 = time.perf_counter()
        d = diagnose(e["fn"], order=e["order"], teacher_as=e["teacher_as"], fixed=e["fixed"],
                     module_init=e["module_init"], sequence=e["sequence"]).to_dict()
        seconds = time.perf_counter() - t0
        right = all(d["conventions"].get(k) == v or (isinstance(v, float) and d["conventions"].get(k) is not None
                                                     and abs(d["conventions"][k] - v) <= 1e-6 * max(abs(v), 1))
                    for k, v in e["expect"].items())
        rows.append({"name": e["name"], "framework": e["needs"] or "numpy", "seconds": seconds, "right": right})
        print(f"{e['name']:<40}{rows[-1]['framework']:<7}{seconds:7.2f} s  {'right' if right else 'WRONG'}",
              flush=True)
    summary = {}
    for fw in sorted({r["framework"] for r in rows}):
        ts = [r["seconds"] for r in rows if r["framework"] == fw]
        summary[fw] = {"losses": len(ts), "median_s": statistics.median(ts), "max_s": max(ts)}
        print(f"{fw:<7} {len(ts):3d} losses: median {summary[fw]['median_s']:.2f} s, max {summary[fw]['max_s']:.2f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"diagnose_time-{cpu_machine()}.json"
    path.write_text(json.dumps({"machine": cpu_machine(), "date": time.strftime("%Y-%m-%d"), "summary": summary,
                                "wrong": [r["name"] for r in rows if not r["right"]], "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
