"""The distillation practice's building blocks (floor 4), Hinton et al. 2015's five steps:

1. ``train_teacher``: a large model on the labeled training split (cross-entropy).
2. ``soft_targets``: the teacher's logits on the training split and the transfer set, computed
   once and cached on disk under a key of (dataset content, teacher weights). They are stored
   as logits: the temperature is applied at loss time, so tuning T reuses them.
3. ``train_student``: the small model with the KD loss; the same model from scratch (same seed,
   same schedule) is the baseline. Labeled rows get alpha * T^2 * KL + (1 - alpha) * CE;
   transfer-set rows (label -100) get the soft term alone; a batch's loss is the sum over its
   rows divided by their number (``distill_loss_and_grad``).
4. ``sweep``: one student per (T, alpha), picked on the validation split, reported on test.
5. ``export`` / ``load_student``: weights .npz + architecture .json (no pickle) with the
   standardization and dataset spec, so ``minikd evaluate`` and ``minikd predict`` can use it.

``minikd.experiments`` runs them as the CLI's jobs. Every function takes a seed; the same seed
gives the same report (up to timings). ``train``'s ``on_step`` hook sees what each optimizer step
applies (a ``Step``): the tests check it against the loss written out by hand.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from . import checks, nn
from .data import Dataset, fingerprint, minibatches
from .kernels import softmax_kl
from .losses import cross_entropy_and_grad, hint_backward, hint_forward, mutual_backward, mutual_forward
from .losses.relational import RKD_TERMS
from .losses.topk import TopK, topk_from_dense
from .nn.models import student_mlp, teacher_cnn
from .files import FileError, check_finite_rows, read_npy, require_keys, write_npy

__all__ = ["TrainConfig", "History", "Step", "FeatureTerm", "train", "train_teacher", "soft_targets",
           "teacher_features", "make_feature_terms", "train_student", "train_mutual",
           "accuracy", "inference_seconds_per_sample", "export", "load_student", "sweep",
           "distill_loss_and_grad", "TrainingDiverged", "TransferChunks", "sweep_student"]

log = logging.getLogger("minikd")


@dataclass
class TrainConfig:
    """Minibatch AdamW with a cosine schedule; every field checked on construction (batches of
    one row are refused: BatchNorm and the relational terms need two)."""
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        self.epochs = checks.integer("epochs", self.epochs, 1)
        self.batch_size = checks.integer("batch_size", self.batch_size, 2)
        self.lr = checks.number("lr", self.lr, 0, exclusive_minimum=True)
        self.weight_decay = checks.number("weight_decay", self.weight_decay, 0)
        self.seed = checks.integer("seed", self.seed, 0, checks.MAX_SEED)


class TrainingDiverged(checks.UserError):
    """The model's outputs or loss became NaN or infinite during training (usually: the learning
    rate is too high for the data): stopped at once, rather than training on, exporting NaN weights
    and reporting chance accuracy."""


def _check_diverged(desc, epoch, cfg, logits=None, loss=0.0):
    if (logits is not None and not np.isfinite(logits).all()) or not np.isfinite(loss):
        what = "the model's outputs" if logits is not None else "the loss"
        raise TrainingDiverged(f"{desc}: training diverged in epoch {epoch + 1} ({what} became NaN or infinite); "
                               f"try a lower learning rate than {cfg.lr:g} (or smaller loss weights)")


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


def distill_loss_and_grad(student_logits, teacher_logits, labels, *, T, alpha, backend="numpy", kind="kl",
                          beta=None, dkd_weights=None):
    """The logits' part of a training step: (loss, d loss / d student_logits).

    With teacher logits, the KD loss with ``unlabeled="soft"`` (``minikd.losses.conventions``):
    alpha T^2 D + (1 - alpha) CE on labeled rows, D the divergence ``kind`` (KL(q||p) by default;
    ``minikd.losses.divergences``, JSD with ``beta``), the distillation term alone on rows labeled -100
    (the transfer set), summed over all rows and divided by their number. ``backend`` chooses the
    implementation ("numpy": the reference, "numba": the fused kernel, "auto"). Without a teacher,
    the cross-entropy, averaged over the labeled rows."""
    if teacher_logits is None:
        return cross_entropy_and_grad(student_logits, labels)
    return softmax_kl(student_logits, teacher_logits, labels, T=T, alpha=alpha, unlabeled="soft", backend=backend,
                      kind=kind, beta=beta, dkd_weights=None if dkd_weights is None else tuple(dkd_weights))


@dataclass
class FeatureTerm:
    """An extra distillation term on tapped features (FitNets hint or RKD), weighted.

    ``teacher`` holds the teacher's tapped features for every training row (N, ...); the
    student's tap is flattened to (B, D_s) and the teacher's to (B, D_t). A hint term owns a
    regressor ``nn.Linear(D_s, D_t)`` trained with the student (feature maps are flattened, so the
    regressor is a Linear rather than a 1x1 convolution: the default student is an MLP)."""
    kind: str                 # "hint", "rkd_distance" or "rkd_angle"
    student_tap: str
    teacher: np.ndarray
    weight: float
    regressor: object = None

    def loss_and_tap_grad(self, feat, idx):
        """(weight * the term's loss, its gradient with respect to the tap's output ``feat``) on
        the training rows ``idx``; a hint term also leaves its regressor's gradient."""
        fs = feat.reshape(len(idx), -1)
        ft = self.teacher[idx].reshape(len(idx), -1)
        if self.kind == "hint":
            r, rc = self.regressor.forward(fs)
            value, hc = hint_forward(r, ft)
            g = self.regressor.backward(hint_backward(self.weight, hc), rc)
        else:
            forward, backward = RKD_TERMS[self.kind]
            value, c = forward(fs, ft)
            g = backward(self.weight, c)
        return self.weight * float(value), g.reshape(feat.shape)


