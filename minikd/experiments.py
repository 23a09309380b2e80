"""The pipeline's jobs (floor 4): each takes a config, runs the distillation steps, writes its
files under ``config.out`` and returns a ``Report``.

    from minikd.experiments import DistillConfig, run_distill
    report = run_distill(DistillConfig(samples=600, epochs=3, progress=False, out="o"))
    report.rows["student_kd"]["test_accuracy"]; report.to_json()   # what report.json holds

    run_teacher(TeacherConfig)    step 1 alone: train (or reuse the cached) teacher, export it
    write_soft_targets(...)       step 2 alone: an exported teacher's logits, to an .npz
    run_student(StudentConfig)    step 3 alone: distill a student from an exported teacher
    run_distill(DistillConfig)    steps 1-5: teacher, soft targets, students from scratch, with KD,
                                  with each feature / relational term, with the transfer set
    run_sweep(SweepConfig)        step 4: one student per (T, alpha), the best on validation
    run_mutual(MutualConfig)      deep mutual learning against the same models trained alone
    evaluate(...), predict(...)   use an exported model

The building blocks (training, soft targets, export) are ``minikd.distill``'s. The ``minikd``
command turns its options into these configs: a sub-command's options are its config's fields,
with the config's defaults (``DEFAULTS``). ``on_step`` is ``minikd.distill.train``'s hook, given
to every training run of the experiment.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import from_npz, load_dataset, mnist1d, standardize
from .distill import (TrainConfig, accuracy, export, inference_seconds_per_sample, load_student, soft_targets,
                      sweep, train_mutual, train_student, train_teacher)
from . import checks, scale
from .files import FileError, atomic_write, check_finite_rows, read_array, writable_dir, writable_file, write_npy, \
    write_npz
from .losses.divergences import check_beta
from .losses.kd import DKD_WEIGHTS, KINDS
from .nn.models import student_mlp, teacher_cnn
from .plots import learning_curves, sweep_heatmap


def _fused_kinds(backend):
    """The kinds a fused kernel computes (``minikd.kernels.FUSED_KINDS``: its one owner)."""
    from .kernels import FUSED_KINDS  # noqa: PLC0415  (the kernels package: imported where used)
    return FUSED_KINDS[backend]


def _loss_backend(config) -> str:
    """The KD loss's backend for a run: "auto" takes the fused kernel where it has the kind and the
    reference otherwise (dkd), quietly (the kernels' own "auto" would warn that it falls back)."""
    if config.backend == "auto" and config.kind not in _fused_kinds("numba"):
        return "numpy"
    return config.backend

__all__ = ["DEFAULTS", "TeacherConfig", "StudentConfig", "DistillConfig", "SweepConfig", "MutualConfig", "Report",
           "run_teacher", "run_student", "run_distill", "run_sweep", "run_mutual", "write_soft_targets",
           "evaluate", "Evaluation", "predict", "feature_variants"]

# The one place of the pipeline's defaults; each config below takes the ones it uses.
DEFAULTS = {
    "samples": 5000,              # MNIST-1D, 80% train / 20% test (the paper's size)
    "transfer_samples": 45000,    # Hinton's transfer set: unlabeled, labeled only by the teacher
    "seed": 0,
    "T": 4.0, "alpha": 0.9,
    "epochs": 40, "transfer_epochs": 15, "teacher_epochs": 30,
    "teacher_width": 32,          # 24.8k parameters
    "student_hidden": 96,         # 4.9k parameters, 1/5 of the teacher
    "weight_decay": 5e-2,         # the student's AdamW decay; the teacher keeps TrainConfig's 1e-4
    "batch_size": 128, "lr": 1e-2,
    "backend": "auto",            # the KD loss's implementation: the fused kernel where it has the kind
    "out": "minikd-out", "cache_dir": ".minikd-cache",
}


@dataclass
class TeacherConfig:
    """``run_teacher``: the teacher CNN on MNIST-1D or ``data`` (an .npz), no transfer set."""
    data: str | None = None
    samples: int = DEFAULTS["samples"]
    seed: int = DEFAULTS["seed"]
    teacher_epochs: int = DEFAULTS["teacher_epochs"]
    teacher_width: int = DEFAULTS["teacher_width"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    out: str = "minikd-teacher"
    cache_dir: str | None = DEFAULTS["cache_dir"]     # None: no cache
    progress: bool = True


@dataclass
class StudentConfig:
    """``run_student``: a KD student from the teacher exported to ``teacher_dir``, on the dataset
    stored with it (its seed and size); ``seed`` seeds the student's initialization and batches."""
    teacher_dir: str
    transfer_samples: int = 0
    soft_targets: str | None = None   # a soft-target store (.zarr) of this teacher: its transfer set, streamed
    seed: int = DEFAULTS["seed"]
    T: float = DEFAULTS["T"]
    alpha: float = DEFAULTS["alpha"]
    kind: str = "kl"
    beta: float | None = None
    dkd_weights: tuple = DKD_WEIGHTS
    epochs: int = DEFAULTS["epochs"]
    transfer_epochs: int = DEFAULTS["transfer_epochs"]
    student_hidden: int = DEFAULTS["student_hidden"]
    weight_decay: float = DEFAULTS["weight_decay"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    backend: str = DEFAULTS["backend"]
    out: str = DEFAULTS["out"]
    cache_dir: str | None = DEFAULTS["cache_dir"]
    progress: bool = True


@dataclass
class DistillConfig:
    """``run_distill``. ``hint``: "TEACHER_TAP:STUDENT_TAP[:WEIGHT]" specs (one student with all of
    them); ``rkd_distance`` / ``rkd_angle``: weights (0: that student is not trained) of the RKD
    terms between the ``rkd_taps`` ("TEACHER_TAP:STUDENT_TAP") outputs."""
    data: str | None = None
    samples: int = DEFAULTS["samples"]
    transfer_samples: int = DEFAULTS["transfer_samples"]
    seed: int = DEFAULTS["seed"]
    T: float = DEFAULTS["T"]
    alpha: float = DEFAULTS["alpha"]
    kind: str = "kl"
    beta: float | None = None
    dkd_weights: tuple = DKD_WEIGHTS
    epochs: int = DEFAULTS["epochs"]
    transfer_epochs: int = DEFAULTS["transfer_epochs"]
    teacher_epochs: int = DEFAULTS["teacher_epochs"]
    teacher_width: int = DEFAULTS["teacher_width"]
    student_hidden: int = DEFAULTS["student_hidden"]
    weight_decay: float = DEFAULTS["weight_decay"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    backend: str = DEFAULTS["backend"]
    hint: list = field(default_factory=list)
    rkd_distance: float = 0.0
    rkd_angle: float = 0.0
    rkd_taps: str = "embed:hidden"
    out: str = DEFAULTS["out"]
    cache_dir: str | None = DEFAULTS["cache_dir"]
    progress: bool = True


@dataclass
class SweepConfig:
    """``run_sweep``: every (T, alpha) of ``T`` x ``alpha`` (and, for kind "jsd", every ``beta``);
    with a transfer set the students train ``transfer_epochs`` on it, else ``epochs``."""
    data: str | None = None
    samples: int = DEFAULTS["samples"]
    transfer_samples: int = DEFAULTS["transfer_samples"]
    seed: int = DEFAULTS["seed"]
    T: tuple = (1.0, 2.0, 4.0, 8.0)
    alpha: tuple = (0.5, 0.9, 1.0)
    kind: str = "kl"
    beta: tuple = ()            # kind jsd: the betas to sweep (a third axis); empty for other kinds
    seeds: tuple = ()           # the students' seeds, each (T, alpha, beta) scored by their mean; empty: seed
    dkd_weights: tuple = DKD_WEIGHTS
    epochs: int = DEFAULTS["epochs"]
    transfer_epochs: int = DEFAULTS["transfer_epochs"]
    teacher_epochs: int = DEFAULTS["teacher_epochs"]
    teacher_width: int = DEFAULTS["teacher_width"]
    student_hidden: int = DEFAULTS["student_hidden"]
    weight_decay: float = DEFAULTS["weight_decay"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    backend: str = DEFAULTS["backend"]
    out: str = DEFAULTS["out"]
    cache_dir: str | None = DEFAULTS["cache_dir"]
    progress: bool = True
    scheduler: str | None = None   # a running dask scheduler's address: each student a task there
    workers: int = 0               # a local Dask cluster of this many worker processes; 0: no cluster


@dataclass
class MutualConfig:
    """``run_mutual``: ``models`` students trained together (seeds seed + k; CE + the mean KL at T
    to their peers), and the same models trained alone with CE. No teacher, no transfer set."""
    models: int = 2
    data: str | None = None
    samples: int = DEFAULTS["samples"]
    seed: int = DEFAULTS["seed"]
    T: float = 1.0                # the DML authors' temperature
    epochs: int = DEFAULTS["epochs"]
    student_hidden: int = DEFAULTS["student_hidden"]
    weight_decay: float = DEFAULTS["weight_decay"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    out: str = DEFAULTS["out"]
    progress: bool = True


@dataclass
class Report:
    """What an experiment found and wrote.

    ``rows``: the comparison table, in print order (name, test_accuracy, val_accuracy, parameters,
    compression against the teacher, inference_us_per_sample; KD rows also T and alpha).
    ``results``: report.json's own part, by key: distill "teacher", "student_scratch",
    "student_kd", "student_kd_<term>", "student_kd_transfer" (rows); sweep "student_kd" (the best)
    and "grid" (T, alpha, val_accuracy); student "teacher", "student_kd", "teacher_dir"; mutual
    "mutual", "independent" (lists of rows), "mean_test_accuracy".
    ``histories``: learning-curve label -> ``History``. ``student``: the exported student (None
    for ``run_teacher``); ``teacher``: the teacher (None for mutual learning)."""
    rows: list
    results: dict
    histories: dict
    student: object
    teacher: object
    dataset: dict
    seconds: float
    options: dict
    out: Path
    machine: str = field(default_factory=lambda: f"{platform.machine()} {platform.processor() or ''}".strip())

    def to_json(self) -> dict:
        return {**self.results, "dataset": self.dataset, "seconds": self.seconds, "machine": self.machine,
                "options": self.options}


# ---------------------------------------------------------------- checking a config

class ConfigError(checks.UserError):
    """A config field out of its range: ``field`` names it (the CLI names the option)."""

    def __init__(self, field_name, message):
        super().__init__(message)
        self.field = field_name


def _path(name, v):
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise checks.UserError(f"{name}: expected a path, got {v!r}")
    return os.fspath(v)


def _path_or_none(name, v):
    return v if v is None else _path(name, v)


def _existing_file(name, v):
    if v is not None:
        v = _path(name, v)
        if not Path(v).is_file():
            what = "is a folder" if Path(v).is_dir() else "not a regular file" if Path(v).exists() else "no such file"
            raise checks.UserError(f"{name}: {v}: {what}")
    return v


def _existing_dir(name, v):
    v = _path(name, v)
    if not Path(v).is_dir():
        raise checks.UserError(f"{name}: {v}: {'not a folder' if Path(v).exists() else 'no such folder'}")
    return v


def _model_name(name, v):
    """The name of an exported model in its folder: ``<dir>/<name>.npz`` and ``.json``."""
    if not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", ".."):
        raise checks.UserError(f"{name}: expected a model name such as 'student' or 'teacher', got {v!r}")
    return v


def _choice(*choices):
    def check(name, v):
        if v not in choices:
            raise checks.UserError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v
    return check


def _check_taps(name, t_tap, s_tap):
    """The tapped layers exist in the pipeline's teacher CNN and student MLP (the layer names do
    not depend on the sizes: tiny models tell them)."""
    for role, tap, model in (("teacher", t_tap, teacher_cnn(8, 2, width=1)), ("student", s_tap, student_mlp(8, 2, 1))):
        if tap not in model.names:
            raise checks.UserError(f"{name}: {role} tap {tap!r}: no such layer; the {role}'s layers are {model.names}")


def _rkd_taps(name, v):
    """"TEACHER_TAP:STUDENT_TAP", both layers existing."""
    t_tap, _, s_tap = str(v).partition(":")
    if not isinstance(v, str) or not t_tap or not s_tap or ":" in s_tap:
        raise checks.UserError(f"{name}: expected TEACHER_TAP:STUDENT_TAP, got {v!r}")
    _check_taps(name, t_tap, s_tap)
    return v


def _hints(name, v):
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, (list, tuple)):
        raise checks.UserError(f"{name}: expected a list of TEACHER_TAP:STUDENT_TAP[:WEIGHT] specs, got {v!r}")
    for h in v:
        _, t_tap, s_tap, _ = _parse_hint(h)
        _check_taps(f"hint {h!r}", t_tap, s_tap)
    return list(v)


def _store_path(name, v):
    v = _path(name, v)
    if not scale.is_store(v):
        raise checks.UserError(f"{name}: expected a soft-target store, a folder ending in .zarr, got {v!r}")
    if not Path(v).is_dir():
        raise checks.UserError(f"{name}: {v}: {'not a folder' if Path(v).exists() else 'no such store'}")
    return v


def _scheduler_address(name, v):
    if not isinstance(v, str) or "://" not in v and ":" not in v:
        raise checks.UserError(f"{name}: expected a dask scheduler's address such as tcp://127.0.0.1:8786, got {v!r}")
    return v


def _int(minimum, maximum=None):
    return lambda name, v: checks.integer(name, v, minimum, maximum)


def _real(minimum=None, maximum=None, exclusive_minimum=False):
    return lambda name, v: checks.number(name, v, minimum, maximum, exclusive_minimum=exclusive_minimum)


def _flag(name, v):
    if not isinstance(v, bool):
        raise checks.UserError(f"{name}: expected True or False, got {v!r}")
    return v


# Bounds beyond which a setting is a typo rather than an experiment (an extra digit that would
# ask for terabytes, a temperature whose square overflows); stated in the CLI's errors.
MAX_ROWS = 10_000_000          # samples, transfer samples
MAX_WIDTH = 4096               # teacher channels, student hidden units
T_RANGE = (0.01, 1000.0)

# How each config field is checked: one rule per field, wherever the field appears. Every
# experiment calls ``validate`` first, so a bad setting fails before any data is made or loaded.
CHECKS = {
    "models": _int(2, 64),
    "data": _existing_file,
    "teacher_dir": _existing_dir,
    "samples": _int(50, MAX_ROWS),
    "transfer_samples": _int(0, MAX_ROWS),
    "seed": _int(0, checks.MAX_SEED),
    "seeds": _int(0, checks.MAX_SEED),
    "T": _real(*T_RANGE),
    "alpha": _real(0.0, 1.0),
    "epochs": _int(1, 100_000), "transfer_epochs": _int(1, 100_000), "teacher_epochs": _int(1, 100_000),
    "teacher_width": _int(1, MAX_WIDTH), "student_hidden": _int(1, MAX_WIDTH),
    "weight_decay": _real(0.0),
    "batch_size": _int(2),   # BatchNorm and the relational terms need two rows
    "lr": _real(0.0, exclusive_minimum=True),
    "backend": _choice("numpy", "numba", "auto"),
    "kind": _choice(*KINDS),
    "beta": lambda name, v: None if v is None else checks.number(name, v, 0.0, 1.0),
    "dkd_weights": lambda name, v: checks.number(name, v, 0.0),
    "hint": _hints,
    "rkd_distance": _real(0.0),
    "rkd_angle": _real(0.0),
    "rkd_taps": _rkd_taps,
    "out": _path,
    "cache_dir": _path_or_none,
    "progress": _flag,
    "name": _model_name,   # evaluate's and predict's model in its folder
    "soft_targets": lambda name, v: v if v is None else _store_path(name, v),
    "scheduler": lambda name, v: v if v is None else _scheduler_address(name, v),
    "workers": _int(0, 256),
}


def validate(config):
    """Check every field of an experiment's config (``CHECKS``) and store the checked value (an
    int, a float, a str: a NumPy scalar or a path object becomes what the report's JSON can hold);
    the first bad field raises ``ConfigError`` naming it. The sweep's T and alpha are checked
    element by element (a single number is taken as a list of one)."""
    for f in fields(config):
        value, check = getattr(config, f.name), CHECKS[f.name]
        try:
            if isinstance(f.default, tuple):
                values = value if isinstance(value, (tuple, list)) else [value]
                if not values and f.default:   # an empty default (the sweep's beta) may stay empty
                    raise checks.UserError(f"{f.name}: expected at least one value")
                value = tuple(check(f.name, v) for v in values)
            else:
                value = check(f.name, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f.name, str(exc)) from None
        setattr(config, f.name, value)
    if hasattr(config, "kind"):
        betas = config.beta if isinstance(config.beta, tuple) else (config.beta,)   # the sweep takes several
        try:
            if config.kind == "jsd" and not betas:
                raise checks.UserError("beta: kind='jsd' needs beta in [0, 1] (one or more for the sweep)")
            for b in betas or (None,):
                check_beta(config.kind, b)
        except checks.UserError as exc:
            raise ConfigError("beta", str(exc)) from None
        if len(config.dkd_weights) != 2:
            raise ConfigError("dkd_weights", f"dkd_weights: expected two weights (TCKD, NCKD), got "
                                             f"{list(config.dkd_weights)}")
        if config.kind != "dkd" and config.dkd_weights != DKD_WEIGHTS:
            raise ConfigError("dkd_weights", f"dkd_weights: only kind dkd takes them (kind {config.kind!r})")
        if config.kind == "dkd" and getattr(config, "transfer_samples", 0):
            raise ConfigError("kind", "kind: dkd splits each row at its label, and the transfer set has none; add "
                                      "--transfer-samples 0")
        fused = _fused_kinds("numba")
        if config.backend == "numba" and config.kind not in fused:
            raise ConfigError("backend", f"backend: the fused kernel computes kind {', '.join(fused)}, not "
                                         f"{config.kind!r}; use numpy or auto")
    if getattr(config, "scheduler", None) and getattr(config, "workers", 0):
        raise ConfigError("workers", "workers: --workers starts a local cluster, --scheduler connects to a running "
                                     "one; give one of them")
    if getattr(config, "scheduler", None) or getattr(config, "workers", 0) or getattr(config, "soft_targets", None):
        field_name = next(f for f in ("soft_targets", "scheduler", "workers") if getattr(config, f, None))
        try:
            scale.require()
        except checks.MissingDependency as exc:
            raise ConfigError(field_name, f"{field_name}: {exc}") from None
    if getattr(config, "soft_targets", None) and config.transfer_samples:
        raise ConfigError("transfer_samples", "transfer_samples: the soft-target store holds the transfer set; "
                                              "drop --transfer-samples")
    if hasattr(config, "weight_decay") and config.lr * config.weight_decay >= 1:
        raise ConfigError("weight_decay", f"weight_decay: expected lr x weight_decay < 1 (AdamW multiplies each "
                                          f"weight by 1 - lr x weight_decay a step), got {config.weight_decay:g} "
                                          f"with lr {config.lr:g}")


def _prepare_outputs(config, names):
    """The folders the experiment will write, created and proven writable, and the files it will
    write there (``names``) not folders, before any work."""
    out = writable_dir(config.out, "out")
    for name in names:
        writable_file(out / name, "out")
    if getattr(config, "cache_dir", None) is not None:
        writable_dir(config.cache_dir, "cache_dir")


def _start(config, outputs) -> float:
    validate(config)
    _prepare_outputs(config, outputs)
    return time.perf_counter()


# ---------------------------------------------------------------- shared steps

def _dataset(config, transfer_samples):
    if config.data:
        return from_npz(config.data, seed=config.seed, transfer_samples=transfer_samples)
    return mnist1d(config.samples, seed=config.seed, transfer_samples=transfer_samples)


def _teacher(config, data, on_step=None):
    """Step 1 (or the cached teacher): (teacher, history). The teacher keeps TrainConfig's weight decay."""
    if data.x_train.shape[1] < 4:   # two max-pools of 2
        raise FileError(f"{data.spec.get('path', data.name)}: x has {data.x_train.shape[1]} features; the teacher "
                        f"CNN needs at least 4")
    cfg = TrainConfig(epochs=config.teacher_epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    return train_teacher(data, cfg, width=config.teacher_width, progress=config.progress,
                         cache_dir=config.cache_dir, on_step=on_step)


def _targets(teacher, data, cache_dir):
    """Step 2: the teacher's logits on the training rows and (None without one) on the transfer set."""
    tl = soft_targets(teacher, data.x_train, cache_dir)
    tt = soft_targets(teacher, data.x_transfer, cache_dir) if len(data.x_transfer) else None
    return tl, tt


def _divergence(config) -> dict:
    """The soft term's kind (and JSD's beta) as train_student takes them: empty for the default
    forward KL, so reports and exports of KL runs read as before."""
    if config.kind == "kl":
        return {}
    extra = {"dkd_weights": list(config.dkd_weights)} if config.kind == "dkd" else {}
    beta = config.beta if not isinstance(config.beta, tuple) else None   # the sweep sets its own
    return {"kind": config.kind, **({"beta": beta} if beta is not None else {}), **extra}


def _kd_name(T, alpha, divergence) -> str:
    """"KD (T=4, alpha=0.9)", or with the divergence: "KD jsd(beta=0.5) (T=4, alpha=0.9)"."""
    kind = divergence.get("kind")
    what = "" if kind is None else f" {kind}" + (f"(beta={divergence['beta']:g})" if "beta" in divergence else "")
    return f"KD{what} (T={T:g}, alpha={alpha:g})"


def _student_cfg(config, epochs):
    return TrainConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, seed=config.seed)


def _row(name, model, data, teacher_params, extra=None):
    n = model.num_parameters()
    return {"name": name, "test_accuracy": accuracy(model, data.x_test, data.y_test),
            "val_accuracy": accuracy(model, data.x_val, data.y_val), "parameters": n,
            "compression": teacher_params / n,
            "inference_us_per_sample": 1e6 * inference_seconds_per_sample(model, data.x_test),
            **(extra or {})}


def _write_report(report: Report):
    atomic_write(report.out / "report.json", lambda tmp: tmp.write_text(json.dumps(report.to_json(), indent=1)))


def _exported(directory, name, transfer_samples):
    """An exported model and the dataset it was trained on, the two checked against each other."""
    model, info = load_student(directory, name)
    where = Path(directory) / f"{name}.json"
    data = load_dataset(info["dataset"], transfer_samples=transfer_samples, source=where)
    if data.num_classes != info["num_classes"] or data.x_train.shape[1] != len(info["mean"]):
        raise FileError(f"{where}: the model ({info['num_classes']} classes, {len(info['mean'])} features) does "
                        f"not match its dataset as rebuilt ({data.num_classes} classes, {data.x_train.shape[1]} "
                        f"features)")
    return model, data


def _exported_teacher(teacher_dir, transfer_samples):
    return _exported(teacher_dir, "teacher", transfer_samples)


# ---------------------------------------------------------------- feature and relational variants

def _parse_hint(spec):
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"hint {spec!r}: expected TEACHER_TAP:STUDENT_TAP[:WEIGHT], e.g. embed:hidden:0.5")
    try:
        weight = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise ValueError(f"hint {spec!r}: the weight {parts[2]!r} is not a number") from None
    checks.number(f"hint {spec!r}: the weight", weight, 0)
    return ("hint", parts[0], parts[1], weight)


def feature_variants(config: DistillConfig):
    """(report key, label, feature specs) of each feature / relational student asked for; the
    specs are (kind, teacher_tap, student_tap, weight), as ``train_student`` takes them."""
    out = []
    if config.hint:
        specs = [_parse_hint(h) for h in config.hint]
        out.append(("student_kd_hint", "hint " + ", ".join(f"{a}->{b}" for _, a, b, _ in specs), specs))
    t_tap, s_tap = _rkd_taps("rkd_taps", config.rkd_taps).split(":")
    for kind, weight in (("rkd_distance", config.rkd_distance), ("rkd_angle", config.rkd_angle)):
        if weight:
            out.append((f"student_kd_{kind}", f"{kind.replace('_', ' ')} x{weight:g}",
                        [(kind, t_tap, s_tap, weight)]))
    return out


# ---------------------------------------------------------------- the experiments

def run_teacher(config: TeacherConfig, on_step=None) -> Report:
    """Step 1 alone: train (or reuse the cached) teacher; writes teacher.npz/.json to config.out."""
    t0 = _start(config, ("teacher.npz", "teacher.json"))
    data = _dataset(config, 0)
    teacher, hist = _teacher(config, data, on_step)
    out = Path(config.out)
    export(teacher, out, "teacher", data)
    row = _row("teacher (CNN)", teacher, data, teacher.num_parameters())
    return Report([row], {"teacher": row}, {"teacher": hist}, None, teacher, data.spec,
                  time.perf_counter() - t0, asdict(config), out)


def write_soft_targets(teacher_dir, out, transfer_samples: int = 0, *, rows: int | None = None,
                       top_k: int | None = None, chunk_rows: int | None = None, scheduler: str | None = None,
                       workers: int = 0, progress: bool = True) -> dict:
    """Step 2 alone: the teacher exported to ``teacher_dir``, on its own dataset.

    ``out`` an .npz: writes ``logits_train``, ``y_train`` (and ``logits_transfer`` on
    ``transfer_samples`` transfer rows); returns those arrays. ``out`` a folder ending in .zarr:
    a soft-target store of the teacher's logits on ``rows`` transfer rows (default 45000), dense
    or its ``top_k`` classes, written by Dask in chunks of ``chunk_rows`` rows on this machine, a
    local cluster of ``workers`` processes or the running ``scheduler`` (``minikd.scale``);
    returns the store's attributes."""
    transfer_samples = CHECKS["transfer_samples"]("transfer_samples", transfer_samples)
    _existing_dir("teacher_dir", teacher_dir)
    if not scale.is_store(out):
        extra = [n for n, v in (("rows", rows), ("top_k", top_k), ("chunk_rows", chunk_rows), ("scheduler", scheduler),
                                ("workers", workers)) if v]
        if extra:
            raise checks.UserError(f"{extra[0]}: only a soft-target store takes it; name --out DIR.zarr")
        writable_file(out, "out")
        teacher, data = _exported_teacher(teacher_dir, transfer_samples)
        arrays = {"logits_train": soft_targets(teacher, data.x_train), "y_train": data.y_train}
        if len(data.x_transfer):
            arrays["logits_transfer"] = soft_targets(teacher, data.x_transfer)
        write_npz(out, arrays)
        return arrays
    if transfer_samples:
        raise checks.UserError("transfer_samples: a soft-target store labels --rows transfer rows of its own; drop "
                               "--transfer-samples")
    scale.require()
    rows = DEFAULTS["transfer_samples"] if rows is None else CHECKS["transfer_samples"]("rows", rows)
    if not rows:
        raise checks.UserError("rows: expected at least 1 row")
    chunk_rows = scale.CHUNK_ROWS if chunk_rows is None else checks.integer("chunk_rows", chunk_rows, 1, MAX_ROWS)
    top_k = None if top_k is None else checks.integer("top_k", top_k, 1)
    if Path(out).exists() and not Path(out).is_dir():
        raise FileError(f"out {out}: exists and is not a folder (a store is a folder ending in .zarr)")
    writable_dir(Path(out).parent if str(Path(out).parent) else Path("."), "out's folder")
    teacher, data = _exported_teacher(teacher_dir, 0)   # MNIST-1D: no in-memory transfer set; an .npz: its x_transfer
    if top_k is not None and top_k > data.num_classes:
        raise checks.UserError(f"top_k: expected at most the {data.num_classes} classes, got {top_k}")
    with scale.dask_client(scheduler, workers) as client:
        return scale.write_store(teacher, data, out, rows=rows, top_k=top_k, chunk_rows=chunk_rows, client=client,
                                 progress=progress)


def run_student(config: StudentConfig, on_step=None) -> Report:
    """Step 3 alone: a KD student (with the transfer set when ``transfer_samples``, or the one of
    the soft-target store ``soft_targets``, read a chunk at a time) from an exported teacher;
    writes student.npz/.json and report.json to config.out."""
    t0 = _start(config, ("student.npz", "student.json", "report.json"))
    teacher, data = _exported_teacher(config.teacher_dir, config.transfer_samples)
    store = None
    if config.soft_targets:   # the transfer set and its soft targets, streamed chunk by chunk from the store
        store = scale.SoftTargetStore(config.soft_targets)
        store.check_matches(teacher, data)
    tl, tt = _targets(teacher, data, config.cache_dir)
    use_transfer = tt is not None or store is not None
    cfg = _student_cfg(config, config.transfer_epochs if use_transfer else config.epochs)
    div = _divergence(config)
    model, hist = train_student(data, cfg, teacher_logits=tl, teacher_logits_transfer=tt, T=config.T,
                                alpha=config.alpha, **div, hidden=config.student_hidden, use_transfer=use_transfer,
                                progress=config.progress, desc="student (KD)", backend=_loss_backend(config),
                                on_step=on_step, transfer=store)
    tp = teacher.num_parameters()
    label = f"student {_kd_name(config.T, config.alpha, div)}" + (
        f" + store ({store.rows})" if store is not None else " + transfer" if use_transfer else "")
    rows = [_row("teacher (CNN)", teacher, data, tp),
            _row(label, model, data, tp, {"T": config.T, "alpha": config.alpha, **div})]
    out = Path(config.out)
    export(model, out, "student", data, {"T": config.T, "alpha": config.alpha, **div})
    report = Report(rows, {"teacher": rows[0], "student_kd": rows[1], "teacher_dir": str(config.teacher_dir)},
                    {"student KD": hist}, model, teacher, data.spec, time.perf_counter() - t0, asdict(config), out)
    _write_report(report)
    return report


def run_distill(config: DistillConfig, on_step=None) -> Report:
    """Steps 1-5: the teacher, its soft targets, the student from scratch, with KD, with each
    feature / relational term, and with the transfer set (same seed and schedule); exports the
    teacher and the best KD student (with the transfer set when there is one) and writes
    report.json and learning_curves.png to config.out."""
    t0 = _start(config, ("teacher.npz", "teacher.json", "student.npz", "student.json", "report.json",
                         "learning_curves.png"))
    variants = feature_variants(config)
    data = _dataset(config, config.transfer_samples)
    teacher, thist = _teacher(config, data, on_step)
    tl, tt = _targets(teacher, data, config.cache_dir)
    cfg = _student_cfg(config, config.epochs)
    kd_options = {"T": config.T, "alpha": config.alpha, **_divergence(config)}
    common = dict(hidden=config.student_hidden, progress=config.progress, backend=_loss_backend(config),
                  on_step=on_step)
    scratch, sh = train_student(data, cfg, desc="student (scratch)", **common)
    kd, kh = train_student(data, cfg, teacher_logits=tl, desc="student (KD)", **kd_options, **common)
    tp = teacher.num_parameters()
    results = {"teacher": _row("teacher (CNN)", teacher, data, tp),
               "student_scratch": _row("student from scratch", scratch, data, tp),
               "student_kd": _row(f"student {_kd_name(config.T, config.alpha, kd_options)}", kd, data, tp,
                                  kd_options)}
    histories = {"teacher": thist, "student scratch": sh, "student KD": kh}
    best = kd
    for key, label, specs in variants:
        vm, vh = train_student(data, cfg, teacher_logits=tl, desc=f"student ({label})", feature_specs=specs,
                               teacher=teacher, cache_dir=config.cache_dir, **kd_options, **common)
        results[key] = _row(f"student KD + {label}", vm, data, tp, {**kd_options, "terms": [list(x) for x in specs]})
        histories[f"KD + {label}"] = vh
    if tt is not None:
        kdt, kth = train_student(data, _student_cfg(config, config.transfer_epochs), teacher_logits=tl,
                                 teacher_logits_transfer=tt, use_transfer=True, desc="student (KD + transfer)",
                                 **kd_options, **common)
        results["student_kd_transfer"] = _row(f"student KD + transfer ({len(data.x_transfer)})", kdt, data, tp,
                                              {**kd_options, "transfer_samples": len(data.x_transfer)})
        histories["student KD + transfer"] = kth
        best = kdt
    out = Path(config.out)
    export(teacher, out, "teacher", data)
    export(best, out, "student", data, kd_options)
    learning_curves(histories, out / "learning_curves.png")
    report = Report(list(results.values()), results, histories, best, teacher, data.spec,
                    time.perf_counter() - t0, asdict(config), out)
    _write_report(report)
    return report


def run_sweep(config: SweepConfig, on_step=None) -> Report:
    """Step 4: one student per (T, alpha) (and per beta for kind "jsd", and per seed of ``seeds``:
    then each is scored by its mean validation accuracy over the seeds and the best seed's student
    is the one kept), with the transfer set when there is one; the best by validation accuracy
    (ties: the first in (beta, T, alpha) order) is exported; writes student.npz/.json, sweep.png (a heatmap per beta) and report.json. With
    ``scheduler`` or ``workers`` each student is a Dask task (``minikd.scale``): the same report."""
    t0 = _start(config, ("student.npz", "student.json", "report.json", "sweep.png"))
    temperatures, alphas = [float(t) for t in config.T], [float(a) for a in config.alpha]
    betas = list(config.beta)
    data = _dataset(config, config.transfer_samples)
    teacher, _ = _teacher(config, data, on_step)
    tl, tt = _targets(teacher, data, config.cache_dir)
    use_transfer = tt is not None
    cfg = _student_cfg(config, config.transfer_epochs if use_transfer else config.epochs)
    grids, per_seed, best = [], [], None
    seeds = list(config.seeds) or [config.seed]
    with scale.dask_client(config.scheduler, config.workers) as client:
        for b in betas or [None]:
            div = {**_divergence(config), **({"beta": b} if b is not None else {})}
            grid, found, by_seed = sweep(data, cfg, temperatures, alphas, teacher_logits=tl, teacher_logits_transfer=tt,
                                         hidden=config.student_hidden, use_transfer=use_transfer,
                                         progress=config.progress, backend=_loss_backend(config), on_step=on_step,
                                         client=client, seeds=seeds, **div)
            grids.append(grid)
            per_seed.append(by_seed)
            if best is None or found[0] > best[0][0]:
                best = (found, div, len(grids) - 1)
    (_, T, a, model, hist), div, k = best
    tp = teacher.num_parameters()
    row = _row(f"best student {_kd_name(T, a, div)}", model, data, tp, {"T": T, "alpha": a, **div})
    out = Path(config.out)
    export(model, out, "student", data, {"T": T, "alpha": a, **div})
    titles = [f"beta = {b:g}" for b in betas] if betas else None
    sweep_heatmap(np.stack(grids), temperatures, alphas, out / "sweep.png",
                  best=(k, temperatures.index(T), alphas.index(a)), titles=titles)
    grid_report = {"T": temperatures, "alpha": alphas,
                   "val_accuracy": [g.tolist() for g in grids] if betas else grids[0].tolist()}
    if betas:
        grid_report["beta"] = betas
    if config.seeds:   # the mean over the seeds above; here each seed's
        grid_report["seeds"] = seeds
        grid_report["val_accuracy_per_seed"] = ([np.moveaxis(g, 2, 0).tolist() for g in per_seed] if betas
                                                else np.moveaxis(per_seed[0], 2, 0).tolist())
    report = Report([_row("teacher (CNN)", teacher, data, tp), row], {"student_kd": row, "grid": grid_report},
                    {f"best {_kd_name(T, a, div)}": hist}, model, teacher, data.spec, time.perf_counter() - t0,
                    asdict(config), out)
    _write_report(report)
    return report


def run_mutual(config: MutualConfig) -> Report:
    """Deep mutual learning: the cohort, then the same models (same seeds) trained alone with CE;
    exports model 0 of the cohort as the student, writes report.json and learning_curves.png."""
    t0 = _start(config, ("student.npz", "student.json", "report.json", "learning_curves.png"))
    data = _dataset(config, 0)
    cfg = _student_cfg(config, config.epochs)
    cohort, mh = train_mutual(data, cfg, config.models, T=config.T, hidden=config.student_hidden,
                              progress=config.progress)
    alone = [train_student(data, replace(cfg, seed=config.seed + k), hidden=config.student_hidden,
                           progress=config.progress, desc=f"independent {k}") for k in range(config.models)]
    tp = cohort[0].num_parameters()
    mutual = [_row(f"model {k} mutual", m, data, tp) for k, m in enumerate(cohort)]
    independent = [_row(f"model {k} independent", m, data, tp) for k, (m, _) in enumerate(alone)]
    means = {"mutual": float(np.mean([r["test_accuracy"] for r in mutual])),
             "independent": float(np.mean([r["test_accuracy"] for r in independent]))}
    histories = {**{f"mutual {k}": h for k, h in enumerate(mh)},
                 **{f"independent {k}": h for k, (_, h) in enumerate(alone)}}
    out = Path(config.out)
    export(cohort[0], out, "student", data, {"mutual_models": config.models, "T": config.T})
    learning_curves(histories, out / "learning_curves.png")
    report = Report(mutual + independent, {"mutual": mutual, "independent": independent, "mean_test_accuracy": means},
                    histories, cohort[0], None, data.spec, time.perf_counter() - t0, asdict(config), out)
    _write_report(report)
    return report


# ---------------------------------------------------------------- using an exported model

class Evaluation(NamedTuple):
    parameters: int
    test_accuracy: float
    val_accuracy: float
    test_samples: int
    dataset: str


def evaluate(directory, name: str = "student") -> Evaluation:
    """Reload ``<directory>/<name>`` and its dataset (from the stored spec); its accuracies."""
    _existing_dir("dir", directory)
    model, data = _exported(directory, CHECKS["name"]("name", name), 0)
    return Evaluation(model.num_parameters(), accuracy(model, data.x_test, data.y_test),
                      accuracy(model, data.x_val, data.y_val), len(data.y_test), data.name)


def predict(directory, inputs, name: str = "student", output=None) -> np.ndarray:
    """Classes for the raw inputs in ``inputs`` (a .npy, or an .npz with an array ``x`` or a single
    array), (N, D) or (D,), standardized as the model's training data was; saved as a .npy to
    exactly ``output`` when given. Rows with NaN or inf are refused (naming the first)."""
    _existing_dir("dir", directory)
    CHECKS["name"]("name", name)
    if output is not None:
        writable_file(output, "output")
    model, info = load_student(directory, name)
    x = read_array(inputs, "x", "inputs to predict: a .npy of shape (N, D) or (D,)")
    d = len(info["mean"])
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != d or x.dtype.kind not in "fiu" or not len(x):
        raise FileError(f"{inputs}: expected numbers of shape (N, {d}) with N >= 1, or ({d},); got {x.shape} "
                        f"{x.dtype}")
    try:
        check_finite_rows(x, "input")
    except ValueError as exc:
        raise FileError(f"{inputs}: {exc}") from None
    z = standardize(x, info["mean"], info["std"])
    if not np.isfinite(z).all():
        check_finite_rows(z, f"{inputs}: input after standardization (values too large)")
    pred = np.argmax(model.predict(z), axis=-1)
    if output is not None:
        write_npy(output, pred)
    return pred
