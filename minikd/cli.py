"""The ``minikd`` command line (argparse; one sub-command per task)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def cmd_gradcheck(args) -> int:
    from .gradcheck_ops import run_all
    rows = run_all(seed=args.seed, rtol=args.rtol)
    print(f"{'op':<28}{'cases':>6}{'max abs err':>14}{'max rel err':>14}  result")
    for r in rows:
        print(f"{r.op:<28}{r.cases:>6}{r.max_abs:>14.2e}{r.max_rel:>14.2e}  "
              f"{'pass' if r.ok(args.rtol) else 'FAIL'}")
    failed = [r.op for r in rows if not r.ok(args.rtol)]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} ops pass (float64, central differences "
          f"O(h^4), relative error <= {args.rtol:g})")
    return 1 if failed else 0


# ---------------------------------------------------------------- the distillation pipeline

def _data(args):
    from .data import from_npz, mnist1d  # noqa: PLC0415
    if args.samples < 50:
        raise ValueError(f"--samples: need at least 50, got {args.samples}")
    if args.transfer_samples < 0:
        raise ValueError(f"--transfer-samples: must be >= 0, got {args.transfer_samples}")
    if args.data:
        return from_npz(args.data, seed=args.seed, transfer_samples=args.transfer_samples)
    return mnist1d(args.samples, seed=args.seed, transfer_samples=args.transfer_samples)


def _cache_dir(args):
    return None if args.no_cache else args.cache_dir


def _student_config(args, epochs):
    from .distill import TrainConfig  # noqa: PLC0415
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       seed=args.seed)


def _targets(args, teacher, data):
    """The teacher's logits on the training rows and (None without one) on the transfer set."""
    from .distill import soft_targets  # noqa: PLC0415
    cache = _cache_dir(args)
    tl = soft_targets(teacher, data.x_train, cache)
    tt = soft_targets(teacher, data.x_transfer, cache) if len(data.x_transfer) else None
    return tl, tt


def _train_teacher(args, data):
    """Step 1 (or the cached teacher): (teacher, history)."""
    from .distill import TrainConfig, train_teacher  # noqa: PLC0415
    tcfg = TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return train_teacher(data, tcfg, width=args.teacher_width, progress=not args.quiet,
                         cache_dir=_cache_dir(args))


def _teacher_and_targets(args, data):
    teacher, thist = _train_teacher(args, data)
    return (teacher, thist, *_targets(args, teacher, data))


def _row(name, model, data, teacher_params, extra=None):
    from .distill import accuracy, inference_seconds_per_sample  # noqa: PLC0415
    n = model.num_parameters()
    return {"name": name, "test_accuracy": accuracy(model, data.x_test, data.y_test),
            "val_accuracy": accuracy(model, data.x_val, data.y_val), "parameters": n,
            "compression": teacher_params / n,
            "inference_us_per_sample": 1e6 * inference_seconds_per_sample(model, data.x_test),
            **(extra or {})}


def _print_table(rows):
    print(f"\n{'model':<32}{'test acc':>9}{'val acc':>9}{'params':>9}{'compress':>10}{'us/sample':>11}")
    for r in rows:
        print(f"{r['name']:<32}{r['test_accuracy']:>9.3f}{r['val_accuracy']:>9.3f}{r['parameters']:>9d}"
              f"{r['compression']:>9.1f}x{r['inference_us_per_sample']:>11.2f}")


def _write_report(out, report):
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .nn.serialize import atomic_write  # noqa: PLC0415
    atomic_write(Path(out) / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))


def _common_report(args, data, t0):
    import platform  # noqa: PLC0415
    import time  # noqa: PLC0415
    return {"dataset": data.spec, "seconds": time.perf_counter() - t0,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "options": {k: v for k, v in vars(args).items() if k != "func"}}