class Step(NamedTuple):
    """What one optimizer step of ``train`` applied, given to its ``on_step`` hook after the
    backward pass and before the update (the model's and the regressors' gradients are filled)."""
    run: str                # which training run: its progress label ("teacher", "student (KD)", ...)
    epoch: int
    rows: np.ndarray        # the batch: indices into train's x
    inputs: np.ndarray      # x[rows]
    labels: np.ndarray      # y[rows], -100 on transfer rows
    teacher_logits: object  # the teacher's logits on those rows, None without a teacher
    logits: np.ndarray      # the model's output (training mode)
    features: dict          # tap name -> that layer's output
    loss: float             # the batch objective: KD (or CE) plus the weighted feature terms
    dlogits: np.ndarray     # d loss / d logits: what model.backward received
    tap_grads: dict         # tap name -> d loss / d that layer's output, added there in backward
    model: object
    terms: tuple            # the FeatureTerms (teacher features, weights, regressors)


def train(model, x, y, cfg: TrainConfig, *, teacher_logits=None, T=1.0, alpha=0.0, val=None,
          desc="train", progress=True, backend="numpy", feature_terms=(), on_step=None, kind="kl",
          beta=None, dkd_weights=None, transfer=None) -> History:
    """Minibatch AdamW with a cosine schedule; labels -100 mark unlabeled (transfer) rows.
    Each batch's objective is ``distill_loss_and_grad`` (KD with ``teacher_logits``, else
    cross-entropy) plus the ``feature_terms`` (hint / RKD on tapped student features; their
    regressors are trained with the same optimizer settings). ``on_step(Step)`` is called once a
    step, before the update. ``transfer`` (``TransferChunks``): unlabeled rows read chunk by chunk
    (a soft-target store), in the chunked batch order of ``_streamed_batches``; ``Step.rows`` then
    counts the transfer rows after x's."""
    if transfer is not None and (teacher_logits is None or feature_terms):
        raise ValueError("train: transfer chunks need teacher_logits for x, and take no feature terms")
    opt = nn.AdamW(model, cfg.lr, weight_decay=cfg.weight_decay)
    regressors = [nn.Sequential([t.regressor]) for t in feature_terms if t.regressor is not None]
    reg_opts = [nn.AdamW(r, cfg.lr, weight_decay=cfg.weight_decay) for r in regressors]
    taps = tuple(sorted({t.student_tap for t in feature_terms}))
    schedule = nn.cosine_schedule(cfg.lr, cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    hist = History()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    with np.errstate(over="ignore", invalid="ignore"):   # a diverging run stops with TrainingDiverged
        for epoch in bar:
            opt.lr = schedule(epoch)
            for o in reg_opts:
                o.lr = opt.lr
            total, count = 0.0, 0
            batches = (_in_memory_batches(x, y, teacher_logits, cfg.batch_size, rng) if transfer is None else
                       _streamed_batches(x, y, teacher_logits, transfer, cfg.batch_size, rng))
            for idx, xb, yb, t in batches:
                if len(idx) < 2:  # BatchNorm and relational terms need two rows
                    continue
                model.zero_grad()
                for r in regressors:
                    r.zero_grad()
                logits, cache = model.forward(xb, train=True, taps=taps)
                _check_diverged(desc, epoch, cfg, logits)
                loss, dlogits = distill_loss_and_grad(logits, t, yb, T=T, alpha=alpha, backend=backend, kind=kind,
                                                      beta=beta, dkd_weights=dkd_weights)
                loss = float(loss)
                tap_grads = {}
                for term in feature_terms:
                    value, g = term.loss_and_tap_grad(cache.features[term.student_tap], idx)
                    loss += value
                    tap_grads[term.student_tap] = tap_grads.get(term.student_tap, 0) + g
                _check_diverged(desc, epoch, cfg, loss=loss)
                model.backward(dlogits, cache, tap_grads=tap_grads)
                if on_step is not None:
                    on_step(Step(desc, epoch, idx, xb, yb, t, logits, cache.features, loss, dlogits,
                                 tap_grads, model, tuple(feature_terms)))
                opt.step()
                for o in reg_opts:
                    o.step()
                total, count = total + loss * len(idx), count + len(idx)
            hist.train_loss.append(total / max(count, 1))
            if val is not None:
                hist.val_accuracy.append(accuracy(model, *val))
                bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val_acc=f"{hist.val_accuracy[-1]:.3f}")
    return hist


