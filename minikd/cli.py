"""The ``minikd`` command line: argparse, one sub-command per task. It parses, calls and prints:
the pipeline's sub-commands turn their options into a ``minikd.experiments`` config (one option
per config field, with the config's default), run the experiment and print its report."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys

import minikd

from . import checks
from .checks import MissingDependency, UserError

# The numerical modules are imported inside main (where Ctrl-C is handled): importing them takes
# about 0.3 s, and an interrupt then would otherwise print a traceback.

__all__ = ["main", "build_parser"]

# What a user's mistake or the environment raises (options, data files, paths, a diverged run, a full
# or read-only disk, a missing optional package): one line on stderr, no traceback, exit code 2.
# Anything else (a plain ValueError, TypeError, KeyError, ...) is a bug in minikd and shows its
# traceback.
USER_ERRORS = (UserError, OSError, MissingDependency)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away), taking "-1e-3"
    and "-inf" as the (negative) value of an option, as it takes "-1", rather than as an option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, name, *bounds, **kw):
    """An argparse type for the options outside the configs: converted, then checked by
    ``minikd.checks`` (argparse reports the error as the option's)."""
    check = checks.integer if convert is int else checks.number

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check(name, value, *bounds, **kw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}: ")) from None
    return parse


def _model_name(text):
    from .experiments import CHECKS  # noqa: PLC0415
    try:
        return CHECKS["name"]("name", text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("name: ")) from None


SEED = _checked(int, "seed", 0, checks.MAX_SEED)
RTOL = _checked(float, "rtol", 0, exclusive_minimum=True)


def _one_line(exc) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, MissingDependency):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- the pipeline's options

