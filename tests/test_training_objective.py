"""What training applies, step by step, against the losses written out here in plain NumPy.

Accuracy asserts cannot see a wrong weight, sign or normalizer in the training loss (AdamW is
nearly invariant to the gradient's scale, and a small student learns with a wrong objective too).
So these tests read each optimizer step of ``minikd.distill.train`` through its ``on_step`` hook
(a ``Step``: the batch, the logits, the loss, the gradient given to backward, the tap gradients,
the model with its gradients filled, before the update) and recompute, in float64:

* the logits' objective: Hinton's KD loss (softmax, KL and CE written out below, never minikd's
  losses) with rows labeled -100 getting the distillation term alone and one normalizer, the
  number of rows; cross-entropy without a teacher;
* the feature terms: FitNets hints written out (regressor included), RKD through minikd's RKD
  forward/backward (they have their own gradient and PyTorch tests); here the weights, their sum
  and which gradient reaches which tap are checked;
* the student MLP's forward and its parameter gradients, backpropagated by hand from those
  gradients: this proves the numbers the hook reports are the ones the update used.

Float32 training against float64 formulas: 1e-5 relative to the largest entry of each array
(float32 rounding, 1e-7, summed over a few dozen terms); every mutation the tests guard against
changes some entry by 1% or more.
"""
import json

import numpy as np
import pytest

from minikd import data as D
from minikd.cli import main
from minikd.distill import TrainConfig, make_feature_terms, train, train_student
from minikd.experiments import DistillConfig, run_distill
from minikd.losses import rkd_angle_backward, rkd_angle_forward, rkd_distance_backward, rkd_distance_forward
from minikd.nn.models import student_mlp, teacher_cnn

RTOL = 1e-5
T, ALPHA = 3.0, 0.8     # T != T**2 and alpha != 1 - alpha: a swapped or dropped factor shows


def close(actual, expected, rtol=RTOL):
    """|actual - expected| <= rtol * max |expected|, entry by entry, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x {scale:.3g}"


# ---------------------------------------------------------------- the losses, written out

def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kd_by_hand(s, t, y, T, alpha):
    """Hinton et al.'s loss on a batch: labeled rows alpha T^2 KL(q || p) + (1 - alpha) CE, rows
    labeled -100 alpha T^2 KL alone; the sum over all B rows / B. Returns (loss, d loss / d s)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    B = len(s)
    log_p, log_q, log_p1 = log_softmax(s / T), log_softmax(t / T), log_softmax(s)
    p, q, p1 = np.exp(log_p), np.exp(log_q), np.exp(log_p1)
    labeled = y != -100
    onehot = np.zeros_like(s)
    onehot[np.flatnonzero(labeled), y[labeled]] = 1.0
    kl = np.sum(q * (log_q - log_p), axis=1)
    ce = -np.sum(onehot * log_p1, axis=1)          # 0 on unlabeled rows
    loss = np.sum(alpha * T * T * kl + (1 - alpha) * ce) / B
    # d KL / d s = (p - q) / T;  d CE / d s = p1 - onehot
    grad = (alpha * T * (p - q) + (1 - alpha) * labeled[:, None] * (p1 - onehot)) / B
    return loss, grad


def ce_by_hand(s, y):
    """Cross-entropy averaged over the labeled rows, and its gradient."""
    s = np.asarray(s, np.float64)
    labeled = y != -100
    onehot = np.zeros_like(s)
    onehot[np.flatnonzero(labeled), y[labeled]] = 1.0
    log_p1 = log_softmax(s)
    n = labeled.sum()
    return -np.sum(onehot * log_p1) / n, labeled[:, None] * (np.exp(log_p1) - onehot) / n


def feature_terms_by_hand(step):
    """(sum of the weighted feature terms, tap name -> gradient, [(regressor, d weight, d bias)])."""
    B = len(step.rows)
    total, taps, regressors = 0.0, {}, []
    for term in step.terms:
        feat = step.features[term.student_tap]
        fs = np.asarray(feat, np.float64).reshape(B, -1)
        ft = np.asarray(term.teacher[step.rows], np.float64).reshape(B, -1)
        if term.kind == "hint":   # FitNets: sum over features of (W fs + b - ft)^2, mean over rows
            W, b = (np.asarray(term.regressor.params[k], np.float64) for k in ("weight", "bias"))
            r = fs @ W.T + b
            value = np.sum((r - ft) ** 2) / B
            dr = term.weight * 2.0 * (r - ft) / B
            g = dr @ W
            regressors.append((term.regressor, dr.T @ fs, dr.sum(axis=0)))
        else:
            forward, backward = {"rkd_distance": (rkd_distance_forward, rkd_distance_backward),
                                 "rkd_angle": (rkd_angle_forward, rkd_angle_backward)}[term.kind]
            value, cache = forward(fs, ft)
            g = term.weight * backward(1.0, cache)
        total += term.weight * value
        taps[term.student_tap] = taps.get(term.student_tap, 0.0) + g.reshape(feat.shape)
    return total, taps, regressors


