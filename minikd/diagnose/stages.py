"""The stages of a diagnosis after the fit (``minikd.diagnose``): each probes the user's loss once more
against the fitted convention and adds what it finds (findings, the rows it explains) to the session:
rows labeled -100, (B, S, C) sequences, nearly one-hot rows (log(p + eps), clamps), -inf classes, the
gradient, micro-batches, the user's expectations with the smallest input that shows a difference, and
lower precisions. What cannot be fitted gets the model-free probes (``model_free``).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..gradcheck import relative_error
from . import eps as eps_model
from .adapters import CallFailed, Caller
from .fit import (Probe, Problem, clean, simplest, as_sequences, ignore_probes, neg_inf_probes,
                  peaked_probes, sequence_probes)
from .model import IGNORE, Convention, count

EXACT = 1e-9          # relative residual of a fit that is the convention (float64 rounding: ~1e-15)
APPROX = 1e-3         # a fit close enough to name the convention and look for what departs
GRAD_EXACT = 1e-8


def rel(a, b, floor=1e-300) -> float:
    """``gradcheck.relative_error``, and inf where shapes differ or only one side is not finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return 0.0 if np.array_equal(a, b) else math.inf
    return relative_error(a, b, floor)


def show(v):
    if isinstance(v, float):
        return f"{v:.3g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)) else f"{v:g}"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


class Session:
    """One diagnosis: the caller, the probes' values, the findings."""

    def __init__(self, caller: Caller, seed: int, sequence: bool = False):
        self.caller = caller
        self.sequence = sequence
        self.rng = np.random.default_rng(seed)
        self.findings: list[dict] = []
        self.checked = []      # (probe, the user's Output) over every probe the model explains: max_rel_err
        self.ignore_honored = None
        self.sequence_reduction = None   # on (B, S, C) logits, where it differs from the (N, C) one
        self.teacher_gradient = None   # the teacher logits receive a gradient (not detached)

    def shaped(self, probes):
        """The probes as the loss takes them: (B, S, C) sequences with ``sequence``, else (N, C)."""
        return as_sequences(probes) if self.sequence else probes

    def note(self, severity, prop, message, **extra):
        self.findings.append(dict(severity=severity, property=prop, message=message, **extra))

    def call(self, p, dtype="float64"):
        return self.caller(p.s, p.t, p.y if self.caller.has_labels else None, dtype)


def describe(c: Convention | None) -> str:
    if c is None:
        return "none"
    extra = f", beta={c.beta:.4g}" if c.beta is not None else ""
    return f"{c.divergence}{extra}, T={c.T:.4g} on {c.temp_on}"


def _variants(c: Convention):
    """Conventions differing from c only in how rows labeled -100 are treated."""
    def alt(den, labeled):
        if den in ("rows", "labeled_rows"):
            return "labeled_rows" if labeled else "rows"
        if den in ("elements", "labeled_elements"):
            return "labeled_elements" if labeled else "elements"
        return den
    for soft_on in (False, True):
        for s_lab in (True, False):
            for h_lab in (True, False):
                yield replace(c, soft_on_unlabeled=soft_on, soft_den=alt(c.soft_den, s_lab),
                              hard_den=alt(c.hard_den, h_lab))


def stage_ignore(S: Session, c: Convention) -> Convention:
    """Rows labeled -100: left out of both terms and of the counts (honored), or not."""
    outs = []
    for p in S.shaped(ignore_probes(S.rng)):
        try:
            outs.append((p, S.call(p)))
        except CallFailed as e:
            S.ignore_honored = False
            S.note("warning", "ignore_index_honored", f"the loss fails on a batch with rows labeled -100: {e}")
            return c
    if not all(np.all(np.isfinite(o.value)) for _, o in outs):
        S.ignore_honored = False
        S.note("warning", "ignore_index_honored", "the loss is NaN or inf on a batch with rows labeled -100")
        return c
    scored = []
    for v in dict.fromkeys(_variants(c)):
        err = max(rel(o.value, v.value(p.s, p.t, p.y), 1e-300) for p, o in outs)
        scored.append((err, v))
    scored.sort(key=lambda e: e[0])
    err, v = scored[0]
    if err > APPROX:
        S.ignore_honored = False
        S.note("warning", "ignore_index_honored", f"rows labeled -100 change the loss in a way no convention "
               f"explains (relative residual {err:.2g})")
        return c
    honored = not v.soft_on_unlabeled and v.soft_den not in ("rows", "elements") and \
        (v.hard_weight == 0 or v.hard_den not in ("rows", "elements"))
    if v.per_row:
        honored = not v.soft_on_unlabeled
    S.ignore_honored = honored
    if v.soft_on_unlabeled:
        S.note("warning" if v.hard_weight != 0 else "info", "ignore_index_honored",
               "rows labeled -100 still get the soft term (ignore_index applied to the hard term only)"
               if v.hard_weight != 0 else "rows labeled -100 still get the soft term (the loss takes labels but "
               "does not use them to mask)")
    elif not honored:
        S.note("warning", "ignore_index_honored", "rows labeled -100 are left out of the sums but counted in "
               "a mean's denominator")
    for p, o in outs:
        S.checked.append((p, o))
    return v