# Every config field a sub-command can take: (argument group, argparse keywords). A sub-command
# lists exactly the fields of its experiment's config, so every option it accepts is one it uses.
_DATA, _TRAINING, _OUTPUT, _SCALE = "data", "training", "output", "scaling out (Dask)"
_FEATURES = "feature and relational distillation (each adds a row to the table)"
OPTIONS = {
    "models": (None, dict(type=int, help="cohort size M (default %(default)s)")),
    "data": (_DATA, dict(metavar="FILE.npz", help="your data: arrays x (N, D), y (N,), optional x_test, y_test, "
                         "x_transfer (default: MNIST-1D generated offline)")),
    "samples": (_DATA, dict(type=int, help="MNIST-1D samples, 80%% train / 20%% test (default %(default)s, the "
                            "paper's size)")),
    "transfer_samples": (_DATA, dict(type=int, metavar="N", help="N extra unlabeled samples labeled only by the "
                                     "teacher (Hinton's transfer set); the report also shows the student trained "
                                     "with them; 0 for none (default %(default)s)")),
    "seed": (_DATA, dict(type=int, help="seed of data, splits, init and batches (default %(default)s)")),
    "T": (_TRAINING, dict(type=float, help="temperature(s) (default %(default)s)")),
    "alpha": (_TRAINING, dict(type=float, help="weight(s) of the distillation term in [0, 1] (default %(default)s)")),
    "epochs": (_TRAINING, dict(type=int, help="student epochs (default %(default)s)")),
    "transfer_epochs": (_TRAINING, dict(type=int, help="student epochs with the transfer set, which has "
                                        "many more rows (default %(default)s)")),
    "teacher_epochs": (_TRAINING, dict(type=int, help="teacher epochs (default %(default)s)")),
    "teacher_width": (_TRAINING, dict(type=int, help="teacher CNN channels (default %(default)s)")),
    "student_hidden": (_TRAINING, dict(type=int, help="student MLP hidden units (default %(default)s: "
                                       "4.9k parameters, 1/5 of the teacher)")),
    "weight_decay": (_TRAINING, dict(type=float, help="student AdamW weight decay (default %(default)s; the "
                                     "teacher uses 1e-4)")),
    "batch_size": (_TRAINING, dict(type=int, help="minibatch size (default %(default)s)")),
    "lr": (_TRAINING, dict(type=float, help="AdamW learning rate, cosine schedule (default %(default)s)")),
    "backend": (_TRAINING, dict(choices=["numpy", "numba", "auto"], help="implementation of the KD loss "
                                "(default %(default)s: the fused Numba kernel where it has the kind, every kind "
                                "but dkd, else the reference; numpy: the reference)")),
    "kind": (_TRAINING, dict(help="the distillation term's divergence: kl (KL(teacher||student), default), ce, "
                                  "reverse_kl, jsd (with --beta), tvd, dkd (decoupled KD, weights 1 and 8; needs "
                                  "--transfer-samples 0)")),
    "seeds": (_TRAINING, dict(type=int, metavar="S", help="sweep: the students' seeds; each (T, alpha, beta) is "
                               "trained once per seed and scored by the mean validation accuracy, every run a task "
                               "on a cluster (default: --seed alone)")),
    "beta": (_TRAINING, dict(type=float, metavar="B", help="kind jsd: the mixture weight in [0, 1] (0: forward KL, "
                                                          "1: reverse KL, 0.5: symmetric JSD); sweep: several")),
    "dkd_weights": (_TRAINING, dict(type=float, metavar="W", help="kind dkd: the weights of TCKD and NCKD "
                                                                 "(default %(default)s, the DKD paper's)")),
    "hint": (_FEATURES, dict(action="append", metavar="TEACHER_TAP:STUDENT_TAP[:WEIGHT]",
                             help="FitNets hint from a teacher layer to a student layer through a trained Linear "
                                  "regressor, e.g. embed:hidden:0.5 (repeat for several layers)")),
    "rkd_distance": (_FEATURES, dict(type=float, metavar="WEIGHT", help="relational KD distance term on the "
                                     "--rkd-taps embeddings (Park et al.: 25)")),
    "rkd_angle": (_FEATURES, dict(type=float, metavar="WEIGHT", help="relational KD angle term on the --rkd-taps "
                                  "embeddings (Park et al.: 50)")),
    "rkd_taps": (_FEATURES, dict(metavar="TEACHER_TAP:STUDENT_TAP", help="layers whose outputs RKD compares "
                                 "(default %(default)s: the teacher's pooled features, the student's hidden layer)")),
    "out": (_OUTPUT, dict(help="output directory (default %(default)s)")),
    "cache_dir": (_OUTPUT, dict(help="where trained teachers and soft targets are cached (default %(default)s)")),
    "progress": (_OUTPUT, dict(help="no progress bars")),
    "soft_targets": (_DATA, dict(metavar="STORE.zarr", help="the transfer set and its soft targets from a store "
                                 "written by minikd soft-targets TEACHER_DIR --out STORE.zarr, read a chunk at a "
                                 "time (needs minikd[scale])")),
    "scheduler": (_SCALE, dict(metavar="ADDRESS", help="run each student as a task on the running dask scheduler "
                               "at ADDRESS, e.g. tcp://127.0.0.1:8786 (needs minikd[scale]; default: this machine, "
                               "serially)")),
    "workers": (_SCALE, dict(type=int, metavar="N", help="run each student as a task on a local Dask cluster of N "
                             "worker processes (needs minikd[scale]; default %(default)s: no cluster)")),
}


def _add_config_options(parser, config_cls, helps=None):
    """One option per field of ``config_cls``, defaulting to the field's default (``helps``:
    help texts that differ for this sub-command)."""
    groups = {None: parser}
    for f in dataclasses.fields(config_cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parser.add_argument(f.name, help=(helps or {})[f.name])   # required: a positional argument
            continue
        title, kw = OPTIONS[f.name]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kw = {**kw, "default": list(default) if isinstance(default, (list, tuple)) else default}
        if isinstance(default, tuple):
            kw["nargs"] = "+"
        if helps and f.name in helps:
            kw["help"] = helps[f.name]
        if f.name == "kind":
            from .losses.kd import KINDS  # noqa: PLC0415
            kw["choices"] = list(KINDS)
        if f.name == "progress":
            group.add_argument("--quiet", dest="progress", action="store_false", help=kw["help"])
        elif f.name == "cache_dir":
            either = group.add_mutually_exclusive_group()
            either.add_argument("--cache-dir", dest="cache_dir", **kw)
            either.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None,
                                help="retrain the teacher, recompute soft targets")
        else:
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def _config(config_cls, args):
    """The sub-command's config, every field checked now (before any work): a bad value is
    reported as the option's error."""
    from . import experiments  # noqa: PLC0415
    config = config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
    try:
        experiments.validate(config)
    except experiments.ConfigError as exc:
        field = next(f for f in dataclasses.fields(config_cls) if f.name == exc.field)
        positional = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        option = field.name if positional else "--" + field.name.replace("_", "-")
        detail = str(exc).removeprefix(f"{field.name}: ")
        args.parser.error(f"argument {option}: {detail}")
    return config


