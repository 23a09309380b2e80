"""The conventions minikd does not compute on purpose: logs taken as log(p + eps), or clamped.

Code that writes ``torch.log(F.softmax(s / T) + 1e-8)`` instead of ``F.log_softmax`` computes the
divergence with smoothed logs. ``minikd diagnose`` needs its value to recognise it (and to report the
eps): this module is that value, per row, for the divergences where the pattern is seen. It is a
model of a bug, never used as a loss.

    forward_kl   sum_c q_c (log(q_c + e_q) - log(p_c + e_p))
    soft_ce      -sum_c q_c log(p_c + e_p)
    reverse_kl   sum_c p_c (log(p_c + e_p) - log(q_c + e_q))

with e_p = eps (the student's log smoothed) and e_q = eps or 0 (``where`` = "both" or "student").
"""
from __future__ import annotations

import numpy as np

from ..softmax import _log_softmax

PLACES = ("student", "both")
MODES = ("eps", "clamp", "clip")
DIVERGENCES = ("forward_kl", "soft_ce", "reverse_kl")


def rows(s, t, divergence, temp_on, T, eps, where, mode="eps"):
    """Per-row divergence with smoothed logs (module doc), rows flattened; ``mode="clamp"``: the logs
    are log(max(p, eps)) instead (``torch.log(p.clamp(min=eps))``); ``"clip"``: p and q themselves
    clipped to [eps, 1], weights included (Keras' ``KLDivergence``)."""
    Ts, Tt = {"both": (T, T), "teacher_only": (1.0, T), "student_only": (T, 1.0)}[temp_on]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    p, q = np.exp(_log_softmax(s, Ts)), np.exp(_log_softmax(t, Tt))

    def smooth(x):
        return np.log(x + eps) if mode == "eps" else np.log(np.maximum(x, eps))
    lp = smooth(p)
    lq = smooth(q) if where == "both" else _log_softmax(t, Tt)
    if mode == "clip":   # Keras: both distributions clipped to [eps, 1], weights included
        p, q = np.clip(p, eps, 1.0), np.clip(q, eps, 1.0)
        lp, lq = np.log(p), np.log(q)
    with np.errstate(invalid="ignore"):
        if divergence == "forward_kl":
            terms = np.where(q > 0, q * (lq - lp), 0.0)
        elif divergence == "soft_ce":
            terms = -q * lp
        else:
            terms = p * (lp - lq)
    return terms.sum(-1)