def stage_sequence(S: Session, c: Convention) -> None:
    """A loss probed as (N, C) given (B, S, C) logits: where it divides by B, the leading axis, and not by
    the B * S rows (PyTorch's kl_div 'batchmean' on unflattened sequences), a warning and
    ``sequence_reduction``. (With ``sequence`` every probe is (B, S, C) and this is not needed; a loss
    that does not take (B, S, C) logits, or gives values no convention explains there, says nothing.)"""
    outs = []
    for p in sequence_probes(S.rng, S.caller.has_labels):
        try:
            outs.append((p, S.call(p)))
        except CallFailed:
            return
    if c.per_row:
        return
    lead = {"rows": "leading_axis", "labeled_rows": "leading_axis"}
    cands = [c, replace(c, soft_den=lead.get(c.soft_den, c.soft_den)),
             replace(c, soft_den=lead.get(c.soft_den, c.soft_den), hard_den=lead.get(c.hard_den, c.hard_den))]
    scored = sorted(((max(rel(o.value, v.value(p.s, p.t, p.y)) for p, o in outs), i, v)
                     for i, v in enumerate(dict.fromkeys(cands))), key=lambda e: (e[0], e[1]))
    err, _, v = scored[0]
    if err <= APPROX and v.soft_den == "leading_axis":
        S.note("warning", "reduction", "on (B, S, C) logits the soft term is divided by B, the leading axis, "
               "not by the B * S rows (PyTorch's kl_div 'batchmean' on unflattened sequences); flatten "
               "sequences to (N, C) before calling it, or diagnose it with --sequence")
        S.sequence_reduction = "batch_axis_mean"


def stage_peaked(S: Session, c: Convention, core):
    """Nearly one-hot rows: an exact fit should stay exact there; log(p + eps) or a clamp does not."""
    probes = S.shaped(peaked_probes(S.rng, c.T, S.caller.has_labels))
    try:
        outs = [(p, S.call(p)) for p in probes]
    except CallFailed as e:
        S.note("warning", "eps_smoothing", f"the loss fails on nearly one-hot rows: {e}")
        return None
    err = max(rel(o.value, c.value(p.s, p.t, p.y)) for p, o in outs)
    if err <= 1e-7:   # (not in max_rel_err: a saturated student's gradient is tiny, and autograd's inexact)
        return None
    found = _fit_eps(c, list(core) + outs)   # (the core probes pin the hard term: ~0 on peaked rows)
    if found is not None:
        _note_smoothing(S, found, err)
        return found
    S.note("warning", "eps_smoothing", f"on nearly one-hot rows the loss departs from the exact value by "
           f"{err:.2g} relative (not explained by log(p + eps) or a clamp)")
    return None


def _note_smoothing(S: Session, found, err):
    e, where, _, mode = found
    what = {"eps": f"log(p + {e:.3g})", "clamp": f"log(max(p, {e:.3g})) (a clamp)",
            "clip": f"p and q clipped to [{e:.3g}, 1] (Keras' KLDivergence)"}[mode]
    S.note("warning", "eps_smoothing", f"logs are taken as {what} ({_where(where)}) instead of log-softmax: off "
           f"by up to {err:.2g} relative on nearly one-hot rows")


