"""The ``minikd`` command line (argparse; one sub-command per task)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def cmd_gradcheck(args) -> int:
    from .selfcheck import run_all
    rows = run_all(seed=args.seed, rtol=args.rtol)
    print(f"{'op':<28}{'cases':>6}{'max abs err':>14}{'max rel err':>14}  result")
    for r in rows:
        print(f"{r.op:<28}{r.cases:>6}{r.max_abs:>14.2e}{r.max_rel:>14.2e}  "
              f"{'pass' if r.ok(args.rtol) else 'FAIL'}")
    failed = [r.op for r in rows if not r.ok(args.rtol)]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} ops pass (float64, central differences "
          f"O(h^4), relative error <= {args.rtol:g})")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minikd", description=__import__("minikd").__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gradcheck", help="check every op's hand-derived gradient numerically")
    g.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    g.add_argument("--rtol", type=float, default=1e-7, help="max relative error to pass (default 1e-7)")
    g.set_defaults(func=cmd_gradcheck)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # user errors: one line, no traceback
        print(f"minikd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
