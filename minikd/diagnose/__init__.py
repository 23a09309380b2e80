"""``minikd diagnose``: which convention a user's KD loss implements, and where it departs from the math.

The user's loss is called on float64 probes (``minikd.diagnose.fit``) and its value fitted against
minikd's exact losses under every candidate convention (``minikd.diagnose.model``); the winner is then
checked on rows labeled -100, (B, S, C) sequences, ``-inf`` classes, nearly one-hot rows and a
micro-batch split, and the user's autograd gradient is compared with minikd's hand-derived one.
``--expect`` turns every difference from what the user meant into a finding with the smallest input
that shows it; ``dtypes`` reruns the loss in lower precision against the float64 oracle.

    from minikd.diagnose import diagnose
    d = diagnose(my_loss, fixed={"T": 4.0})         # my_loss(student_logits, teacher_logits, labels)
    print(d.table()); d.to_dict()["conventions"]    # or: minikd diagnose my_file.py:my_loss --arg T=4
"""
from __future__ import annotations

import json
import math
import time

from dataclasses import replace

import numpy as np

from ..checks import UserError
from .adapters import DTYPES, CallFailed, Caller, load
from .fit import Problem, core_probes
from .model import REDUCTION_NAME, Convention
from .stages import (APPROX, EXACT, describe, gradient_by_differences, max_errs, model_free,
                     neg_inf_finite, Session, show, stage_eps, stage_expect, stage_gradient,
                     stage_ignore, stage_micro_batches, stage_neg_inf, stage_peaked, stage_precision,
                     stage_sequence)

__all__ = ["diagnose", "Diagnosis", "load", "parse_expect", "EXPECT_KEYS"]

DIVERGENCE_OF_KIND = {"kl": "forward_kl", "forward_kl": "forward_kl", "ce": "soft_ce", "soft_ce": "soft_ce",
                      "reverse_kl": "reverse_kl", "jsd": "jsd", "tvd": "tvd"}
EXPECT_KEYS = {"T": "temperature", "temperature": "temperature", "alpha": "alpha", "kind": "divergence",
               "divergence": "divergence", "beta": "beta", "reduction": "reduction", "t_squared": "t_squared",
               "scale_t2": "t_squared", "hard_term": "hard_term", "label_smoothing": "label_smoothing",
               "temperature_on": "temperature_on", "ignore_index": "ignore_index_honored",
               "ignore_index_honored": "ignore_index_honored", "hard_weight": "hard_weight"}


def parse_expect(text):
    """``"T=4,alpha=0.9,kind=kl"`` (or a dict) -> {conventions key: value}."""
    if text is None:
        return {}
    items = text.items() if isinstance(text, dict) else \
        (part.split("=", 1) if "=" in part else (part, "") for part in str(text).split(",") if part.strip())
    out = {}
    for k, v in items:
        k = str(k).strip()
        if k not in EXPECT_KEYS:
            raise UserError(f"expect: unknown key {k!r}; known: {', '.join(sorted(EXPECT_KEYS))}")
        key = EXPECT_KEYS[k]
        v = v.strip() if isinstance(v, str) else v
        if key in ("temperature", "alpha", "beta", "label_smoothing", "hard_weight"):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise UserError(f"expect: {k} needs a number, got {v!r}") from None
        elif key in ("t_squared", "ignore_index_honored"):
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise UserError(f"expect: {k} needs true or false, got {v!r}")
                v = v.lower() in ("true", "1", "yes")
            v = bool(v)
        elif key == "divergence":
            if v not in DIVERGENCE_OF_KIND:
                raise UserError(f"expect: kind must be one of {sorted(DIVERGENCE_OF_KIND)}, got {v!r}")
            v = DIVERGENCE_OF_KIND[v]
        elif key == "reduction" and v not in ("batchmean", "sum", "elementwise_mean", "batch_axis_mean", "none",
                                              "mean"):
            raise UserError(f"expect: reduction must be batchmean, sum, elementwise_mean, batch_axis_mean or none, "
                            f"got {v!r}")
        elif key == "reduction" and v == "mean":
            v = "elementwise_mean"
        out[key] = v
    return out