# ---------------------------------------------------------------- printing

def _print_table(rows):
    print(f"\n{'model':<32}{'test acc':>9}{'val acc':>9}{'params':>9}{'compress':>10}{'us/sample':>11}")
    for r in rows:
        print(f"{r['name']:<32}{r['test_accuracy']:>9.3f}{r['val_accuracy']:>9.3f}{r['parameters']:>9d}"
              f"{r['compression']:>9.1f}x{r['inference_us_per_sample']:>11.2f}")


# ---------------------------------------------------------------- the sub-commands

def cmd_distill(args) -> int:
    from . import experiments  # noqa: PLC0415
    report = experiments.run_distill(_config(experiments.DistillConfig, args))
    _print_table(report.rows)
    res = report.results
    base = res["student_scratch"]["test_accuracy"]
    gains = [f"{label} by {100 * (res[key]['test_accuracy'] - base):+.1f}" for key, label in
             [("student_kd", "KD"), ("student_kd_transfer", "KD with the transfer set")] if key in res]
    print("\nCompared with the scratch student, test accuracy changed: " + ", ".join(gains) + " points"
          + f". Wrote {report.out}/student.npz/.json, teacher, report.json, learning_curves.png "
            f"({report.seconds:.0f} s).")
    return 0


def cmd_sweep(args) -> int:
    from . import experiments  # noqa: PLC0415
    report = experiments.run_sweep(_config(experiments.SweepConfig, args))
    grid, best = report.results["grid"], report.results["student_kd"]
    header = "T / alpha"
    panels = zip(grid["beta"], grid["val_accuracy"]) if "beta" in grid else [(None, grid["val_accuracy"])]
    for beta, rows in panels:
        title = "" if beta is None else f", beta={beta:g}"
        over = f", mean over seeds {' '.join(map(str, grid['seeds']))}" if "seeds" in grid else ""
        print(f"\nvalidation accuracy (rows T, columns alpha{title}{over}):\n{header:>10}"
              + "".join(f"{x:>8g}" for x in grid["alpha"]))
        for t, accuracies in zip(grid["T"], rows):
            print(f"{t:>10g}" + "".join(f"{v:>8.3f}" for v in accuracies))
    _print_table(report.rows)
    chosen = "" if "beta" not in best else f", beta={best['beta']:g}"
    print(f"\nbest on validation: T={best['T']:g}, alpha={best['alpha']:g}{chosen} (val {best['val_accuracy']:.3f}); "
          f"wrote {report.out}/sweep.png, student.npz/.json, report.json")
    return 0


def cmd_teacher(args) -> int:
    from . import experiments  # noqa: PLC0415
    report = experiments.run_teacher(_config(experiments.TeacherConfig, args))
    _print_table(report.rows)
    print(f"\nWrote {report.out}/teacher.npz/.json; next: minikd soft-targets {args.out} or "
          f"minikd student {args.out}")
    return 0


def cmd_soft_targets(args) -> int:
    from . import experiments  # noqa: PLC0415
    written = experiments.write_soft_targets(args.teacher_dir, args.out, args.transfer_samples, rows=args.rows,
                                             top_k=args.top_k, chunk_rows=args.chunk_rows, scheduler=args.scheduler,
                                             workers=args.workers, progress=args.progress)
    if "format" in written:   # a store: its attributes
        dense = written["kind"] == "dense"
        what = "logits" if dense else f"top-{written['k']} indices, values, tail_mass"
        note = ("logits: apply the temperature at loss time" if dense else
                f"values: log-probabilities at T_gen={written['T_gen']:g}")
        print(f"wrote {args.out}: x and {what} of {written['rows']} transfer rows in chunks of "
              f"{written['chunk_rows']} (teacher {written['teacher_fingerprint']}, dataset "
              f"{written['dataset_fingerprint']}; {note})")
        return 0
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in written.items())
          + " (logits: apply the temperature at loss time)")
    return 0