def mlp_by_hand(model, x, dlogits, tap_grads):
    """The student MLP (fc1 -> hidden = ReLU -> fc2) forward, and its parameter gradients
    backpropagated by hand from d loss / d logits plus the taps' gradients."""
    p = {k: np.asarray(v, np.float64) for k, v in model.state("params").items()}
    x = np.asarray(x, np.float64)
    h1 = x @ p["fc1.weight"].T + p["fc1.bias"]
    a = np.maximum(h1, 0.0)
    logits = a @ p["fc2.weight"].T + p["fc2.bias"]
    dlogits = np.asarray(dlogits, np.float64)
    da = dlogits @ p["fc2.weight"] + tap_grads.get("hidden", 0.0)
    dh1 = da * (h1 > 0) + tap_grads.get("fc1", 0.0)
    grads = {"fc1.weight": dh1.T @ x, "fc1.bias": dh1.sum(axis=0), "fc2.weight": dlogits.T @ a,
             "fc2.bias": dlogits.sum(axis=0)}
    return logits, {"fc1": h1, "hidden": a}, grads


def check_step(step, *, T=T, alpha=ALPHA, student=True):
    """The step's loss, logits gradient, tap gradients (and, for the student MLP, its logits,
    features and parameter gradients) against the formulas above."""
    if step.teacher_logits is None:
        kd_loss, kd_grad = ce_by_hand(step.logits, step.labels)
    else:
        kd_loss, kd_grad = kd_by_hand(step.logits, step.teacher_logits, step.labels, T, alpha)
    feat_loss, taps, regressors = feature_terms_by_hand(step)
    close(step.loss, kd_loss + feat_loss)
    close(step.dlogits, kd_grad)
    assert sorted(step.tap_grads) == sorted(taps)
    for name, g in taps.items():
        close(step.tap_grads[name], g)
    for regressor, dw, db in regressors:
        close(regressor.grads["weight"], dw)
        close(regressor.grads["bias"], db)
    if student:
        logits, features, grads = mlp_by_hand(step.model, step.inputs, kd_grad, taps)
        close(step.logits, logits)
        for name, f in step.features.items():
            close(f, features[name])
        applied = {k: g for k, _, g in step.model.parameters()}
        for k, g in grads.items():
            close(applied[k], g)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def numba_kernel_calls(monkeypatch):
    """The shapes of every call of the fused Numba kernel (not the softmax_kl wrapper: the
    compiled kernel itself, so a backend silently falling back to NumPy shows as no calls)."""
    from minikd.kernels import numba_cpu
    calls, real = [], numba_cpu.get_kernel

    def get_kernel(dtype, parallel, short=False):
        kernel = real(dtype, parallel, short)

        def counted(s, *args):
            calls.append(s.shape)
            return kernel(s, *args)
        return counted
    monkeypatch.setattr(numba_cpu, "get_kernel", get_kernel)
    return calls