class Diagnosis:
    """The result: ``to_dict()`` (the JSON object), ``table()`` (readable), ``exit_code`` (0: the loss
    is what was expected, or with no expectation a known convention exactly; 1 otherwise)."""

    def __init__(self, data: dict, model: Convention | None):
        self.data = data
        self.model = model

    def to_dict(self) -> dict:
        return self.data

    def to_json(self) -> str:
        return json.dumps(self.data, allow_nan=False, default=_jsonable)

    def __getitem__(self, key):
        return self.data[key]

    @property
    def exit_code(self) -> int:
        if any(f["severity"] == "error" for f in self.data["findings"]):
            return 1
        if self.data["expected"]:
            return 0
        return 0 if self.data["equivalent_call"] is not None else 1

    def table(self) -> str:
        d = self.data
        c = d["conventions"]
        lines = [f"minikd diagnose: {d['function']} ({d['framework']}, {d['seconds']:.1f} s)", ""]
        width = max(len(k) for k in c)
        for k, v in c.items():
            lines.append(f"  {k:<{width}}  {show(v)}")
        lines.append("")
        if d["equivalent_call"]:
            lines.append(f"equivalent minikd call (value and gradient):\n  {d['equivalent_call']}")
            if d.get("equivalent_call_labeled"):
                lines.append(f"  on batches where every row is labeled, simply:\n  {d['equivalent_call_labeled']}")
        elif d.get("nearest_call"):
            lines.append(f"no exact minikd equivalent; nearest:\n  {d['nearest_call']}")
        err = d["max_rel_err"]
        lines.append(f"max relative error against it: loss {show(err['loss'])}, gradient {show(err['grad'])}")
        if d.get("precision"):
            lines.append("")
            lines.append(f"  {'dtype':<10}{'loss rel err':>14}{'grad rel err':>14}  goes negative")
            for dt, r in d["precision"].items():
                if "error" in r:
                    lines.append(f"  {dt:<10}  {r['error']}")
                else:
                    lines.append(f"  {dt:<10}{show(r['loss_rel_err']):>14}{show(r['grad_rel_err']):>14}  "
                                 f"{show(r['goes_negative'])}")
        if d["findings"]:
            lines.append("")
            for f in d["findings"]:
                lines.append(f"  [{f['severity']}] {f['property']}: {f['message']}")
                if "example" in f:
                    lines.append(f"      smallest input: {json.dumps(f['example'], default=_jsonable)}")
        lines.append("")
        lines.append("verdict: " + ("matches what you expected" if d["expected"] and self.exit_code == 0 else
                                    "departs from what you expected" if d["expected"] else
                                    "a known convention, exactly" if self.exit_code == 0 else
                                    "not an exact known convention (see the findings)"))
        return "\n".join(lines)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def diagnose(fn, *, order=("student", "teacher", "labels"), names=None, teacher_as="logits", fixed=None,
             module_init=None, framework=None, expect=None, dtypes=(), sequence=False, seed=0) -> Diagnosis:
    """Diagnose the KD loss ``fn`` (see the module doc). ``fn`` is a callable, a torch.nn.Module (class or
    instance) or ``"FILE.py:NAME"`` / ``"package.module:NAME"``; ``order``/``names`` say how it takes the
    student logits, the teacher and the labels; ``teacher_as`` what it takes as the teacher ("logits",
    "probs" or "log_probs", at T = 1); ``fixed`` extra keyword arguments; ``module_init`` a Module class's
    constructor arguments; ``framework`` "torch", "jax" or "numpy" (default: detected); ``expect`` what the
    user meant ("T=4,alpha=0.9,kind=kl" or a dict); ``dtypes`` lower precisions to audit; ``sequence``:
    the loss takes (B, S, C) logits, and its reduction is named on those (a mean over B alone is
    "batch_axis_mean")."""
    start = time.perf_counter()
    if isinstance(fn, str):
        name = fn
        fn = load(fn)
    else:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
    expected = parse_expect(expect)
    for dt in dtypes:
        if dt not in DTYPES[1:]:
            raise UserError(f"dtypes: expected some of {DTYPES[1:]}, got {dt!r}")
    caller = Caller(fn, framework=framework, order=order, names=names, teacher_as=teacher_as, fixed=fixed,
                    module_init=module_init)
    S = Session(caller, seed, sequence)
    has_labels = caller.has_labels

    probes = S.shaped(core_probes(S.rng, has_labels))
    outs = []
    for p in probes:
        try:
            out = S.call(p)
        except CallFailed as e:
            raise UserError(f"the loss fails on a plain {p.s.shape} batch of float64 logits: {e} (check how it "
                            f"takes its arguments: order/names, teacher_as, fixed)") from None
        if out.value.shape not in ((), (1,), p.s.shape[:-1]):
            raise UserError(f"the loss returned shape {out.value.shape} for a {p.s.shape} batch; expected a scalar "
                            f"or one value per row {p.s.shape[:-1]}")
        if not np.all(np.isfinite(out.value)):
            raise UserError(f"the loss is not finite ({out.value.reshape(-1)[:3]}) on a plain {p.s.shape} batch")
        outs.append(out)
    problem = Problem(probes, [o.value for o in outs], has_labels)
    values = np.concatenate([o.value.reshape(-1) for o in outs])
    constant = bool(np.all(values == values[0]))
    fits = [] if constant else problem.search()
    best = fits[0] if fits else None
    model = best.convention if best is not None and best.residual <= APPROX else None
    fit_exact = best is not None and best.residual <= EXACT

    conventions = _blank(has_labels)
    eps_found = None
    if constant:
        S.note("error", "divergence", f"the loss is {values[0]:g} on every probe: it does not depend on the "
               f"logits (a JSD at beta = 0 or 1 without the endpoint rule is identically 0)")
    if model is None:
        if not constant:
            S.note("error", "divergence", f"no known convention reproduces this loss (closest: "
                   f"{describe(best.convention) if best else 'none'}, relative residual "
                   f"{best.residual if best else math.inf:.2g})")
            conventions.update(model_free(S, probes[1]))
        conventions["gradient_exact"] = gradient_by_differences(S, probes[0], outs[0])
        conventions["neg_inf_safe"] = neg_inf_finite(S)
    else:
        S.checked.extend(zip(probes, outs))
        if has_labels:
            model = stage_ignore(S, model)
        if not sequence:   # (with sequence every probe is (B, S, C) already)
            stage_sequence(S, model)
        if not fit_exact:
            model, eps_found = stage_eps(S, model, problem, outs)
        else:
            eps_found = stage_peaked(S, model, zip(probes, outs))
        conventions.update(_describe_model(model, S, tol=max(1e-9, 1e3 * best.residual)))
        if S.sequence_reduction is not None and not sequence:
            conventions["sequence_reduction"] = S.sequence_reduction
        conventions["eps_smoothing"] = eps_found is not None and eps_found[3] == "eps"
        if eps_found is not None:   # the eps of log(p + eps), or the floor of log(max(p, floor))
            conventions["eps" if eps_found[3] == "eps" else "log_" + eps_found[3]] = eps_found[0]
        conventions["neg_inf_safe"] = stage_neg_inf(S, model, eps_found)
        conventions["gradient_exact"] = stage_gradient(S, model, probes, outs, eps_found, fit_exact,
                                                          best.residual)
        conventions["teacher_gradient"] = S.teacher_gradient
        if has_labels and model.soft_den != "sum":
            stage_micro_batches(S, model)
    loss_err, grad_err = max_errs(S, model) if model is not None else (math.inf, math.inf)
    exact = model is not None and eps_found is None and conventions["gradient_exact"] is not False and \
        loss_err <= EXACT * 10
    data = {
        "function": name,
        "framework": caller.framework,
        "conventions": conventions,
        "equivalent_call": model.code(caller.teacher_as) if exact and model is not None else None,
        "nearest_call": model.code(caller.teacher_as) if model is not None else None,
        "equivalent_call_labeled": _labeled_call(model, caller) if exact and model is not None else None,
        "max_rel_err": {"loss": _finite(loss_err), "grad": _finite(grad_err)},
        "fit": {"residual": _finite(best.residual) if best else None,
                "runner_up": ({"convention": describe(fits[1].convention), "residual": _finite(fits[1].residual)}
                              if len(fits) > 1 else None)},
        "expected": expected,
        "findings": S.findings,
    }
    if expected:
        stage_expect(S, model, conventions, expected)
    if dtypes:
        data["precision"] = stage_precision(S, model, probes, dtypes)
    data["seconds"] = time.perf_counter() - start
    return Diagnosis(data, model)