def _fit_eps(c: Convention, outs):
    """(eps, where, the convention with its coefficients refitted, mode) of log(p + eps) (mode "eps")
    or log(max(p, eps)) ("clamp") that reproduces the values, or None. Each candidate refits
    (a, b1, b2): the coefficients of an approximate fit carry the smoothing's error."""
    if c.divergence not in eps_model.DIVERGENCES:
        return None
    hard = _hard_columns(c, outs)
    L = np.array([o.value.sum() for _, o in outs])

    def err_of(e, where, mode):
        m = _refit_eps(c, outs, (e, where, None, mode), hard, L)
        return max(rel(o.value, _eps_value(m, p, e, where, mode)) for p, o in outs), m
    best = (math.inf, None)
    for mode in eps_model.MODES:
        for where in eps_model.PLACES:
            for e in 10.0 ** np.arange(-16, -1.9, 0.5):
                err, _ = err_of(float(e), where, mode)
                if err < best[0]:
                    best = (err, (float(e), where, mode))
    if best[1] is None:
        return None
    from scipy.optimize import minimize_scalar  # noqa: PLC0415
    e0, where, mode = best[1]
    r = minimize_scalar(lambda u: err_of(10 ** u, where, mode)[0],
                        bounds=(math.log10(e0) - 0.5, math.log10(e0) + 0.5), method="bounded",
                        options={"xatol": 1e-10})
    e = float(f"{10 ** r.x:.3g}")          # a round eps (1e-08) where it fits as well
    err, m = err_of(e, where, mode)
    if err > max(r.fun * 2, 1e-9):
        e = 10 ** r.x
        err, m = err_of(e, where, mode)
    return (e, where, m, mode) if err <= 1e-7 else None


def _hard_columns(c: Convention, outs):
    """Per probe: the summed CE and U terms under c's hard reduction (fixed across eps candidates)."""
    if not (c.has_labels and c.hard_weight):
        return None
    ce = [replace(c, a=0.0, b1=1.0, b2=0.0), replace(c, a=0.0, b1=0.5, b2=0.5)]
    A = np.array([[np.asarray(m.value(p.s, p.t, p.y)).sum() for m in ce] for p, _ in outs])
    A[:, 1] = 2 * A[:, 1] - A[:, 0]          # U = 2 (CE/2 + U/2) - CE (label smoothing 1 is no valid call)
    return A


def _refit_eps(c: Convention, outs, found, hard=None, L=None) -> Convention:
    """The coefficients (a, b1, b2) again, with the smoothed logs (linear, as in the fit)."""
    e, where, _, mode = found
    soft = replace(c, a=1.0, b1=0.0, b2=0.0)
    A = np.array([[np.asarray(_eps_value(soft, p, e, where, mode)).sum()] for p, _ in outs])
    if hard is None and c.has_labels and c.hard_weight:
        hard = _hard_columns(c, outs)
    if hard is not None:
        A = np.concatenate([A, hard], axis=1)
    L = np.array([o.value.sum() for _, o in outs]) if L is None else L
    x, _ = simplest(A, L)
    x = np.concatenate([x, np.zeros(3 - len(x))])
    return clean(replace(c, a=float(x[0]), b1=float(x[1]), b2=float(x[2])))


def _where(where):
    return "student and teacher" if where == "both" else "the student's side"


def _eps_value(c: Convention, p, e, where, mode="eps"):
    """The convention's value with smoothed logs in the soft term (minikd's hard term)."""
    D = eps_model.rows(p.s, p.t, c.divergence, c.temp_on, c.T, e, where, mode)
    hard = replace(c, a=0.0) if c.has_labels and c.hard_weight else None
    y = None if p.y is None else p.y.reshape(-1)
    keep = np.ones(D.shape, bool) if (y is None or c.soft_on_unlabeled) else (y != IGNORE)
    if c.per_row:
        val = c.a * np.where(keep, D, 0.0)
        if hard is not None:
            val = val + hard.value(p.s, p.t, p.y).reshape(-1)
        return val.reshape(p.s.shape[:-1])
    val = c.a * D[keep].sum() / count(c.soft_den, p.s, p.y)
    if hard is not None:
        val = val + hard.value(p.s, p.t, p.y)
    return np.asarray(val)


