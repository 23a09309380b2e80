"""The distillation practice end to end (floor 4), Hinton et al. 2015's five steps:

1. ``train_teacher``: a large model on the labeled training split (cross-entropy).
2. ``soft_targets``: the teacher's logits on the training split and the transfer set, computed
   once and cached on disk under a key of (dataset content, teacher weights). They are stored
   as logits: the temperature is applied at loss time, so tuning T reuses them.
3. ``train_student``: the small model with the KD loss; the same model from scratch (same seed,
   same schedule) is the baseline. Labeled rows get alpha * T^2 * KL + (1 - alpha) * CE;
   transfer-set rows (no label) get the soft term only.
4. ``sweep``: one student per (T, alpha), picked on the validation split, reported on test.
5. ``export`` / ``load_student``: weights .npz + architecture .json (no pickle) with the
   standardization and dataset spec, so ``minikd evaluate`` and ``minikd predict`` can use it.

Every function takes a seed; the same seed gives the same report (up to timings).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import nn
from .data import Dataset, fingerprint, minibatches
from .losses import cross_entropy_and_grad, kd_loss_and_grad
from .nn.models import student_mlp, teacher_cnn
from .nn.serialize import atomic_write

__all__ = ["TrainConfig", "History", "train", "train_teacher", "soft_targets", "train_student",
           "accuracy", "inference_seconds_per_sample", "export", "load_student", "sweep",
           "distill_loss_and_grad"]


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class History:
    train_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x), axis=-1) == y)) if len(y) else float("nan")


def inference_seconds_per_sample(model, x, repeats: int = 3) -> float:
    """Best of ``repeats`` eval-mode passes over x, per sample."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict(x)
        best = min(best, time.perf_counter() - t0)
    return best / max(len(x), 1)


def distill_loss_and_grad(student_logits, teacher_logits, labels, *, T, alpha, backend="numpy"):
    """Per batch: alpha T^2 KL + (1 - alpha) CE on labeled rows, the soft term alone on rows
    labeled -100 (transfer set). Each term is a batch mean over the rows it covers."""
    labeled = labels != -100
    if teacher_logits is None:
        return cross_entropy_and_grad(student_logits, labels)
    if labeled.all():
        if backend == "numpy":
            return kd_loss_and_grad(student_logits, teacher_logits, labels, T=T, alpha=alpha)
        from .kernels import softmax_kl  # noqa: PLC0415  (floor 3, chosen by the caller)
        return softmax_kl(student_logits, teacher_logits, labels, T=T, alpha=alpha, backend=backend)
    soft, dsoft = kd_loss_and_grad(student_logits, teacher_logits, T=T, alpha=1.0)
    loss, grad = alpha * soft, alpha * dsoft
    if alpha < 1.0 and labeled.any():
        hard, dhard = cross_entropy_and_grad(student_logits, labels)
        loss, grad = loss + (1 - alpha) * hard, grad + (1 - alpha) * dhard
    return loss, grad


def train(model, x, y, cfg: TrainConfig, *, teacher_logits=None, T=1.0, alpha=0.0, val=None,
          desc="train", progress=True, backend="numpy") -> History:
    """Minibatch AdamW with a cosine schedule; labels -100 mark unlabeled (transfer) rows."""
    opt = nn.AdamW(model, cfg.lr, weight_decay=cfg.weight_decay)
    schedule = nn.cosine_schedule(cfg.lr, cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    hist = History()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        opt.lr = schedule(epoch)
        total, count = 0.0, 0
        for idx in minibatches(len(x), cfg.batch_size, rng):
            if len(idx) < 2:  # BatchNorm needs two rows; at most one row per epoch is skipped
                continue
            model.zero_grad()
            logits, cache = model.forward(x[idx], train=True)
            t = None if teacher_logits is None else teacher_logits[idx]
            loss, dlogits = distill_loss_and_grad(logits, t, y[idx], T=T, alpha=alpha, backend=backend)
            model.backward(dlogits, cache)
            opt.step()
            total, count = total + float(loss) * len(idx), count + len(idx)
        hist.train_loss.append(total / max(count, 1))
        if val is not None:
            hist.val_accuracy.append(accuracy(model, *val))
            bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val_acc=f"{hist.val_accuracy[-1]:.3f}")
    return hist