def _labeled_call(c: Convention, caller) -> str | None:
    """The same loss on batches without -100 labels, where the count of labeled rows is every row's:
    one plain call where the equivalent call is two (different handling of -100 rows), else None."""
    if not c.has_labels:
        return None
    lab = {"rows": "labeled_rows", "elements": "labeled_elements"}
    simple = replace(c, soft_on_unlabeled=False, soft_den=lab.get(c.soft_den, c.soft_den),
                     hard_den=lab.get(c.hard_den, c.hard_den))
    code = simple.code(caller.teacher_as)
    return None if code == c.code(caller.teacher_as) or " + " in code else code


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _blank(has_labels):
    return {"divergence": "unknown", "beta": None, "temperature": None, "temperature_on": None, "t_squared": None,
            "alpha": None, "hard_term": None if has_labels else "none", "reduction": "unknown",
            "ignore_index_honored": None, "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": False}


def _nice(x: float) -> int:
    """How many decimals x needs (fewer: a rounder number)."""
    for d in range(0, 10):
        if abs(round(x, d) - x) <= 1e-9 * max(abs(x), 1):
            return d
    return 10


def _t_squared_reading(a: float, T2: float) -> bool:
    """A soft weight a that is alpha * T^2 or alpha, weights not summing to one: the reading whose alpha
    lies in [0, 1], else the rounder one (16 at T = 4 is alpha 1 with T^2)."""
    inside = [0 <= a / T2 <= 1 + 1e-12, 0 <= a <= 1 + 1e-12]
    if inside[0] != inside[1]:
        return inside[0]
    return _nice(a / T2) <= _nice(a)