def cmd_distill(args) -> int:
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .distill import export, train_student  # noqa: PLC0415
    from .plots import learning_curves  # noqa: PLC0415
    t0 = time.perf_counter()
    variants = _variants(args)  # option errors before any training
    data = _data(args)
    teacher, thist, tl, tt = _teacher_and_targets(args, data)
    cfg = _student_config(args, args.epochs)
    common = dict(hidden=args.student_hidden, progress=not args.quiet, backend=args.backend)
    scratch, sh = train_student(data, cfg, desc="student (scratch)", **common)
    kd, kh = train_student(data, cfg, teacher_logits=tl, T=args.T, alpha=args.alpha, desc="student (KD)", **common)
    tp = teacher.num_parameters()
    rows = [_row("teacher (CNN)", teacher, data, tp), _row("student from scratch", scratch, data, tp),
            _row(f"student KD (T={args.T:g}, alpha={args.alpha:g})", kd, data, tp, {"T": args.T, "alpha": args.alpha})]
    histories = {"teacher": thist, "student scratch": sh, "student KD": kh}
    keys = ["teacher", "student_scratch", "student_kd"]
    best = kd
    for key, label, specs in variants:
        vm, vh = train_student(data, cfg, teacher_logits=tl, T=args.T, alpha=args.alpha,
                               desc=f"student ({label})", feature_specs=specs, teacher=teacher,
                               cache_dir=_cache_dir(args), **common)
        rows.append(_row(f"student KD + {label}", vm, data, tp, {"T": args.T, "alpha": args.alpha,
                                                                 "terms": [list(x) for x in specs]}))
        histories[f"KD + {label}"] = vh
        keys.append(key)
    if tt is not None:
        tcfg = _student_config(args, args.transfer_epochs)
        kdt, kth = train_student(data, tcfg, teacher_logits=tl, teacher_logits_transfer=tt, T=args.T,
                                 alpha=args.alpha, use_transfer=True, desc="student (KD + transfer)", **common)
        rows.append(_row(f"student KD + transfer ({len(data.x_transfer)})", kdt, data, tp,
                         {"T": args.T, "alpha": args.alpha, "transfer_samples": len(data.x_transfer)}))
        histories["student KD + transfer"] = kth
        keys.append("student_kd_transfer")
        best = kdt
    _print_table(rows)
    out = Path(args.out)
    export(teacher, out, "teacher", data)
    export(best, out, "student", data, {"T": args.T, "alpha": args.alpha})
    learning_curves(histories, out / "learning_curves.png")
    report = {**dict(zip(keys, rows)), **_common_report(args, data, t0)}
    _write_report(out, report)
    base = report["student_scratch"]["test_accuracy"]
    gains = [f"{label} by {100 * (report[key]['test_accuracy'] - base):+.1f}" for key, label in
             [("student_kd", "KD"), ("student_kd_transfer", "KD with the transfer set")] if key in report]
    print("\nCompared with the scratch student, test accuracy changed: " + ", ".join(gains) + " points"
          + f". Wrote {out}/student.npz/.json, teacher, report.json, learning_curves.png "
            f"({report['seconds']:.0f} s).")
    return 0


def _parse_hint(spec):
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"--hint {spec!r}: expected TEACHER_TAP:STUDENT_TAP[:WEIGHT], e.g. embed:hidden:0.5")
    try:
        weight = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise ValueError(f"--hint {spec!r}: the weight {parts[2]!r} is not a number") from None
    return ("hint", parts[0], parts[1], weight)


def _variants(args):
    """(report key, label, feature specs) for each feature/relational variant asked for."""
    out = []
    if args.hint:
        specs = [_parse_hint(h) for h in args.hint]
        out.append(("student_kd_hint", "hint " + ", ".join(f"{a}->{b}" for _, a, b, _ in specs), specs))
    t_tap, _, s_tap = args.rkd_taps.partition(":")
    if not t_tap or not s_tap:
        raise ValueError(f"--rkd-taps {args.rkd_taps!r}: expected TEACHER_TAP:STUDENT_TAP")
    for kind, weight in (("rkd_distance", args.rkd_distance), ("rkd_angle", args.rkd_angle)):
        if weight:
            out.append((f"student_kd_{kind}", f"{kind.replace('_', ' ')} x{weight:g}",
                        [(kind, t_tap, s_tap, weight)]))
    return out