def train_teacher(data: Dataset, cfg: TrainConfig, width: int = 32, progress=True, cache_dir=None):
    """Step 1. Returns (model, history); with ``cache_dir`` a teacher trained before with the same
    dataset, width and config is loaded instead of retrained."""
    key = fingerprint(data.x_train, data.y_train) + "-" + fingerprint(
        np.frombuffer(json.dumps([asdict(cfg), width]).encode(), np.uint8))
    path = None if cache_dir is None else Path(cache_dir) / f"teacher-{key}"
    if path is not None and path.with_suffix(".json").exists() and path.with_suffix(".npz").exists():
        model = nn.load(path)
        return model, History(**model.extra.get("history", {}))
    model = teacher_cnn(data.x_train.shape[1], data.num_classes, width=width, seed=cfg.seed)
    hist = train(model, data.x_train, data.y_train, cfg, val=(data.x_val, data.y_val),
                 desc="teacher", progress=progress)
    if path is not None:
        nn.save(model, path, extra={"history": asdict(hist)})
    return model, hist


def soft_targets(teacher, x, cache_dir=None):
    """Step 2. Teacher logits on x (float32), cached under (x content, teacher weights)."""
    if cache_dir is None:
        return teacher.predict(x).astype(np.float32)
    weights = nn.state_dict(teacher)
    key = fingerprint(x, *[weights[k] for k in sorted(weights)])
    path = Path(cache_dir) / f"soft-targets-{key}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    logits = teacher.predict(x).astype(np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, logits)
    atomic_write(path, write)
    return logits


def train_student(data: Dataset, cfg: TrainConfig, *, teacher_logits=None, teacher_logits_transfer=None,
                  T=4.0, alpha=0.9, hidden=50, use_transfer=False, progress=True, desc="student",
                  backend="numpy"):
    """Step 3. The student MLP, from scratch (teacher_logits None) or distilled; with
    ``use_transfer`` the transfer set joins the training rows with label -100 (soft term only)."""
    model = student_mlp(data.x_train.shape[1], data.num_classes, hidden=hidden, seed=cfg.seed)
    x, y, t = data.x_train, data.y_train, teacher_logits
    if use_transfer and len(data.x_transfer):
        x = np.concatenate([x, data.x_transfer])
        y = np.concatenate([y, np.full(len(data.x_transfer), -100, dtype=np.int64)])
        t = np.concatenate([t, teacher_logits_transfer])
    hist = train(model, x, y, cfg, teacher_logits=t, T=T, alpha=alpha, val=(data.x_val, data.y_val),
                 desc=desc, progress=progress, backend=backend)
    return model, hist


def export(model, out_dir, name: str, data: Dataset, extra: dict | None = None):
    """Step 5. ``<out_dir>/<name>.npz`` + ``.json`` with the standardization and dataset spec."""
    info = {"mean": data.mean.tolist(), "std": data.std.tolist(), "dataset": data.spec,
            "num_classes": data.num_classes, **(extra or {})}
    nn.save(model, Path(out_dir) / name, extra=info)


def load_student(out_dir, name: str = "student"):
    """Load an exported model; returns (model, info) where info holds mean/std and the dataset spec."""
    model = nn.load(Path(out_dir) / name)
    info = model.extra
    for k in ("mean", "std"):
        if k not in info:
            raise ValueError(f"{out_dir}/{name}.json: no '{k}' stored; was it written by minikd distill?")
    return model, info


def sweep(data: Dataset, cfg: TrainConfig, temperatures, alphas, *, teacher_logits,
          teacher_logits_transfer=None, hidden=50, use_transfer=False, progress=True):
    """Step 4. One student per (T, alpha); returns the grid of validation accuracies, the best
    pair by validation accuracy (ties: first in grid order) and that student."""
    grid = np.zeros((len(temperatures), len(alphas)))
    best = None
    pairs = [(i, j) for i in range(len(temperatures)) for j in range(len(alphas))]
    for i, j in tqdm(pairs, desc="sweep", disable=not progress, unit="student"):
        T, a = float(temperatures[i]), float(alphas[j])
        model, hist = train_student(data, cfg, teacher_logits=teacher_logits,
                                    teacher_logits_transfer=teacher_logits_transfer, T=T, alpha=a,
                                    hidden=hidden, use_transfer=use_transfer, progress=False)
        grid[i, j] = accuracy(model, data.x_val, data.y_val)
        if best is None or grid[i, j] > best[0]:
            best = (grid[i, j], T, a, model, hist)
    return grid, best