def stage_eps(S: Session, c: Convention, problem: Problem, outs):
    """An approximate fit: log(p + eps), or a clamp? Refit the coefficients with smoothed logs."""
    probes = S.shaped(peaked_probes(S.rng, c.T, S.caller.has_labels))
    try:
        peaked = [(p, S.call(p)) for p in probes]
    except CallFailed:
        peaked = []
    found = _fit_eps(c, list(zip(problem.probes, outs)) + peaked)
    if found is None:
        S.note("warning", "gradient_exact", f"the loss is close to {describe(c)} but not exactly it: "
               f"relative residual {problem.fit(c.divergence, c.temp_on, c.T, c.beta).residual:.2g} "
               f"(float32 arithmetic inside, a clamp, or an eps)")
        return c, None
    err = max(rel(o.value, c.value(p.s, p.t, p.y)) for p, o in peaked) if peaked else math.nan
    _note_smoothing(S, found, err)
    return found[2], found


def stage_neg_inf(S: Session, c: Convention, eps_found) -> bool:
    """Student and teacher -inf at the same classes: the value and gradient stay finite and right."""
    ok = True
    for p in S.shaped(neg_inf_probes(S.rng, S.caller.has_labels)):
        try:
            o = S.call(p)
        except CallFailed as e:
            S.note("warning", "neg_inf_safe", f"the loss fails when classes are -inf (vocabulary padding): {e}",
                   example=_example(p))
            return False
        bad_value = not np.all(np.isfinite(o.value))
        bad_grad = o.grad is not None and not np.all(np.isfinite(o.grad))
        if bad_value or bad_grad:
            what = "value" if bad_value else "gradient"
            small = _small_neg_inf(S.caller.has_labels)
            if S.sequence:
                small = as_sequences([small])[0]
            try:   # the small example where it shows the same, else the probe itself
                o2 = S.call(small)
                shows = not np.all(np.isfinite(o2.value)) or (o2.grad is not None and not np.all(np.isfinite(o2.grad)))
            except CallFailed:
                shows = False
            S.note("warning", "neg_inf_safe", f"the {what} is NaN or inf when student and teacher are -inf at the "
                   f"same classes (vocabulary padding): 0 * log 0 computed as 0 * -inf; mask the terms where the "
                   f"teacher has no mass (e.g. torch.where(q > 0, ...))", example=_example(small if shows else p))
            return False
        if eps_found is None:
            want, g = c.value_and_grad(p.s, p.t, p.y)
            if rel(o.value, want) > 1e-7:
                S.note("warning", "neg_inf_safe", f"with -inf classes the value is off by {rel(o.value, want):.2g} "
                       f"relative")
                ok = False
            else:
                S.checked.append((p, o))
    return ok


def model_free(S: Session, p) -> dict:
    """What can be told without a model of the divergence, from transformations of one batch:
    the rows twice (a sum doubles, a mean does not), every class twice with the same logits (a divergence
    per row is unchanged, a mean over elements halves), rows labeled -100 against those rows removed,
    other labels (no hard term: the same value)."""
    out = {}
    try:
        base = S.call(p).value
        if base.shape == p.s.shape[:-1]:
            out["reduction"] = "none"
        else:
            twice = S.call(Probe(np.concatenate([p.s, p.s]), np.concatenate([p.t, p.t]),
                                 None if p.y is None else np.concatenate([p.y, p.y]))).value
            wide = S.call(Probe(np.concatenate([p.s, p.s], -1), np.concatenate([p.t, p.t], -1), p.y)).value
            r2, rw = float(twice / base), float(wide / base)
            if abs(r2 - 2) < 1e-9:
                out["reduction"] = "sum"
            elif abs(r2 - 1) < 1e-9:
                out["reduction"] = "elementwise_mean" if abs(rw - 0.5) < 1e-9 else \
                    "batchmean" if abs(rw - 1) < 1e-9 else "unknown"
        if S.caller.has_labels:
            y = p.y.copy()
            y[[0, 2]] = IGNORE
            keep = y != IGNORE
            with_ignored = S.call(Probe(p.s, p.t, y)).value
            without = S.call(Probe(p.s[keep], p.t[keep], y[keep])).value
            S.ignore_honored = out["ignore_index_honored"] = bool(
                with_ignored.shape == without.shape and rel(with_ignored, without) <= 1e-12)
            other = S.call(Probe(p.s, p.t, (p.y + 1) % p.s.shape[-1])).value
            out["hard_term"] = "none" if rel(other, base) <= 1e-12 else None
    except CallFailed:
        if S.caller.has_labels and "ignore_index_honored" not in out:
            S.ignore_honored = out["ignore_index_honored"] = False
    return out