def cmd_student(args) -> int:
    from . import experiments  # noqa: PLC0415
    report = experiments.run_student(_config(experiments.StudentConfig, args))
    _print_table(report.rows)
    print(f"\nWrote {report.out}/student.npz/.json and report.json")
    return 0


def cmd_mutual(args) -> int:
    from . import experiments  # noqa: PLC0415
    report = experiments.run_mutual(_config(experiments.MutualConfig, args))
    _print_table(report.rows)
    means = report.results["mean_test_accuracy"]
    print(f"\nmean test accuracy: mutual {means['mutual']:.3f}, independent {means['independent']:.3f} "
          f"({100 * (means['mutual'] - means['independent']):+.1f} points). Wrote {report.out}/report.json, "
          f"learning_curves.png")
    return 0


def cmd_evaluate(args) -> int:
    from . import experiments  # noqa: PLC0415
    e = experiments.evaluate(args.dir, args.name)
    print(f"{args.dir}/{args.name}: {e.parameters} parameters, test accuracy {e.test_accuracy:.4f} on "
          f"{e.test_samples} samples ({e.dataset}), validation {e.val_accuracy:.4f}")
    return 0


def cmd_predict(args) -> int:
    from . import experiments  # noqa: PLC0415
    pred = experiments.predict(args.dir, args.input, args.name, args.output)
    if args.output:
        print(f"wrote {len(pred)} predictions to {args.output}")
    else:
        print("\n".join(str(int(p)) for p in pred))
    return 0


def cmd_gradcheck(args) -> int:
    from .gradcheck_ops import run_all  # noqa: PLC0415
    rows = run_all(seed=args.seed, rtol=args.rtol)
    print(f"{'op':<28}{'cases':>6}{'max abs err':>14}{'max rel err':>14}  result")
    for r in rows:
        print(f"{r.op:<28}{r.cases:>6}{r.max_abs:>14.2e}{r.max_rel:>14.2e}  "
              f"{'pass' if r.ok(args.rtol) else 'FAIL'}")
    failed = [r.op for r in rows if not r.ok(args.rtol)]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} ops pass (float64, central differences "
          f"O(h^4), relative error <= {args.rtol:g})")
    return 1 if failed else 0


def cmd_verify(args) -> int:
    try:
        from .torch_parity import run_all  # noqa: PLC0415
        rows = run_all(seed=args.seed)
    except ImportError:
        raise MissingDependency("PyTorch is not installed; on a CPU machine: pip install torch==2.13.0") from None
    print(f"{'loss':<18}{'cases':>6}{'value rel err':>15}{'grad rel err':>14}  result")
    for r in rows:
        ok = r.value_rel <= args.rtol and r.grad_rel <= args.rtol
        print(f"{r.op:<18}{r.cases:>6}{r.value_rel:>15.2e}{r.grad_rel:>14.2e}  {'pass' if ok else 'FAIL'}")
    failed = [r for r in rows if max(r.value_rel, r.grad_rel) > args.rtol]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} losses equal PyTorch autograd in float64 to {args.rtol:g}")
    return 1 if failed else 0


def _key_values(text: str) -> tuple[str, object]:
    """``K=V`` with V read as a Python literal (4, 0.9, 'x', True), else as the string."""
    import ast  # noqa: PLC0415
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        pass
    return k.strip(), v


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in text.split(",") if r.strip())


def _names(text: str) -> dict:
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected ROLE=NAME pairs, e.g. student=logits,teacher=targets; "
                                             f"got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose  # noqa: PLC0415
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip()) if args.dtypes else ()
    d = diagnose(args.target, order=args.order, names=args.names, teacher_as=args.teacher_as,
                 fixed=dict(args.arg or []), module_init=dict(args.init_arg) if args.init_arg else None,
                 framework=args.framework, expect=args.expect, dtypes=dtypes, sequence=args.sequence,
                 seed=args.seed)
    print(d.to_json() if args.json else d.table())
    return d.exit_code