def toy(n=48, d=12, c=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    teacher_logits = (3 * rng.standard_normal((n, c))).astype(np.float32)
    return x, y, teacher_logits


CFG = TrainConfig(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.05, seed=0)


def checked(check=check_step):
    """(the steps, an on_step hook): each step is checked when it happens (its model and
    regressors change at the update that follows), then kept for checks of its batch."""
    steps = []

    def on_step(step):
        check(step)
        steps.append(step)
    return steps, on_step


def run_train(x, y, teacher_logits, backend="numpy", feature_terms=(), model=None, check=check_step):
    steps, on_step = checked(check)
    model = student_mlp(x.shape[1], 5, hidden=8, seed=0) if model is None else model
    train(model, x, y, CFG, teacher_logits=teacher_logits, T=T, alpha=ALPHA, backend=backend,
          feature_terms=feature_terms, progress=False, on_step=on_step)
    assert len(steps) == CFG.epochs * 3      # 48 rows in batches of 16
    for step in steps:                       # the batch is the training rows it names
        np.testing.assert_array_equal(step.inputs, x[step.rows])
        np.testing.assert_array_equal(step.labels, y[step.rows])
        if teacher_logits is not None:
            np.testing.assert_array_equal(step.teacher_logits, teacher_logits[step.rows])
    return steps


# ---------------------------------------------------------------- the logits' objective

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("rows", ["labeled", "unlabeled", "mixed"])
def test_kd_step_equals_the_loss_written_out(rows, backend, numba_kernel_calls):
    """Labeled rows: both terms; transfer rows (-100): the distillation term alone; mixed
    batches: one normalizer, the batch's row count. backend="numba" runs the fused kernel at
    every step (and equals the formulas to the same tolerance)."""
    x, y, t = toy()
    if rows == "unlabeled":
        y = np.full_like(y, -100)
    elif rows == "mixed":
        y = np.where(np.arange(len(y)) % 3 == 0, y, -100)   # a third labeled
    steps = run_train(x, y, t, backend)
    if rows == "mixed":
        assert all(0 < (s.labels != -100).sum() < len(s.rows) for s in steps)
    assert len(numba_kernel_calls) == (len(steps) if backend == "numba" else 0)


def test_without_a_teacher_training_minimizes_cross_entropy():
    x, y, _ = toy()
    for step in run_train(x, y, None):
        assert step.teacher_logits is None


def test_train_loss_history_is_the_mean_of_the_steps_losses():
    x, y, t = toy()
    steps = []
    hist = train(student_mlp(12, 5, hidden=8, seed=0), x, y, CFG, teacher_logits=t, T=T, alpha=ALPHA,
                 progress=False, on_step=steps.append)
    for epoch, value in enumerate(hist.train_loss):
        mine = [(s.loss, len(s.rows)) for s in steps if s.epoch == epoch]
        close(value, sum(v * n for v, n in mine) / sum(n for _, n in mine))


# ---------------------------------------------------------------- feature and relational terms

SPECS = [("hint", "embed", "hidden", 0.5), ("hint", "relu4", "fc1", 2.0),
         ("rkd_distance", "embed", "hidden", 25.0), ("rkd_angle", "embed", "hidden", 50.0)]


def test_feature_terms_weights_sum_and_taps():
    """Two hints on two taps, RKD distance and angle on the hint's tap: the loss is KD plus each
    term times its weight, each tap receives the gradients of its own terms (summed), each hint
    regressor its own gradient; the teacher features are the teacher's at those rows."""
    x, y, t = toy()
    teacher = teacher_cnn(x.shape[1], 5, width=4, seed=1)
    student = student_mlp(x.shape[1], 5, hidden=8, seed=0)
    terms = make_feature_terms(SPECS, teacher, student, x, seed=0)
    assert [(term.kind, term.student_tap, term.weight) for term in terms] == [(k, s, w) for k, _, s, w in SPECS]
    before = [term.regressor.params["weight"].copy() for term in terms[:2]]
    steps = run_train(x, y, t, feature_terms=terms, model=student)
    for term, w in zip(terms, before):   # the regressors are trained too
        assert np.abs(term.regressor.params["weight"] - w).max() > 1e-3
    for step in steps:
        assert sorted(step.tap_grads) == ["fc1", "hidden"]
        for term, (_, t_tap, _, _) in zip(step.terms, SPECS):
            own = teacher.forward(step.inputs, train=False, taps=(t_tap,))[1].features[t_tap]
            close(term.teacher[step.rows], own)


# ---------------------------------------------------------------- the experiment and the CLI

SMALL = ["--samples", "600", "--teacher-epochs", "2", "--epochs", "2", "--transfer-epochs", "1", "--quiet",
         "--teacher-width", "8", "--student-hidden", "16"]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_every_step_of_minikd_distill(tmp_path, backend, numba_kernel_calls):
    """run_distill with every kind of student: each step of each run (teacher included) applies
    the objective its config asks for: the teacher and the scratch student cross-entropy, the
    others KD at the config's T and alpha on the teacher's own logits for those rows (transfer
    rows labeled -100), plus the requested feature terms at their weights; the fused kernel runs
    at every KD step with --backend numba and never with numpy."""
    config = DistillConfig(samples=600, transfer_samples=200, teacher_epochs=2, teacher_width=8, epochs=2,
                           transfer_epochs=1, student_hidden=16, T=2.5, alpha=0.7, backend=backend,
                           hint=["embed:hidden:0.5", "relu4:fc1"], rkd_distance=25.0, rkd_angle=50.0,
                           out=str(tmp_path / "out"), cache_dir=None, progress=False)
    steps, on_step = checked(lambda step: check_step(step, T=2.5, alpha=0.7, student=step.run != "teacher"))
    report = run_distill(config, on_step=on_step)
    data = D.mnist1d(600, seed=0, transfer_samples=200)
    x_all = np.concatenate([data.x_train, data.x_transfer])
    n_train = len(data.x_train)
    runs = {}
    for step in steps:
        runs.setdefault(step.run, []).append(step)
    terms = {"student (hint embed->hidden, relu4->fc1)": [("hint", "hidden", 0.5), ("hint", "fc1", 1.0)],
             "student (rkd distance x25)": [("rkd_distance", "hidden", 25.0)],
             "student (rkd angle x50)": [("rkd_angle", "hidden", 50.0)]}
    assert sorted(runs) == sorted(["teacher", "student (scratch)", "student (KD)", "student (KD + transfer)", *terms])
    kd_steps = 0
    for run, run_steps in runs.items():
        for step in run_steps:
            np.testing.assert_array_equal(step.inputs, x_all[step.rows])
            transfer = step.rows >= n_train
            assert transfer.any() == (run == "student (KD + transfer)")
            np.testing.assert_array_equal(step.labels[~transfer], data.y_train[step.rows[~transfer]])
            assert (step.labels[transfer] == -100).all()
            assert [(t.kind, t.student_tap, t.weight) for t in step.terms] == terms.get(run, [])
            if run in ("teacher", "student (scratch)"):
                assert step.teacher_logits is None
            else:
                kd_steps += 1
                close(step.teacher_logits, report.teacher.predict(step.inputs), rtol=1e-4)
    assert len(numba_kernel_calls) == (kd_steps if backend == "numba" else 0)


def test_backend_numba_gives_the_numpy_report(tmp_path, numba_kernel_calls):
    """minikd distill --backend numba runs the fused kernel and reports what the reference does.
    Tolerances: the exported student's weights (trained on labeled and transfer rows) within 1e-4
    of the largest weight, accuracies within 2 of the 120 test / 48 validation samples. The kernel
    computes in float32 with its own exp and float64 sums, so its loss and gradient differ from
    the reference's by about 1e-7 relative (the step tests above hold both to 1e-5); AdamW carries
    that through the steps (measured: 2e-6 after the exported student's 6 steps), and a sample on
    a decision boundary may change class. (Over the default minikd distill, thousands of steps,
    the two drift apart by 0.4 to 0.6 points of test accuracy at seed 0, less than the spread
    over seeds.)"""
    reports = {}
    for backend in ("numpy", "numba"):
        out = tmp_path / backend
        assert main(["distill", *SMALL, "--transfer-samples", "300", "--backend", backend, "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
        reports[backend] = json.loads((out / "report.json").read_text())
        assert bool(numba_kernel_calls) == (backend == "numba")
    numpy_rep, numba_rep = reports["numpy"], reports["numba"]
    for key in ("student_scratch", "student_kd", "student_kd_transfer"):
        assert abs(numba_rep[key]["test_accuracy"] - numpy_rep[key]["test_accuracy"]) <= 2 / 120
        assert abs(numba_rep[key]["val_accuracy"] - numpy_rep[key]["val_accuracy"]) <= 2 / 48
    with np.load(tmp_path / "numpy" / "student.npz") as a, np.load(tmp_path / "numba" / "student.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            close(b[k], a[k], rtol=1e-4)


@pytest.mark.parametrize("command", ["sweep", "student"])
def test_sweep_and_student_use_the_backend_they_are_given(tmp_path, command, numba_kernel_calls):
    cache = ["--quiet", "--cache-dir", str(tmp_path / "c")]
    if command == "sweep":
        args = ["sweep", *SMALL, "--transfer-samples", "0", "--T", "2", "--alpha", "0.9", "--out", str(tmp_path / "s")]
    else:
        assert main(["teacher", "--samples", "600", "--teacher-epochs", "2", "--teacher-width", "8", *cache,
                     "--out", str(tmp_path / "t")]) == 0
        args = ["student", str(tmp_path / "t"), "--epochs", "2", "--student-hidden", "8", "--out", str(tmp_path / "s")]
    assert main([*args, *cache, "--backend", "numba"]) == 0
    assert len(numba_kernel_calls) == 2 * 4      # 2 epochs of 432 rows in batches of 128


def test_train_student_with_transfer_mixes_rows(tmp_path):
    """train_student(use_transfer=True): the transfer rows follow the labeled ones with label -100
    and their own teacher logits, shuffled into the same batches."""
    data = D.mnist1d(200, seed=0, transfer_samples=50)
    rng = np.random.default_rng(0)
    tl = rng.standard_normal((len(data.x_train), 10)).astype(np.float32)
    tt = rng.standard_normal((len(data.x_transfer), 10)).astype(np.float32)
    steps, on_step = checked()
    train_student(data, TrainConfig(epochs=1, batch_size=32, seed=0), teacher_logits=tl, teacher_logits_transfer=tt,
                  T=T, alpha=ALPHA, hidden=8, use_transfer=True, progress=False, on_step=on_step)
    n = len(data.x_train)
    mixed = 0
    for step in steps:
        transfer = step.rows >= n
        np.testing.assert_array_equal(step.teacher_logits, np.concatenate([tl, tt])[step.rows])
        assert (step.labels[transfer] == -100).all() and (step.labels[~transfer] >= 0).all()
        mixed += transfer.any() and not transfer.all()
    assert mixed >= 3