def neg_inf_finite(S: Session) -> bool:
    for p in S.shaped(neg_inf_probes(S.rng, S.caller.has_labels)):
        try:
            o = S.call(p)
        except CallFailed:
            return False
        if not np.all(np.isfinite(o.value)) or (o.grad is not None and not np.all(np.isfinite(o.grad))):
            return False
    return True


def _small_neg_inf(has_labels):
    s = np.array([[1.0, 0.0, -np.inf]])
    t = np.array([[0.0, 1.0, -np.inf]])
    return Probe(s, t, np.array([0]) if has_labels else None)


def _plain(x):
    """An array as nested lists, -inf / inf / nan as the strings "-inf", "inf", "nan" (JSON has no such
    numbers)."""
    def one(v):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)

    def walk(v):
        return [walk(e) for e in v] if isinstance(v, list) else one(v)
    return walk(np.asarray(x).tolist())


def _example(p) -> dict:
    ex = {"student": _plain(p.s), "teacher": _plain(p.t)}
    if p.y is not None:
        ex["labels"] = p.y.tolist()
    return ex


def stage_gradient(S: Session, c: Convention, probes, outs, eps_found, exact_fit=True, fit_residual=0.0):
    """The user's autograd gradient against minikd's hand-derived one (or, with an eps, finite
    differences of the user's own value)."""
    if all(o.grad is None for o in outs):
        if S.caller.framework == "numpy":
            S.note("info", "gradient_exact", "a NumPy loss without a gradient: return (loss, d loss / d student) "
                   "to have it checked")
            return None
        S.note("error", "gradient_exact", "no gradient reaches the student logits (detached, or computed "
               "outside autograd)")
        return False
    S.teacher_gradient = any(o.teacher_grad is not None and np.any(o.teacher_grad != 0) for o in outs)
    if eps_found is not None or not exact_fit:
        # the model is the loss only approximately: its gradient within the fit's own accuracy, else the
        # loss's own finite differences decide
        tol = max(1e-5, 1e3 * fit_residual)
        worst = max(rel(o.grad, c.value_and_grad(p.s, p.t, p.y)[1]) for p, o in zip(probes, outs))
        return True if worst <= tol else gradient_by_differences(S, probes[0], outs[0])
    worst = 0.0
    for p, o in zip(probes, outs):
        _, g = c.value_and_grad(p.s, p.t, p.y)
        worst = max(worst, rel(o.grad, g))
    S.grad_err = worst
    if worst <= GRAD_EXACT:
        return True
    _explain_gradient(S, c, probes, outs, worst)
    return False


def _explain_gradient(S, c, probes, outs, worst):
    """Fit the user's gradient as c_s * (soft term's) + c_h * (hard term's)."""
    cols, target = [], []
    for p, o in zip(probes, outs):
        soft = replace(c, b1=0.0, b2=0.0).value_and_grad(p.s, p.t, p.y)[1].reshape(-1)
        hard = replace(c, a=0.0).value_and_grad(p.s, p.t, p.y)[1].reshape(-1) if c.hard_weight else 0 * soft
        cols.append(np.stack([soft, hard], 1))
        target.append(o.grad.reshape(-1))
    A, b = np.concatenate(cols), np.concatenate(target)
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    fit = np.linalg.norm(A @ x - b) / max(np.linalg.norm(b), 1e-300)
    msg = f"the student gradient differs from the gradient of the loss's own value by {worst:.2g} relative"
    if fit <= 1e-8:
        if abs(x[0]) <= 1e-8 and c.a != 0:
            msg += ": the soft term sends no gradient to the student (a .detach() on the student's side of it?)"
        elif abs(x[1]) <= 1e-8 and c.hard_weight:
            msg += ": the hard term sends no gradient to the student (detached?)"
        else:
            msg += f": it is {x[0]:.4g} x the soft term's gradient + {x[1]:.4g} x the hard term's"
    S.note("error", "gradient_exact", msg)