def _describe_model(c: Convention, S: Session, tol: float = 1e-9) -> dict:
    """The conventions dict of a fitted model (the JSON's "conventions"); ``tol``: how far the fitted
    weights may be from a reading (an approximate fit's weights carry its error)."""
    out = {"divergence": c.divergence, "beta": c.beta}
    T_is_1 = abs(c.T - 1.0) <= tol
    out["temperature"] = 1.0 if T_is_1 else c.T
    out["temperature_on"] = "none" if T_is_1 else c.temp_on
    b = c.hard_weight if c.has_labels else 0.0
    T2 = c.T ** 2
    t_sq, alpha, hard_weight = None, c.a, None
    if T_is_1:
        alpha = c.a
        if b != 0 and abs(c.a + b - 1) > tol:
            hard_weight = b
    elif b != 0:
        if abs(c.a / T2 + b - 1) <= tol:
            t_sq, alpha = True, c.a / T2
        elif abs(c.a + b - 1) <= tol:
            t_sq, alpha = False, c.a
        else:   # weights that do not sum to one
            hard_weight = b
            t_sq = _t_squared_reading(c.a, T2)
            alpha = c.a / T2 if t_sq else c.a
            S.note("info", "alpha", f"the soft and hard weights do not sum to one (soft {c.a:.6g} per row, hard "
                   f"{b:.6g}); read as alpha={alpha:.6g}{' with' if t_sq else ' without'} T^2 and hard_weight={b:.6g}")
    else:
        if abs(c.a - T2) <= tol * T2:
            t_sq, alpha = True, 1.0
        elif abs(c.a - 1.0) <= tol:
            t_sq, alpha = False, 1.0
        else:
            t_sq = _t_squared_reading(c.a, T2)
            alpha = c.a / T2 if t_sq else c.a
    out["t_squared"] = t_sq
    out["alpha"] = float(f"{alpha:.10g}")
    if hard_weight is not None:
        out["hard_weight"] = float(f"{hard_weight:.10g}")
    if not c.has_labels or b == 0:
        out["hard_term"] = "none"
    elif c.label_smoothing:
        out["hard_term"] = "label_smoothed_ce"
        out["label_smoothing"] = float(f"{c.label_smoothing:.10g}")
    else:
        out["hard_term"] = "ce"
    out["reduction"] = REDUCTION_NAME["none" if c.per_row else c.soft_den]
    if c.has_labels and b != 0 and not c.per_row and REDUCTION_NAME[c.hard_den] != out["reduction"]:
        out["hard_reduction"] = REDUCTION_NAME[c.hard_den]
        S.note("warning", "reduction", f"the two terms are reduced differently: the soft term by "
               f"{out['reduction']}, the hard term by {out['hard_reduction']}")
    if out["reduction"] == "elementwise_mean":
        S.note("warning", "reduction", "the soft term is divided by rows * classes (PyTorch's kl_div "
               "reduction='mean'): C times smaller than the KL divergence per row ('batchmean')")
    out["ignore_index_honored"] = S.ignore_honored
    return out
