"""A KD loss convention as minikd computes it: the hypotheses ``minikd diagnose`` fits.

A convention is a soft term and a hard term, each reduced on its own:

    L = a * sum_{i in R_s} D_i / n_s  +  sum_{i in R_h} (b1 CE_i + b2 U_i) / n_h

D_i the divergence of row i (``kind``, ``beta``) with the temperature ``T`` on both sides, the
teacher only or the student only; CE_i = -log softmax(s_i)[y_i] and U_i = mean_c -log softmax(s_i)_c
(label smoothing eps is b2 / (b1 + b2)); R_s the rows the soft term covers (every row, or only the
labeled ones), R_h the labeled rows; n_s, n_h the denominators (``DENOMINATORS``). Every value and
gradient is minikd's own (``kd_forward`` / ``kd_backward``): this module adds no maths, it only
names the minikd calls a convention is, and writes them as code a user can paste.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..losses import kd_backward, kd_forward
from ..softmax import _log_softmax

IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "soft_ce")
KIND = {"forward_kl": "kl", "reverse_kl": "reverse_kl", "jsd": "jsd", "tvd": "tvd", "soft_ce": "ce"}
TEMP_ON = ("both", "teacher_only", "student_only")
# a term's denominator: 1 (sum); rows (all, or the labeled ones); elements (rows * C); the leading axis
DENOMINATORS = ("sum", "rows", "labeled_rows", "elements", "labeled_elements", "leading_axis")
REDUCTION_NAME = {"sum": "sum", "rows": "batchmean", "labeled_rows": "batchmean", "elements": "elementwise_mean",
                  "labeled_elements": "elementwise_mean", "leading_axis": "batch_axis_mean", "none": "none"}


def count(den: str, s: np.ndarray, y) -> float:
    """The denominator ``den`` for student logits s (..., C) and labels y (...) or None."""
    rows = int(np.prod(s.shape[:-1]))
    labeled = rows if y is None else int(np.sum(np.asarray(y) != IGNORE))
    return {"sum": 1.0, "rows": rows, "labeled_rows": labeled, "elements": rows * s.shape[-1],
            "labeled_elements": labeled * s.shape[-1], "leading_axis": s.shape[0], "none": 1.0}[den]


def _den_code(den: str) -> str | None:
    """The normalizer= expression of a denominator (None: minikd's own count)."""
    return {"rows": "student[..., 0].size", "labeled_rows": "int((labels != -100).sum())",
            "elements": "student.size", "labeled_elements": "int((labels != -100).sum()) * student.shape[-1]",
            "leading_axis": "student.shape[0]"}.get(den)


@dataclass(frozen=True)
class Convention:
    divergence: str = "forward_kl"
    T: float = 1.0
    temp_on: str = "both"
    beta: float | None = None
    a: float = 1.0                 # soft-term coefficient per row (T^2 and alpha included)
    b1: float = 0.0                # hard term: b1 CE + b2 U per labeled row
    b2: float = 0.0
    soft_den: str = "rows"
    hard_den: str = "rows"
    soft_on_unlabeled: bool = False   # rows labeled -100 still get the soft term
    per_row: bool = False             # reduction "none": the loss of each row
    has_labels: bool = True           # the loss takes labels (a hard term is possible)

    @property
    def hard_weight(self) -> float:
        return self.b1 + self.b2

    @property
    def label_smoothing(self) -> float:
        return 0.0 if self.hard_weight == 0 else self.b2 / self.hard_weight

    # ------------------------------------------------------------ the minikd calls
    def _teacher(self, t):
        if self.temp_on == "teacher_only":
            return _log_softmax(t, self.T), 1.0, "log_probs"
        if self.temp_on == "student_only":
            return _log_softmax(t, 1.0), self.T, "log_probs"
        return t, self.T, "logits"

    def _soft_kwargs(self, s, y):
        red, norm = self._reduction(self.soft_den, s, y, soft=True)
        return dict(kind=KIND[self.divergence], beta=self.beta, scale_t2=False, alpha=self.a, hard_weight=0.0,
                    reduction=red, normalizer=norm, unlabeled="soft" if self.soft_on_unlabeled else "ignore")

    def _hard_kwargs(self, s, y):
        red, norm = self._reduction(self.hard_den, s, y, soft=False)
        return dict(T=1.0, alpha=0.0, hard_weight=self.hard_weight, label_smoothing=self.label_smoothing,
                    reduction=red, normalizer=norm, unlabeled="soft" if self.hard_den in ("rows", "elements") else "ignore")

    def _reduction(self, den, s, y, soft):
        """(reduction, normalizer) of kd_forward for a term reduced by ``den``."""
        if self.per_row:
            return "none", None
        if den == "sum":
            return "sum", None
        if self._own_count(den, soft):
            return "batchmean", None
        return "batchmean", count(den, s, y)

    def _own_count(self, den, soft) -> bool:
        """Whether kd_forward's "batchmean" divides by ``den`` itself (no normalizer): by every row
        with unlabeled="soft" (the soft term on -100 rows, or a hard term counted over all rows), by
        the labeled rows with "ignore"; without labels every row counts."""
        own = "rows" if (soft and self.soft_on_unlabeled) or (not soft and den in ("rows", "elements")) \
            else "labeled_rows"
        return den == own or (not self.has_labels and den in ("rows", "labeled_rows"))

    def parts(self, s, t, y):
        """The minikd calls whose sum is this convention: [(teacher input, kd_forward kwargs)]."""
        tt, T, teacher_as = self._teacher(t)
        out = []
        if self.a != 0.0 or self.hard_weight == 0.0:
            out.append((tt, dict(self._soft_kwargs(s, y), T=T, teacher_as=teacher_as)))
        if self.hard_weight != 0.0 and y is not None:
            out.append((s, self._hard_kwargs(s, y)))
        return out

    def value_and_grad(self, s, t, y):
        """The convention's value and student gradient (of the sum of the value), minikd's own."""
        total, grad = 0.0, np.zeros_like(s)
        for teacher, kw in self.parts(s, t, y):
            loss, cache = kd_forward(s, teacher, y, **kw)
            dloss = np.ones(cache.shape[:-1]) if kw["reduction"] == "none" else 1.0
            total = total + loss
            grad = grad + kd_backward(dloss, cache)
        return np.asarray(total, dtype=np.float64), grad

    def value(self, s, t, y):
        return self.value_and_grad(s, t, y)[0]

    # ------------------------------------------------------------ as code
    def code(self, teacher_as: str = "logits") -> str:
        """The convention as minikd calls on ``student, teacher, labels`` (a sum of two calls when the
        terms are reduced differently); ``teacher_as``: what the user's ``teacher`` holds (probabilities
        or log-probabilities at T = 1 are logits once logged: log_softmax(log q / T) = softmax(t / T))."""
        teacher_arg = "np.log(teacher)" if teacher_as == "probs" else "teacher"
        calls = []
        T = _num(self.T)
        if self.temp_on == "teacher_only":
            teacher, T_call, t_as = f"mk.log_softmax({teacher_arg}, {T})", "1.0", "log_probs"
        elif self.temp_on == "student_only":
            teacher, T_call, t_as = f"mk.log_softmax({teacher_arg}, 1.0)", T, "log_probs"
        else:
            teacher, T_call, t_as = teacher_arg, T, "logits"
        labels = ", labels" if self.has_labels else ""
        t_kw = f", teacher_as='{t_as}'" if t_as != "logits" else ""
        merged = self._merged()
        if merged is not None:
            return f"mk.kd_loss(student, {teacher}{labels}, T={T_call}, {merged}{t_kw})"
        calls.append(f"mk.kd_loss(student, {teacher}{labels}, T={T_call}, {self._call_args(soft=True)}{t_kw})")
        if self.hard_weight != 0.0 and self.has_labels:
            calls.append(f"mk.kd_loss(student, student, labels, T=1.0, {self._call_args(soft=False)})")
        return " + ".join(calls)

    def _term_code(self, den, soft):
        if self.per_row:
            return ["reduction='none'"]
        if den == "sum":
            return ["reduction='sum'"]
        return [] if self._own_count(den, soft) else [f"normalizer={_den_code(den)}"]

    def _call_args(self, soft: bool) -> str:
        if soft:
            kw = [f"alpha={_num(self.a)}", "hard_weight=0.0", "scale_t2=False"]
            kw += self._kind_args()
            kw += self._term_code(self.soft_den, True)
            if self.soft_on_unlabeled and self.has_labels:
                kw.append("unlabeled='soft'")
        else:
            kw = ["alpha=0.0", f"hard_weight={_num(self.hard_weight)}"]
            if self.label_smoothing:
                kw.append(f"label_smoothing={_num(self.label_smoothing)}")
            kw += self._term_code(self.hard_den, False)
            if self.hard_den in ("rows", "elements"):
                kw.append("unlabeled='soft'")
        return ", ".join(kw)

    def _kind_args(self):
        kw = []
        if self.divergence != "forward_kl":
            kw.append(f"kind='{KIND[self.divergence]}'")
        if self.divergence == "jsd":
            kw.append(f"beta={_num(self.beta)}")
        return kw

    def _merged(self) -> str | None:
        """The arguments after T of one kd_loss call, when both terms share a reduction."""
        has_hard = self.hard_weight != 0.0 and self.has_labels
        if has_hard:
            same_rows = self.soft_on_unlabeled == (self.hard_den in ("rows", "elements"))
            if self.soft_den != self.hard_den or not same_rows:
                return None
        kw = []
        T2 = self.T ** 2 if self.temp_on == "both" else None
        alpha, scale_t2 = self.a, False
        if has_hard and T2 is not None and abs(self.a / T2 + self.hard_weight - 1) < 1e-9:
            alpha, scale_t2 = self.a / T2, True
        elif has_hard and abs(self.a + self.hard_weight - 1) < 1e-9:
            alpha = self.a
        elif not has_hard and T2 is not None and abs(self.a - T2) < 1e-9 * T2:
            alpha, scale_t2 = 1.0, True
        kw.append(f"alpha={_num(alpha)}")
        if has_hard and abs(alpha + self.hard_weight - 1) > 1e-9:
            kw.append(f"hard_weight={_num(self.hard_weight)}")
        if not has_hard and (self.has_labels or alpha != 1.0):
            kw.append("hard_weight=0.0")
        if not scale_t2:
            kw.append("scale_t2=False")
        kw += self._kind_args()
        if has_hard and self.label_smoothing:
            kw.append(f"label_smoothing={_num(self.label_smoothing)}")
        kw += self._term_code(self.soft_den, True)
        if self.soft_on_unlabeled and self.has_labels:
            kw.append("unlabeled='soft'")
        return ", ".join(kw)


def _num(x) -> str:
    """A number as short code that reads back to the same value (to 12 significant digits)."""
    if x is None:
        return "None"
    r = float(f"{x:.12g}")
    return repr(r)