def cmd_mutual(args) -> int:
    import dataclasses  # noqa: PLC0415
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from .distill import export, train_mutual, train_student  # noqa: PLC0415
    from .plots import learning_curves  # noqa: PLC0415
    if args.models < 2:
        raise ValueError(f"--models: mutual learning needs at least 2 models, got {args.models}")
    t0 = time.perf_counter()
    args.transfer_samples = 0
    data = _data(args)
    cfg = _student_config(args, args.epochs)
    cohort, mh = train_mutual(data, cfg, args.models, T=args.T, hidden=args.student_hidden, progress=not args.quiet)
    alone = []
    for k in range(args.models):
        m, h = train_student(data, dataclasses.replace(cfg, seed=args.seed + k), hidden=args.student_hidden,
                             progress=not args.quiet, desc=f"independent {k}")
        alone.append((m, h))
    tp = cohort[0].num_parameters()
    rows = [_row(f"model {k} mutual", m, data, tp) for k, m in enumerate(cohort)] + \
        [_row(f"model {k} independent", m, data, tp) for k, (m, _) in enumerate(alone)]
    _print_table(rows)
    mean_mutual = float(np.mean([r["test_accuracy"] for r in rows[:args.models]]))
    mean_alone = float(np.mean([r["test_accuracy"] for r in rows[args.models:]]))
    out = Path(args.out)
    export(cohort[0], out, "student", data, {"mutual_models": args.models, "T": args.T})
    learning_curves({**{f"mutual {k}": h for k, h in enumerate(mh)},
                     **{f"independent {k}": h for k, (_, h) in enumerate(alone)}}, out / "learning_curves.png")
    _write_report(out, {"mutual": rows[:args.models], "independent": rows[args.models:],
                        "mean_test_accuracy": {"mutual": mean_mutual, "independent": mean_alone},
                        **_common_report(args, data, t0)})
    print(f"\nmean test accuracy: mutual {mean_mutual:.3f}, independent {mean_alone:.3f} "
          f"({100 * (mean_mutual - mean_alone):+.1f} points). Wrote {out}/report.json, learning_curves.png")
    return 0


def cmd_sweep(args) -> int:
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .distill import export, sweep  # noqa: PLC0415
    from .plots import sweep_heatmap  # noqa: PLC0415
    t0 = time.perf_counter()
    data = _data(args)
    teacher, _, tl, tt = _teacher_and_targets(args, data)
    use_transfer = tt is not None
    cfg = _student_config(args, args.transfer_epochs if use_transfer else args.epochs)
    grid, (val, T, a, model, _) = sweep(data, cfg, args.T, args.alpha, teacher_logits=tl,
                                        teacher_logits_transfer=tt, hidden=args.student_hidden,
                                        use_transfer=use_transfer, progress=not args.quiet)
    header = "T / alpha"
    print(f"\nvalidation accuracy (rows T, columns alpha):\n{header:>10}" + "".join(f"{x:>8g}" for x in args.alpha))
    for i, t in enumerate(args.T):
        print(f"{t:>10g}" + "".join(f"{v:>8.3f}" for v in grid[i]))
    row = _row(f"best student (T={T:g}, alpha={a:g})", model, data, teacher.num_parameters(), {"T": T, "alpha": a})
    _print_table([_row("teacher (CNN)", teacher, data, teacher.num_parameters()), row])
    out = Path(args.out)
    export(model, out, "student", data, {"T": T, "alpha": a})
    sweep_heatmap(grid, args.T, args.alpha, out / "sweep.png",
                  best=(list(args.T).index(T), list(args.alpha).index(a)))
    _write_report(out, {"student_kd": row, "grid": {"T": args.T, "alpha": args.alpha,
                                                     "val_accuracy": grid.tolist()},
                        **_common_report(args, data, t0)})
    print(f"\nbest on validation: T={T:g}, alpha={a:g} (val {val:.3f}); wrote {out}/sweep.png, "
          f"student.npz/.json, report.json")
    return 0


def cmd_teacher(args) -> int:
    """Step 1 alone: train (or reuse the cached) teacher and export it."""
    from pathlib import Path  # noqa: PLC0415

    from .distill import export  # noqa: PLC0415
    args.transfer_samples = 0
    data = _data(args)
    teacher, _ = _train_teacher(args, data)
    export(teacher, args.out, "teacher", data)
    _print_table([_row("teacher (CNN)", teacher, data, teacher.num_parameters())])
    print(f"\nWrote {Path(args.out)}/teacher.npz/.json; next: minikd soft-targets {args.out} or "
          f"minikd student {args.out}")
    return 0