def gradient_by_differences(S: Session, p, out):
    """The user's gradient against central differences of the user's own value (float64)."""
    if out.grad is None:
        return None if S.caller.framework == "numpy" else False
    h = 1e-3   # O(h^4) stencil: truncation ~1e-12; float32 rounding inside the loss ~1e-7 / h = 1e-4
    g = np.zeros_like(p.s)
    for idx in np.ndindex(p.s.shape):
        e = np.zeros_like(p.s)
        e[idx] = h
        f = [S.call(Probe(p.s + k * e, p.t, p.y)).value.sum() for k in (-2, -1, 1, 2)]
        g[idx] = (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12 * h)
    err = rel(out.grad, g)
    if err > 1e-3:
        S.note("error", "gradient_exact", f"the student gradient differs from finite differences of the loss's "
               f"own value by {err:.2g} relative")
        return False
    return True


def stage_micro_batches(S: Session, c: Convention):
    """Gradient accumulation: the mean of two micro-batch losses against the full batch's."""
    rng = S.rng
    N, C = 8, 5
    s, t = rng.standard_normal((N, C)) * 2, rng.standard_normal((N, C)) * 2
    y = rng.integers(0, C, N)
    y[[0, 1, 2, 5]] = IGNORE             # first half: 1 labeled row of 4, second half: 3 of 4
    if S.sequence:   # two sequences of 4 tokens; the micro-batches are one sequence each
        s, t, y = s.reshape(2, 4, C), t.reshape(2, 4, C), y.reshape(2, 4)
    step = 1 if S.sequence else 4
    try:
        full = S.call(Probe(s, t, y)).value.sum()
        halves = [S.call(Probe(s[i:i + step], t[i:i + step], y[i:i + step])).value.sum() for i in (0, step)]
    except CallFailed:
        return
    avg = float(np.mean(halves))
    if abs(avg - full) > 1e-9 * abs(full):
        S.note("info", "reduction", f"under gradient accumulation, averaging this loss over micro-batches is not "
               f"the full batch's loss when they hold different numbers of labeled rows (8 rows split 4 + 4 with "
               f"1 and 3 labeled: mean of the halves {avg:.6g}, full batch {full:.6g}); divide each micro-batch's "
               f"sum by the full batch's count (minikd: normalizer=)")


def max_errs(S: Session, c: Convention):
    """Worst relative error of the value and gradient against the model over every probe checked."""
    le = ge = 0.0
    for p, o in S.checked:
        v, g = c.value_and_grad(p.s, p.t, p.y)
        le = max(le, rel(o.value, v))
        if o.grad is not None:
            ge = max(ge, rel(o.grad, g))
    ge = max(ge, getattr(S, "grad_err", 0.0))
    return le, (ge if any(o.grad is not None for _, o in S.checked) or hasattr(S, "grad_err") else math.nan)


def stage_expect(S: Session, c: Convention | None, conv: dict, expected: dict):
    """Every difference from what the user meant, with the smallest input that shows it."""
    for key, want in expected.items():
        got = conv.get(key)
        if key == "hard_weight" and got is None and conv.get("alpha") is not None and conv.get("hard_term") != "none":
            got = 1.0 - conv["alpha"]
        same = (got == want) if not isinstance(want, float) or got is None else \
            abs(got - want) <= 1e-6 * max(abs(want), 1e-12)
        if key == "t_squared" and got is None and conv.get("temperature") == 1.0:
            same = True
        if same:
            continue
        msg = f"expected {key}={show(want)}, the loss has {key}={show(got)}"
        example = _smallest_difference(S, c, conv, key, want)
        if example is not None:
            S.note("error", key, msg, example=example)
        else:
            S.note("error", key, msg)


def _expected_model(c: Convention, conv: dict, key, want) -> Convention | None:
    """The fitted model with one property changed to what the user expected."""
    if c is None:
        return None
    if key == "temperature":
        ratio = want ** 2 / c.T ** 2 if conv.get("t_squared") else 1.0
        return replace(c, T=want, a=c.a * ratio)
    if key == "alpha":
        T2 = c.T ** 2 if conv.get("t_squared") else 1.0
        hw = conv.get("hard_weight")
        b = c.hard_weight if hw is not None else (1 - want if c.hard_weight else 0.0)
        scale = b / c.hard_weight if c.hard_weight else 0.0
        return replace(c, a=want * T2, b1=c.b1 * scale, b2=c.b2 * scale)
    if key == "divergence":
        return replace(c, divergence=want, beta=(c.beta or 0.5) if want == "jsd" else None)
    if key == "beta":
        return replace(c, beta=want)
    if key == "t_squared":
        T2 = c.T ** 2
        return replace(c, a=c.a * T2 if want else c.a / T2)
    if key == "reduction":
        den = {"batchmean": "labeled_rows", "sum": "sum", "elementwise_mean": "elements", "batch_axis_mean":
               "leading_axis"}.get(want)
        if den is None:
            return None
        return replace(c, soft_den=den, hard_den=den if c.hard_den != "sum" or want == "sum" else c.hard_den)
    if key == "temperature_on":
        return replace(c, temp_on="both" if want == "none" else want, T=1.0 if want == "none" else c.T)
    if key == "hard_term":
        if want == "none":
            return replace(c, b1=0.0, b2=0.0)
        if want == "ce":
            return replace(c, b1=c.hard_weight, b2=0.0)
        return None
    if key == "label_smoothing":
        return replace(c, b1=c.hard_weight * (1 - want), b2=c.hard_weight * want)
    if key == "ignore_index_honored":
        return replace(c, soft_on_unlabeled=not want,
                       soft_den="labeled_rows" if want and c.soft_den == "rows" else c.soft_den)
    return None