def build_parser() -> argparse.ArgumentParser:
    from .experiments import DistillConfig, MutualConfig, StudentConfig, SweepConfig, TeacherConfig  # noqa: PLC0415
    p = Parser(prog="minikd", description=minikd.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gradcheck", help="check every op's hand-derived gradient numerically")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the random cases (default 0)")
    g.add_argument("--rtol", type=RTOL, default=1e-7, help="max relative error to pass (default 1e-7)")
    g.set_defaults(func=cmd_gradcheck, parser=g)

    v = sub.add_parser("verify", help="compare every loss and its gradient with PyTorch autograd (float64)")
    v.add_argument("--seed", type=SEED, default=0, help="seed of the random cases (default 0)")
    v.add_argument("--rtol", type=RTOL, default=1e-10, help="max relative error to pass (default 1e-10)")
    v.set_defaults(func=cmd_verify, parser=v)

    dg = sub.add_parser("diagnose", help="tell which convention your own KD loss implements, and where it departs "
                        "from the math", description="Probe a KD loss written in PyTorch, JAX or NumPy with float64 "
                        "inputs and name its convention (divergence, T and where it applies, T^2, alpha, hard term, "
                        "reduction, ignore_index, -inf classes, eps, gradient). Exit code 0: the loss is what "
                        "--expect says (without --expect: a known convention exactly); 1: it departs; 2: usage error.")
    dg.add_argument("target", help="FILE.py:NAME or package.module:NAME (a function, or a torch.nn.Module class)")
    dg.add_argument("--order", type=_roles, default=("student", "teacher", "labels"),
                    help="the roles in the loss's positional order (default student,teacher,labels; "
                         "student,teacher for a loss without labels)")
    dg.add_argument("--names", type=_names, default=None,
                    help="pass roles by keyword instead: student=NAME,teacher=NAME[,labels=NAME] (only the roles named "
                         "are passed)")
    dg.add_argument("--teacher-as", choices=("logits", "probs", "log_probs"), default="logits",
                    help="what the loss takes as the teacher (probabilities / log-probabilities at T = 1)")
    dg.add_argument("--arg", type=_key_values, action="append", metavar="NAME=VALUE",
                    help="a keyword argument to pass the loss on every call, e.g. --arg T=4 (repeat for more)")
    dg.add_argument("--init-arg", type=_key_values, action="append", metavar="NAME=VALUE",
                    help="a constructor argument of a torch.nn.Module loss class (repeat for more)")
    dg.add_argument("--framework", choices=("torch", "jax", "numpy"), default=None,
                    help="the loss's framework (default: detected from the names it uses)")
    dg.add_argument("--expect", default=None, metavar="K=V,...",
                    help="what you meant, e.g. T=4,alpha=0.9,kind=kl (also beta, reduction, t_squared, hard_term, "
                         "label_smoothing, temperature_on, ignore_index): every difference is reported with the "
                         "smallest input that shows it")
    dg.add_argument("--dtypes", default=None, metavar="D1,D2",
                    help="also run the loss in these precisions (float32,bfloat16,float16) against the float64 oracle")
    dg.add_argument("--sequence", action="store_true",
                    help="the loss takes (B, S, C) logits: name its reduction on those (a mean over B alone is "
                         "batch_axis_mean)")
    dg.add_argument("--json", action="store_true", help="print exactly one JSON object")
    dg.add_argument("--seed", type=SEED, default=0, help="seed of the probes (default 0)")
    dg.set_defaults(func=cmd_diagnose, parser=dg)

    d = sub.add_parser("distill", help="train a teacher, distill a student, compare with scratch (the main job)",
                       description="The seed's practice end to end: train the teacher CNN, cache its soft "
                       "targets, train the student MLP from scratch and with the KD loss (and with a transfer "
                       "set), print the comparison, export the student.")
    _add_config_options(d, DistillConfig)
    d.set_defaults(func=cmd_distill, parser=d)
    s = sub.add_parser("sweep", help="tune T and alpha on the validation split, draw a heatmap")
    _add_config_options(s, SweepConfig)
    s.set_defaults(func=cmd_sweep, parser=s)
    te = sub.add_parser("teacher", help="step 1 alone: train the teacher and export it")
    _add_config_options(te, TeacherConfig)
    te.set_defaults(func=cmd_teacher, parser=te)
    st_ = sub.add_parser("soft-targets", help="step 2 alone: an exported teacher's logits on its training rows, "
                         "or on a transfer set of any size as a chunked Zarr store")
    st_.add_argument("teacher_dir", help="output directory of minikd teacher (or distill)")
    st_.add_argument("--out", required=True, metavar="FILE.npz|DIR.zarr",
                     help="where to write logits_train (and logits_transfer); a name ending in .zarr writes a "
                          "soft-target store of the transfer set instead (needs minikd[scale])")
    st_.add_argument("--transfer-samples", type=_checked(int, "transfer_samples", 0), default=0, metavar="N",
                     help="also label N transfer samples (.npz)")
    zs = st_.add_argument_group("soft-target store (--out DIR.zarr)")
    zs.add_argument("--rows", type=_checked(int, "rows", 1, 10_000_000), default=None, metavar="N",
                    help="transfer rows to generate and label (default 45000; MNIST-1D teachers: made chunk by chunk, "
                         "so any N fits in memory; a teacher of your .npz: its x_transfer)")
    zs.add_argument("--top-k", type=_checked(int, "top_k", 1), default=None, metavar="K",
                    help="store the K most probable classes of each row (indices, log-probabilities, tail mass) "
                         "instead of all logits")
    zs.add_argument("--chunk-rows", type=_checked(int, "chunk_rows", 1, 10_000_000), default=None, metavar="R",
                    help="rows per chunk: the unit of work and of memory (default 10000)")
    zs.add_argument("--workers", type=_checked(int, "workers", 0, 256), default=0, metavar="N",
                    help="write with a local Dask cluster of N worker processes (default: this process's threads)")
    zs.add_argument("--scheduler", metavar="ADDRESS", default=None,
                    help="write with the workers of the running dask scheduler at ADDRESS (tcp://host:port; the "
                         "workers must see the output folder)")
    zs.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    st_.set_defaults(func=cmd_soft_targets, parser=st_)
    su = sub.add_parser("student", help="step 3 alone: distill a student from an exported teacher",
                        description="Distill a student from the teacher exported to TEACHER_DIR, on the teacher's "
                        "own dataset (stored with it); for your own data or feature terms use minikd distill.")
    _add_config_options(su, StudentConfig, {
        "teacher_dir": "output directory of minikd teacher (or distill)",
        "transfer_samples": "N unlabeled samples of the teacher's dataset's generator, labeled only by the "
                            "teacher (Hinton's transfer set; default %(default)s: none)",
        "seed": "seed of the student's initialization and batch order (default %(default)s; the data are the "
                "teacher's)"})
    su.set_defaults(func=cmd_student, parser=su)
    m = sub.add_parser("mutual", help="deep mutual learning: a cohort of students vs the same trained alone")
    _add_config_options(m, MutualConfig, {"T": "temperature of the peers' KL terms (default %(default)s)"})
    m.set_defaults(func=cmd_mutual, parser=m)
    e = sub.add_parser("evaluate", help="load an exported student and report its test accuracy")
    e.add_argument("dir", help="output directory of distill or sweep")
    e.add_argument("--name", default="student", type=_model_name, help="model name in DIR (default student; or teacher)")
    e.set_defaults(func=cmd_evaluate, parser=e)
    q = sub.add_parser("predict", help="predict classes for raw inputs with an exported student")
    q.add_argument("dir", help="output directory of distill or sweep")
    q.add_argument("--input", required=True, metavar="FILE.npy", help="raw inputs (N, D) or (D,)")
    q.add_argument("--output", metavar="FILE.npy", help="save predictions here (default: print them)")
    q.add_argument("--name", default="student", type=_model_name, help="model name in DIR (default student)")
    q.set_defaults(func=cmd_predict, parser=q)
    return p


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (a test's capture included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _show_warnings():
    """minikd's warnings (a discarded cache entry) as one line each on stderr."""
    log = logging.getLogger("minikd")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("minikd: warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def main(argv=None) -> int:
    command = "minikd"
    try:
        args = build_parser().parse_args(argv)
        command = f"minikd {args.command}"
        _show_warnings()
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{command}: error: out of memory; lower --samples, --transfer-samples, --teacher-width "
              f"or --student-hidden", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted (files are written whole or not at all: nothing half-written "
              f"was left)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