def _in_memory_batches(x, y, teacher_logits, batch_size, rng):
    """(rows, inputs, labels, teacher logits or None) of each batch of a seeded shuffle of all rows."""
    for idx in minibatches(len(x), batch_size, rng):
        yield idx, x[idx], y[idx], None if teacher_logits is None else teacher_logits[idx]


class TransferChunks:
    """Unlabeled transfer rows and their teacher logits, readable one chunk of rows at a time:
    ``chunk(c)`` is (inputs, logits) of rows ``c * chunk_rows`` up to the next chunk (the last
    may be shorter). This one holds them in memory; ``minikd.scale.SoftTargetStore`` reads them
    from a Zarr store, and training gives the same bits from either."""

    def __init__(self, x, logits, chunk_rows: int):
        if len(x) != len(logits) or not len(x):
            raise ValueError(f"transfer chunks: expected as many logit rows as input rows (>= 1), got {len(x)} "
                             f"and {len(logits)}")
        self.x, self.logits, self.rows = x, logits, len(x)
        self.chunk_rows = checks.integer("chunk_rows", chunk_rows, 1)
        self.num_chunks = -(-self.rows // self.chunk_rows)

    def chunk(self, c: int):
        start = c * self.chunk_rows
        return self.x[start:start + self.chunk_rows], self.logits[start:start + self.chunk_rows]


def _streamed_batches(x, y, teacher_logits, transfer, batch_size, rng):
    """The batch order of training from a chunked transfer set, memory O(chunk): the chunks in a
    seeded order, each read once an epoch and joined by an equal share of the (in-memory) labeled
    rows, so that a batch mixes labeled and transfer rows as a shuffle of all rows would; each
    joined chunk is shuffled and cut into batches. Rows: x's, then n + the transfer row."""
    n = len(x)
    order = rng.permutation(transfer.num_chunks)
    shares = np.array_split(rng.permutation(n), transfer.num_chunks)
    for share, c in zip(shares, order):
        xc, tc = transfer.chunk(int(c))
        first = int(c) * transfer.chunk_rows
        rows = np.concatenate([share, n + first + np.arange(len(xc))])
        xs = np.concatenate([x[share], np.asarray(xc, dtype=x.dtype)])
        ys = np.concatenate([y[share], np.full(len(xc), -100, dtype=y.dtype)])
        if isinstance(tc, TopK):   # a top-k store: the labeled rows' teacher as the same top-k
            k = tc.indices.shape[-1]
            idx, values = topk_from_dense(teacher_logits[share], k, tc.T_gen)
            ti = np.concatenate([idx, tc.indices])
            tv = np.concatenate([values, np.asarray(tc.values, dtype=values.dtype)])
        else:
            ts = np.concatenate([teacher_logits[share], np.asarray(tc, dtype=teacher_logits.dtype)])
        perm = rng.permutation(len(rows))
        for i in range(0, len(rows), batch_size):
            b = perm[i:i + batch_size]
            t = tc._replace(indices=ti[b], values=tv[b]) if isinstance(tc, TopK) else ts[b]
            yield rows[b], xs[b], ys[b], t


def train_teacher(data: Dataset, cfg: TrainConfig, width: int = 32, progress=True, cache_dir=None, on_step=None):
    """Step 1. Returns (model, history); with ``cache_dir`` a teacher trained before with the same
    dataset, width and config is loaded instead of retrained (no steps run then)."""
    key = fingerprint(data.x_train, data.y_train) + "-" + fingerprint(
        np.frombuffer(json.dumps([asdict(cfg), width]).encode(), np.uint8))
    path = None if cache_dir is None else Path(cache_dir) / f"teacher-{key}"
    if path is not None and (path.with_suffix(".json").exists() or path.with_suffix(".npz").exists()):
        try:
            model = nn.load(path)
            if model.predict(data.x_val[:2]).shape != (min(2, len(data.x_val)), data.num_classes):
                raise FileError(f"{path}: not a teacher for this dataset")
            return model, History(**model.extra.get("history", {}))
        except (FileError, FileNotFoundError, TypeError, ValueError) as exc:
            _discard_cache_entry([path.with_suffix(".json"), path.with_suffix(".npz")], exc)
    model = teacher_cnn(data.x_train.shape[1], data.num_classes, width=width, seed=cfg.seed)
    hist = train(model, data.x_train, data.y_train, cfg, val=(data.x_val, data.y_val),
                 desc="teacher", progress=progress, on_step=on_step)
    if path is not None:
        nn.save(model, path, extra={"history": asdict(hist)})
    return model, hist


def _discard_cache_entry(paths, exc):
    """A cache entry that cannot be used (truncated by a full disk, damaged, or from another
    version): say so, remove it, and let the caller rebuild it."""
    log.warning("cache entry %s could not be used (%s); discarded, rebuilding it",
                ", ".join(str(p) for p in paths if p.exists()) or paths[0], exc)
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _cached(cache_dir, prefix, key_arrays, compute, expect_rows):
    """``compute()`` (a float32 array of ``expect_rows`` rows), cached as
    ``<cache_dir>/<prefix>-<fingerprint of key_arrays>.npy`` (written atomically); an entry that
    fails to load or is not such an array is reported, discarded and rebuilt. Without a cache_dir,
    just ``compute()``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{prefix}-{fingerprint(*key_arrays)}.npy"
    if path.exists():
        try:
            arr = read_npy(path, "a cached array")
            if arr.dtype != np.float32 or arr.ndim < 2 or len(arr) != expect_rows:
                raise FileError(f"{path}: expected float32 with {expect_rows} rows, got {arr.dtype} {arr.shape}")
            check_finite_rows(arr, str(path))
            return arr
        except ValueError as exc:
            _discard_cache_entry([path], exc)
    arr = compute()
    write_npy(path, arr)
    return arr


def _weight_arrays(model):
    weights = nn.state_dict(model)
    return [weights[k] for k in sorted(weights)]


def soft_targets(teacher, x, cache_dir=None):
    """Step 2. Teacher logits on x (float32), cached under (x content, teacher weights)."""
    return _cached(cache_dir, "soft-targets", [x, *_weight_arrays(teacher)],
                   lambda: teacher.predict(x).astype(np.float32), len(x))


def teacher_features(teacher, x, tap: str, cache_dir=None):
    """The teacher's output at layer ``tap`` on x (eval mode), cached like the soft targets."""
    if tap not in teacher.names:
        raise ValueError(f"teacher tap {tap!r}: no such layer; the teacher's layers are {teacher.names}")

    def compute():
        outs = [teacher.forward(x[i:i + 1024], train=False, taps=(tap,))[1].features[tap]
                for i in range(0, len(x), 1024)]
        return np.concatenate(outs).astype(np.float32)
    key = [x, np.frombuffer(tap.encode(), np.uint8), *_weight_arrays(teacher)]
    return _cached(cache_dir, "teacher-features", key, compute, len(x))


def make_feature_terms(specs, teacher, student, x, cache_dir=None, seed=0):
    """FeatureTerms from (kind, teacher_tap, student_tap, weight) specs; checks the tap names and
    builds each hint regressor from the tapped shapes."""
    terms = []
    for kind, t_tap, s_tap, weight in specs:
        if s_tap not in student.names:
            raise ValueError(f"student tap {s_tap!r}: no such layer; the student's layers are {student.names}")
        feats = teacher_features(teacher, x, t_tap, cache_dir)
        regressor = None
        if kind == "hint":
            probe = student.forward(x[:2], train=False, taps=(s_tap,))[1].features[s_tap]
            regressor = nn.Linear(int(np.prod(probe.shape[1:])), int(np.prod(feats.shape[1:])), seed=seed)
        terms.append(FeatureTerm(kind, s_tap, feats, float(weight), regressor))
    return terms


def train_student(data: Dataset, cfg: TrainConfig, *, teacher_logits=None, teacher_logits_transfer=None,
                  T=4.0, alpha=0.9, hidden=50, use_transfer=False, progress=True, desc="student",
                  backend="numpy", feature_specs=(), teacher=None, cache_dir=None, on_step=None, kind="kl", beta=None,
                  dkd_weights=None, transfer=None):
    """Step 3. The student MLP, from scratch (teacher_logits None) or distilled; with
    ``use_transfer`` the transfer set joins the training rows with label -100 (soft term only).
    ``feature_specs``: (kind, teacher_tap, student_tap, weight) hint / RKD terms (needs ``teacher``).
    ``backend`` and ``on_step``: as ``train``'s. ``transfer``: the transfer set as ``TransferChunks``
    (a soft-target store, streamed), instead of ``data``'s."""
    model = student_mlp(data.x_train.shape[1], data.num_classes, hidden=hidden, seed=cfg.seed)
    x, y, t = data.x_train, data.y_train, teacher_logits
    if transfer is not None:
        hist = train(model, x, y, cfg, teacher_logits=t, T=T, alpha=alpha, val=(data.x_val, data.y_val), desc=desc,
                     progress=progress, backend=backend, on_step=on_step, kind=kind, beta=beta,
                     dkd_weights=dkd_weights, transfer=transfer)
        return model, hist
    if use_transfer and len(data.x_transfer):
        x = np.concatenate([x, data.x_transfer])
        y = np.concatenate([y, np.full(len(data.x_transfer), -100, dtype=np.int64)])
        t = np.concatenate([t, teacher_logits_transfer])
    terms = make_feature_terms(feature_specs, teacher, model, x, cache_dir, cfg.seed) if feature_specs else ()
    hist = train(model, x, y, cfg, teacher_logits=t, T=T, alpha=alpha, val=(data.x_val, data.y_val),
                 desc=desc, progress=progress, backend=backend, feature_terms=terms, on_step=on_step, kind=kind,
                 beta=beta, dkd_weights=dkd_weights)
    return model, hist


def train_mutual(data: Dataset, cfg: TrainConfig, models: int, *, T=1.0, hidden=50, progress=True):
    """Deep mutual learning: ``models`` student MLPs (seeds cfg.seed + k) trained together, each
    on CE + the mean KL to its peers (mode "detached", as the DML authors train). Returns the
    models and their histories."""
    cohort = [student_mlp(data.x_train.shape[1], data.num_classes, hidden=hidden, seed=cfg.seed + k)
              for k in range(models)]
    opts = [nn.AdamW(m, cfg.lr, weight_decay=cfg.weight_decay) for m in cohort]
    schedule = nn.cosine_schedule(cfg.lr, cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    hists = [History() for _ in cohort]
    x, y = data.x_train, data.y_train
    with np.errstate(over="ignore", invalid="ignore"):   # a diverging run stops with TrainingDiverged
        for epoch in tqdm(range(cfg.epochs), desc=f"mutual ({models} models)", disable=not progress, leave=False):
            for o in opts:
                o.lr = schedule(epoch)
            totals = np.zeros(models)
            for idx in minibatches(len(x), cfg.batch_size, rng):
                outs = []
                for k, m in enumerate(cohort):
                    m.zero_grad()
                    outs.append(m.forward(x[idx], train=True))
                    _check_diverged(f"mutual model {k}", epoch, cfg, outs[-1][0])
                losses, cache = mutual_forward([o[0] for o in outs], y[idx], T=T, mode="detached")
                for m, o, g, opt in zip(cohort, outs, mutual_backward(np.ones(models), cache), opts):
                    m.backward(g, o[1])
                    opt.step()
                totals += np.asarray(losses, dtype=float) * len(idx)
            for k, m in enumerate(cohort):
                hists[k].train_loss.append(totals[k] / len(x))
                hists[k].val_accuracy.append(accuracy(m, data.x_val, data.y_val))
    return cohort, hists


def export(model, out_dir, name: str, data: Dataset, extra: dict | None = None):
    """Step 5. ``<out_dir>/<name>.npz`` + ``.json`` with the standardization and dataset spec."""
    info = {"mean": data.mean.tolist(), "std": data.std.tolist(), "dataset": data.spec,
            "num_classes": data.num_classes, **(extra or {})}
    nn.save(model, Path(out_dir) / name, extra=info)


def load_student(out_dir, name: str = "student"):
    """Load an exported model; returns (model, info) where info holds mean/std, the class count and
    the dataset spec, each checked against the model."""
    stem = Path(out_dir) / name
    model = nn.load(stem)
    info, where = model.extra, stem.with_suffix(".json")
    require_keys(info, ("mean", "std", "dataset", "num_classes"), where,
                 "an exported model's 'extra' (written by minikd distill, sweep, teacher, student or mutual)")
    try:
        mean, std = np.asarray(info["mean"], np.float64), np.asarray(info["std"], np.float64)
    except (TypeError, ValueError):
        raise FileError(f"{where}: 'mean' and 'std' must be lists of numbers") from None
    if mean.ndim != 1 or mean.shape != std.shape or not np.isfinite(mean).all() or not (std > 0).all() \
            or not np.isfinite(std).all():
        raise FileError(f"{where}: 'mean' and 'std' must be equally long lists of finite numbers, std > 0")
    try:
        probe = model.predict(np.zeros((1, len(mean)), np.float32))
    except ValueError:
        raise FileError(f"{where}: the model does not take {len(mean)} features, the length of its 'mean'") from None
    if probe.shape[-1] != info["num_classes"]:
        raise FileError(f"{where}: the model has {probe.shape[-1]} outputs but 'num_classes' is {info['num_classes']}")
    return model, info


def sweep_student(T: float, alpha: float, *, data: Dataset, cfg: TrainConfig, **kwargs):
    """One student of a sweep (a Dask task on a cluster): (validation accuracy, model, history)."""
    model, hist = train_student(data, cfg, T=T, alpha=alpha, progress=False, desc=f"sweep T={T:g}, alpha={alpha:g}",
                                **kwargs)
    return accuracy(model, data.x_val, data.y_val), model, hist


def sweep(data: Dataset, cfg: TrainConfig, temperatures, alphas, *, teacher_logits,
          teacher_logits_transfer=None, hidden=50, use_transfer=False, progress=True, backend="numpy",
          on_step=None, kind="kl", beta=None, dkd_weights=None, client=None, seeds=None):
    """Step 4. One student per (T, alpha) and seed (``seeds``: the students' seeds; None: cfg.seed
    alone); returns the grid of validation accuracies (the mean over the seeds) and (val accuracy,
    T, alpha, model, history) of the best pair by that mean (ties: first in grid order), with the
    model and history of its best seed (ties: the first seed). ``backend``, ``on_step``, ``kind``
    and ``beta``: as ``train``'s (each run is labeled "sweep T=..., alpha=..."). ``client``: a
    ``distributed.Client`` that runs each student as a task (``minikd.scale``); the same grid and
    best, bit for bit, as without one. Returns (grid, best, the accuracies per seed: T x alpha x seed)."""
    seeds = [cfg.seed] if seeds is None else [int(s) for s in seeds]
    pairs = [(i, j, k) for i in range(len(temperatures)) for j in range(len(alphas)) for k in range(len(seeds))]
    runs = [(float(temperatures[i]), float(alphas[j])) for i, j, _ in pairs]
    cfgs = [replace(cfg, seed=seeds[k]) for *_, k in pairs]
    options = dict(hidden=hidden, use_transfer=use_transfer, backend=backend, on_step=on_step, kind=kind, beta=beta,
                   dkd_weights=dkd_weights)
    shared = dict(teacher_logits=teacher_logits, teacher_logits_transfer=teacher_logits_transfer)
    if client is None:
        results = [sweep_student(T, a, data=data, cfg=c, **options, **shared)
                   for (T, a), c in tqdm(list(zip(runs, cfgs)), desc="sweep", disable=not progress, unit="student")]
    else:
        from .scale import run_tasks  # noqa: PLC0415
        results = run_tasks(client, sweep_student, [(run, {"cfg": c, **options}) for run, c in zip(runs, cfgs)],
                            {"data": data, **shared}, "sweep", progress)
    per_seed = np.zeros((len(temperatures), len(alphas), len(seeds)))
    found = {}
    for (i, j, k), (acc, model, hist) in zip(pairs, results):   # grid order, whatever finished first
        per_seed[i, j, k] = acc
        if (i, j) not in found or acc > found[i, j][0]:
            found[i, j] = (acc, model, hist)   # the pair's best seed (ties: the first)
    grid = per_seed.mean(axis=2)
    best = None
    for i, j, k in pairs:
        if k == 0 and (best is None or grid[i, j] > best[0]):
            best = (grid[i, j], float(temperatures[i]), float(alphas[j]), *found[i, j][1:])
    return grid, best, per_seed