def _smallest_difference(S: Session, c, conv, key, want):
    """The smallest probe where the user's loss and the expected convention's differ."""
    m = _expected_model(c, conv, key, want)
    if m is None:
        return None
    has = S.caller.has_labels
    cands = []
    for shape in ((1, 2), (1, 3), (2, 2), (2, 3), (3, 3), (2, 2, 2), (2, 3, 3)):
        n = int(np.prod(shape[:-1]))
        s = np.arange(n * shape[-1], dtype=np.float64).reshape(shape) % 3 - 1.0
        t = -np.roll(s, 1, axis=-1) * 2.0 + 0.0    # (+ 0.0: no -0.0 in the example)
        y = np.zeros(shape[:-1], dtype=np.int64) if has else None
        cands.append(Probe(s, t, y))
        if has and n > 1:
            y2 = y.copy()
            y2.reshape(-1)[0] = IGNORE
            cands.append(Probe(s, t, y2))
    for p in cands:
        try:
            o = S.call(p)
            v = m.value(p.s, p.t, p.y)
        except (CallFailed, ValueError):
            continue
        if o.value.shape == v.shape and rel(o.value, v) > 1e-6:
            ex = _example(p)
            ex["loss"] = _plain(o.value)
            ex["expected_loss"] = _plain(v)
            return ex
    return None


def stage_precision(S: Session, c: Convention | None, probes, dtypes) -> dict:
    """The loss in lower precision against the float64 oracle on the same (rounded) inputs."""
    out = {}
    for dt in dtypes:
        le, ge = 0.0, None
        negative = False
        try:
            for p in probes[:4]:
                pr = _round(p, dt)
                o = S.call(pr, dt)
                if c is not None:
                    ref_v, ref_g = c.value_and_grad(pr.s, pr.t, pr.y)
                else:   # no model: the loss itself in float64 on the same inputs
                    ref = S.call(pr)
                    ref_v, ref_g = ref.value, ref.grad
                le = max(le, rel(o.value, ref_v))
                if o.grad is not None and ref_g is not None:
                    ge = max(ge or 0.0, rel(o.grad, ref_g))
            # student == teacher on rows of a peaked distribution: the divergence is 0; low precision
            # can make it negative (only checkable without a hard term)
            if c is not None and (not c.has_labels or c.hard_weight == 0):
                s = S.rng.standard_normal((16, 32)) * 4
                pr = _round(Probe(s, s.copy(), np.zeros(16, np.int64) if c.has_labels else None), dt)
                negative = bool(np.any(S.call(pr, dt).value < 0))
            else:
                negative = None
        except CallFailed as e:
            out[dt] = {"error": str(e)}
            continue
        out[dt] = {"loss_rel_err": le, "grad_rel_err": ge, "goes_negative": negative}
        if negative:
            S.note("warning", "precision", f"in {dt} the divergence of a student equal to its teacher comes out "
                   f"negative")
    return out


def _round(p, dt):
    """The probe's logits rounded to dt, back in float64 (so the oracle sees the same inputs)."""
    if dt == "bfloat16":
        import ml_dtypes  # noqa: PLC0415
        cast = ml_dtypes.bfloat16
    else:
        cast = np.dtype(dt)
    return Probe(p.s.astype(cast).astype(np.float64), p.t.astype(cast).astype(np.float64), p.y)