def _exported_teacher(teacher_dir, transfer_samples):
    from .data import load_dataset  # noqa: PLC0415
    from .distill import load_student  # noqa: PLC0415
    teacher, info = load_student(teacher_dir, "teacher")
    return teacher, load_dataset(info["dataset"], transfer_samples=transfer_samples)


def cmd_soft_targets(args) -> int:
    """Step 2 alone: the exported teacher's logits on the training rows (and the transfer set)."""
    import numpy as np  # noqa: PLC0415

    from .distill import soft_targets  # noqa: PLC0415
    from .nn.serialize import atomic_write  # noqa: PLC0415
    teacher, data = _exported_teacher(args.teacher_dir, args.transfer_samples)
    arrays = {"logits_train": soft_targets(teacher, data.x_train), "y_train": data.y_train}
    if len(data.x_transfer):
        arrays["logits_transfer"] = soft_targets(teacher, data.x_transfer)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(args.out, write)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
          + " (logits: apply the temperature at loss time)")
    return 0


def cmd_student(args) -> int:
    """Step 3 alone: distill a student from an exported teacher (its dataset, its soft targets)."""
    import time  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .distill import export, train_student  # noqa: PLC0415
    t0 = time.perf_counter()
    if args.data or args.hint or args.rkd_distance or args.rkd_angle:
        raise ValueError("minikd student distills plain KD on the teacher's own dataset (stored with it); "
                         "for --data, --hint or --rkd-* use minikd distill")
    teacher, data = _exported_teacher(args.teacher_dir, args.transfer_samples)
    tl, tt = _targets(args, teacher, data)
    use_transfer = tt is not None
    cfg = _student_config(args, args.transfer_epochs if use_transfer else args.epochs)
    model, hist = train_student(data, cfg, teacher_logits=tl, teacher_logits_transfer=tt, T=args.T,
                                alpha=args.alpha, hidden=args.student_hidden, use_transfer=use_transfer,
                                progress=not args.quiet, desc="student (KD)", backend=args.backend)
    tp = teacher.num_parameters()
    label = f"student KD (T={args.T:g}, alpha={args.alpha:g})" + (" + transfer" if use_transfer else "")
    rows = [_row("teacher (CNN)", teacher, data, tp), _row(label, model, data, tp, {"T": args.T, "alpha": args.alpha})]
    _print_table(rows)
    export(model, args.out, "student", data, {"T": args.T, "alpha": args.alpha})
    _write_report(args.out, {"teacher": rows[0], "student_kd": rows[1], "dataset": data.spec,
                             "seconds": time.perf_counter() - t0, "teacher_dir": str(args.teacher_dir)})
    print(f"\nWrote {Path(args.out)}/student.npz/.json and report.json")
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_dataset  # noqa: PLC0415
    from .distill import accuracy, load_student  # noqa: PLC0415
    model, info = load_student(args.dir, args.name)
    data = load_dataset(info["dataset"], transfer_samples=0)
    print(f"{args.dir}/{args.name}: {model.num_parameters()} parameters, test accuracy "
          f"{accuracy(model, data.x_test, data.y_test):.4f} on {len(data.y_test)} samples "
          f"({data.name}), validation {accuracy(model, data.x_val, data.y_val):.4f}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np  # noqa: PLC0415

    from .distill import load_student  # noqa: PLC0415
    model, info = load_student(args.dir, args.name)
    try:
        x = np.load(args.input, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {args.input}: no such file") from None
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--input {args.input}: not a readable .npy file ({exc})") from None
    mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != mean.shape[0] or x.dtype.kind not in "fiu":
        raise ValueError(f"--input {args.input}: expected numeric shape (N, {mean.shape[0]}) or "
                         f"({mean.shape[0]},), got {x.shape} {x.dtype}")
    from .data import standardize  # noqa: PLC0415
    logits = model.predict(standardize(x, mean, std))
    pred = np.argmax(logits, axis=-1)
    if args.output:
        np.save(args.output, pred)
        print(f"wrote {len(pred)} predictions to {args.output}")
    else:
        print("\n".join(str(int(p)) for p in pred))
    return 0


def _positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _add_pipeline_options(p, T_default, alpha_default, many=False):
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE.npz", help="your data: arrays x (N, D), y (N,), optional "
                   "x_test, y_test, x_transfer (default: MNIST-1D generated offline)")
    d.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples, 80%% train / 20%% test "
                   "(default 5000, the paper's size)")
    d.add_argument("--transfer-samples", type=int, default=DEFAULTS["transfer_samples"], metavar="N",
                   help="N extra unlabeled samples labeled only by the teacher (Hinton's transfer set); "
                        f"the report also shows the student trained with them; 0 for none "
                        f"(default {DEFAULTS['transfer_samples']})")
    d.add_argument("--seed", type=int, default=0, help="seed of data, splits, init and batches (default 0)")
    t = p.add_argument_group("training")
    nargs = dict(nargs="+") if many else {}
    t.add_argument("--T", type=float, default=T_default, **nargs, help=f"temperature(s) (default {T_default})")
    t.add_argument("--alpha", type=float, default=alpha_default, **nargs,
                   help=f"weight(s) of the distillation term in [0, 1] (default {alpha_default})")
    t.add_argument("--epochs", type=_positive_int, default=DEFAULTS["epochs"],
                   help=f"student epochs (default {DEFAULTS['epochs']})")
    t.add_argument("--transfer-epochs", type=_positive_int, default=DEFAULTS["transfer_epochs"],
                   help=f"student epochs with the transfer set, which has many more rows "
                        f"(default {DEFAULTS['transfer_epochs']})")
    t.add_argument("--teacher-epochs", type=_positive_int, default=DEFAULTS["teacher_epochs"],
                   help=f"teacher epochs (default {DEFAULTS['teacher_epochs']})")
    t.add_argument("--teacher-width", type=_positive_int, default=32, help="teacher CNN channels (default 32)")
    t.add_argument("--student-hidden", type=_positive_int, default=DEFAULTS["student_hidden"],
                   help=f"student MLP hidden units (default {DEFAULTS['student_hidden']}: 4.9k parameters, "
                        f"1/5 of the teacher)")
    t.add_argument("--weight-decay", type=float, default=DEFAULTS["student_weight_decay"],
                   help=f"student AdamW weight decay (default {DEFAULTS['student_weight_decay']}; "
                        f"the teacher uses 1e-4)")
    t.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size (default 128)")
    t.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate, cosine schedule (default 0.01)")
    t.add_argument("--backend", choices=["numpy", "numba", "auto"], default="numpy",
                   help="implementation of the KD loss (default numpy, the reference)")
    if not many:
        f = p.add_argument_group("feature and relational distillation (each adds a row to the table)")
        f.add_argument("--hint", action="append", metavar="TEACHER_TAP:STUDENT_TAP[:WEIGHT]",
                       help="FitNets hint from a teacher layer to a student layer through a trained Linear "
                            "regressor, e.g. embed:hidden:0.5 (repeat for several layers)")
        f.add_argument("--rkd-distance", type=float, default=0.0, metavar="WEIGHT",
                       help="relational KD distance term on the --rkd-taps embeddings (Park et al.: 25)")
        f.add_argument("--rkd-angle", type=float, default=0.0, metavar="WEIGHT",
                       help="relational KD angle term on the --rkd-taps embeddings (Park et al.: 50)")
        f.add_argument("--rkd-taps", default="embed:hidden", metavar="TEACHER_TAP:STUDENT_TAP",
                       help="layers whose outputs RKD compares (default embed:hidden: the teacher's pooled "
                            "features, the student's hidden layer)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="minikd-out", help="output directory (default minikd-out)")
    o.add_argument("--cache-dir", default=".minikd-cache",
                   help="where trained teachers and soft targets are cached (default .minikd-cache)")
    o.add_argument("--no-cache", action="store_true", help="retrain the teacher, recompute soft targets")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


DEFAULTS = {"epochs": 40, "transfer_epochs": 15, "teacher_epochs": 30, "transfer_samples": 45000,
            "student_hidden": 96, "student_weight_decay": 5e-2}


def cmd_verify(args) -> int:
    try:
        from .torch_parity import run_all  # noqa: PLC0415
        rows = run_all(seed=args.seed)
    except ImportError:
        raise ValueError("PyTorch is not installed; on a CPU machine: pip install torch==2.13.0") from None
    print(f"{'loss':<18}{'cases':>6}{'value rel err':>15}{'grad rel err':>14}  result")
    for r in rows:
        ok = r.value_rel <= args.rtol and r.grad_rel <= args.rtol
        print(f"{r.op:<18}{r.cases:>6}{r.value_rel:>15.2e}{r.grad_rel:>14.2e}  {'pass' if ok else 'FAIL'}")
    failed = [r for r in rows if max(r.value_rel, r.grad_rel) > args.rtol]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} losses equal PyTorch autograd in float64 to {args.rtol:g}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minikd", description=__import__("minikd").__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gradcheck", help="check every op's hand-derived gradient numerically")
    g.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    g.add_argument("--rtol", type=float, default=1e-7, help="max relative error to pass (default 1e-7)")
    g.set_defaults(func=cmd_gradcheck)

    v = sub.add_parser("verify", help="compare every loss and its gradient with PyTorch autograd (float64)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    v.add_argument("--rtol", type=float, default=1e-10, help="max relative error to pass (default 1e-10)")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("distill", help="train a teacher, distill a student, compare with scratch (the main job)",
                       description="The seed's practice end to end: train the teacher CNN, cache its soft "
                       "targets, train the student MLP from scratch and with the KD loss (and with a transfer "
                       "set), print the comparison, export the student.")
    _add_pipeline_options(d, 4.0, 0.9)
    d.set_defaults(func=cmd_distill)
    s = sub.add_parser("sweep", help="tune T and alpha on the validation split, draw a heatmap")
    _add_pipeline_options(s, [1.0, 2.0, 4.0, 8.0], [0.5, 0.9, 1.0], many=True)
    s.set_defaults(func=cmd_sweep)
    te = sub.add_parser("teacher", help="step 1 alone: train the teacher and export it")
    _add_pipeline_options(te, 4.0, 0.9)
    te.set_defaults(func=cmd_teacher, out="minikd-teacher")
    st_ = sub.add_parser("soft-targets", help="step 2 alone: an exported teacher's logits on its training rows")
    st_.add_argument("teacher_dir", help="output directory of minikd teacher (or distill)")
    st_.add_argument("--out", required=True, metavar="FILE.npz", help="where to write logits_train (and logits_transfer)")
    st_.add_argument("--transfer-samples", type=int, default=0, metavar="N", help="also label N transfer samples")
    st_.set_defaults(func=cmd_soft_targets)
    su = sub.add_parser("student", help="step 3 alone: distill a student from an exported teacher")
    su.add_argument("teacher_dir", help="output directory of minikd teacher (or distill)")
    _add_pipeline_options(su, 4.0, 0.9)
    su.set_defaults(func=cmd_student, transfer_samples=0)
    m = sub.add_parser("mutual", help="deep mutual learning: a cohort of students vs the same trained alone")
    m.add_argument("--models", type=int, default=2, help="cohort size M (default 2)")
    _add_pipeline_options(m, 1.0, 1.0)
    m.set_defaults(func=cmd_mutual)
    e = sub.add_parser("evaluate", help="load an exported student and report its test accuracy")
    e.add_argument("dir", help="output directory of distill or sweep")
    e.add_argument("--name", default="student", help="model name in DIR (default student; or teacher)")
    e.set_defaults(func=cmd_evaluate)
    q = sub.add_parser("predict", help="predict classes for raw inputs with an exported student")
    q.add_argument("dir", help="output directory of distill or sweep")
    q.add_argument("--input", required=True, metavar="FILE.npy", help="raw inputs (N, D) or (D,)")
    q.add_argument("--output", metavar="FILE.npy", help="save predictions here (default: print them)")
    q.add_argument("--name", default="student", help="model name in DIR (default student)")
    q.set_defaults(func=cmd_predict)
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
