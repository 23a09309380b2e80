"""Probes and the fit: which ``Convention`` a user's loss values are.

Probes are seeded float64 inputs chosen to separate the hypotheses: batches of different row counts N
and class counts C (a sum, a mean over rows and a mean over elements scale differently with N and C),
rows of different logit scales (the temperature changes how peaked they are, so T is identifiable),
random labels (the hard term, and label smoothing through U = mean_c -log p_c).

The fit: for each divergence and each side the temperature is on, and each T (a grid over
[0.05, 200], then Brent's method around the best; JSD adds beta), the per-row soft terms D_i and hard
terms CE_i, U_i are minikd's (``Convention.parts``); the loss is then linear in the coefficients
(a, b1, b2) for each pair of denominators, solved by least squares. The hypothesis with the smallest
relative residual wins. Rows labeled -100, -inf classes, sequences and nearly one-hot rows are
probed afterwards against the winner (``minikd.diagnose``).
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..losses import kd_forward
from ..losses.divergences import check_beta
from ..losses.kd import check_kd_arguments, soft_term_rows, tempered
from .model import DIVERGENCES, IGNORE, KIND, TEMP_ON, Convention, count

CORE_SHAPES = ((4, 5), (7, 5), (4, 9), (6, 3), (9, 9), (5, 7), (3, 4), (8, 6))
BETA_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2)) + (0.01, 0.99)
T_GRID = tuple(np.geomspace(0.05, 200.0, 49))


class Probe(NamedTuple):
    s: np.ndarray
    t: np.ndarray
    y: np.ndarray | None


def as_sequences(probes) -> list[Probe]:
    """(N, C) probes as (B, N / B, C) sequences, B the smallest divisor >= 2 of N (1 for a prime N): the
    ratio of rows to the leading axis varies from probe to probe, which tells a mean over B * S from a
    mean over B."""
    out = []
    for p in probes:
        N, C = p.s.shape
        B = next((b for b in range(2, N) if N % b == 0), 1)
        out.append(Probe(p.s.reshape(B, N // B, C), p.t.reshape(B, N // B, C),
                         None if p.y is None else p.y.reshape(B, N // B)))
    return out


def core_probes(rng, has_labels: bool) -> list[Probe]:
    """Batches of several (N, C), rows of logit scales 0.3 to 6, every row labeled."""
    out = []
    for N, C in CORE_SHAPES:
        scale_s = rng.uniform(0.3, 6.0, (N, 1))
        scale_t = rng.uniform(0.3, 6.0, (N, 1))
        s = rng.standard_normal((N, C)) * scale_s
        t = rng.standard_normal((N, C)) * scale_t
        y = rng.integers(0, C, N) if has_labels else None
        out.append(Probe(s, t, y))
    return out


def ignore_probes(rng) -> list[Probe]:
    """Batches where some rows are labeled -100, in different proportions."""
    out = []
    for (N, C), k in zip(((6, 5), (5, 7), (8, 4), (7, 6)), (1, 2, 3, 5)):
        s, t = rng.standard_normal((N, C)) * 2, rng.standard_normal((N, C)) * 2
        y = rng.integers(0, C, N)
        y[rng.permutation(N)[:k]] = IGNORE
        out.append(Probe(s, t, y))
    return out


def sequence_probes(rng, has_labels: bool) -> list[Probe]:
    """(B, S, C) batches: a mean over rows divides by B * S, a mean over the leading axis by B."""
    out = []
    for shape in ((2, 3, 5), (3, 4, 4), (4, 2, 6)):
        s, t = rng.standard_normal(shape) * 2, rng.standard_normal(shape) * 2
        out.append(Probe(s, t, rng.integers(0, shape[-1], shape[:-1]) if has_labels else None))
    return out


def neg_inf_probes(rng, has_labels: bool) -> list[Probe]:
    """Vocabulary padding: student and teacher -inf at the same classes (never at a label)."""
    out = []
    for N, C in ((4, 6), (5, 8)):
        s, t = rng.standard_normal((N, C)) * 2, rng.standard_normal((N, C)) * 2
        pad = np.zeros((N, C), dtype=bool)
        pad[:, -2:] = True                      # the last two classes are padding in every row
        pad[0, -3] = True                       # and one more in the first row
        s, t = np.where(pad, -np.inf, s), np.where(pad, -np.inf, t)
        y = rng.integers(0, C - 3, N) if has_labels else None
        out.append(Probe(s, t, y))
    return out


def peaked_probes(rng, T: float, has_labels: bool) -> list[Probe]:
    """Nearly one-hot rows at the fitted temperature, the smallest probabilities from ~1e-4 to ~1e-13
    (logit gaps of 9 T to 30 T): where log(p + eps) and log(max(p, eps)) depart from log p, and from
    each other."""
    out = []
    for N, C in ((4, 5), (8, 4)):
        s = rng.standard_normal((N, C)) * 0.5
        t = rng.standard_normal((N, C)) * 0.5
        gaps = np.resize([9.0, 16.0, 23.0, 30.0], N) * T
        top = rng.integers(0, C, N)
        s[np.arange(N), top] += gaps
        t[np.arange(N), rng.integers(0, C, N)] += rng.permutation(gaps)
        # labels at the student's peak: the hard term ~0, so the soft term's logs show in the value
        out.append(Probe(s, t, top if has_labels else None))
    return out


# ---------------------------------------------------------------- per-row terms (minikd's values)

def soft_call(p: Probe, divergence, temp_on, T, beta):
    """The minikd call whose rows are D_i of probe p: (teacher input, kd_forward kwargs)."""
    c = Convention(divergence=divergence, T=T, temp_on=temp_on, beta=beta, a=1.0, per_row=True, has_labels=False)
    return c.parts(p.s, p.t, None)[0]


def soft_rows(p: Probe, divergence, temp_on, T, beta) -> np.ndarray:
    """D_i of every row (flattened), the divergence with the temperature on the given side."""
    teacher, kw = soft_call(p, divergence, temp_on, T, beta)
    return np.asarray(kd_forward(p.s, teacher, None, **kw)[0], dtype=np.float64).reshape(-1)


class SoftRows:
    """``soft_rows`` of one 2-D probe for many hypotheses, the work they share done once: kd_forward
    computes its soft term from p, q and their logs at T (``minikd.losses.kd.tempered``), which
    depend on the side the temperature is on and T, not on the divergence or beta; here they are
    kept for the ``size`` most recent (temp_on, T) (both precisions: the kl and ce kinds use plain
    logs, the others precise ones) and each D_i is ``kd.soft_term_rows`` on them -- the functions
    kd_forward calls, on the same values, so the same numbers (its soft term at alpha = 1 without
    T^2 is 0 + 1 * D_i). A new (temp_on, T) is checked as kd_forward checks it (``check_kd_arguments``,
    the teacher in ``tempered``); each call checks its beta."""

    def __init__(self, p: Probe, size: int = 512):
        self.p, self.size = p, size
        self.cache = OrderedDict()   # (temp_on, T, precise) -> (Tempered, teacher_as)

    def __call__(self, divergence, temp_on, T, beta) -> np.ndarray:
        kind = KIND[divergence]
        key = (temp_on, float(T), kind not in ("kl", "ce"))
        hit = self.cache.get(key)
        if hit is None:
            teacher, kw = soft_call(self.p, divergence, temp_on, T, beta)
            checked = check_kd_arguments(self.p.s, teacher, None, ignore_index=IGNORE, mask=None,
                                         **{k: v for k, v in kw.items() if k != "scale_t2"})
            hit = (tempered(self.p.s, teacher, kw["teacher_as"], checked.T, checked.roles.valid, key[2]),
                   kw["teacher_as"])
            beta = checked.beta
            self.cache[key] = hit
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
            beta = check_beta(kind, beta)
        d, teacher_as = hit
        return soft_term_rows(kind, d, beta, teacher_as) + 0.0   # kd_forward's rows, 0 + 1 * D_i (no -0.0)


def hard_rows(p: Probe) -> tuple[np.ndarray, np.ndarray]:
    """(CE_i, U_i) of every row, 0 where the label is -100."""
    kw = dict(T=1.0, alpha=0.0, reduction="none")
    ce = np.asarray(kd_forward(p.s, p.s, p.y, **kw)[0]).reshape(-1)
    half = np.asarray(kd_forward(p.s, p.s, p.y, label_smoothing=0.5, **kw)[0]).reshape(-1)
    return ce, 2.0 * half - ce


# ---------------------------------------------------------------- the linear fit

class Fit(NamedTuple):
    residual: float
    convention: Convention


def simplest(A, L):
    """The fit with the fewest hard-term columns (none; CE; CE and U) that explains L as well as all
    of them (within 1.5x the residual): noise in an approximate fit does not invent a hard term or
    label smoothing. A negative hard weight is no fit."""
    return _simplest([_solve(A[:, :k], L) for k in range(1, A.shape[1] + 1)])


def _simplest(solutions):
    """``simplest`` from the least-squares solutions on the first 1, 2, ... columns: [(x, residual)]."""
    n = len(solutions)
    fits = []
    for x, res in solutions:
        x = np.concatenate([x, np.zeros(n - len(x))])
        tiny = 1e-9 * max(np.max(np.abs(x)), 1e-300)
        if np.any(x[1:] < -tiny) or (len(x) > 2 and x[2] > tiny and x[1] <= tiny):   # weights >= 0, smoothing < 1
            res = math.inf
        fits.append((x, res))
    top = min(r for _, r in fits)
    for x, r in fits:
        if r <= max(1.5 * top, 1e-14):
            return x, r
    return fits[-1]


def _solve(A, L, scale=None):
    """Least squares A x = L; (x, relative residual). ``scale``: ``_norm(L)`` (or 1e-300), if known."""
    return _solution(A, _lstsq_many(A[None], L)[0], L, scale)


def _solution(A, x, L, scale=None):
    """(x, the relative residual ||A x - L|| / ||L|| of x)."""
    scale = max(_norm(L), 1e-300) if scale is None else scale
    return x, _norm(A @ x - L) / scale


def _norm(v) -> float:
    """||v|| of a real vector, as np.linalg.norm computes it (sqrt(v . v)), without its checks."""
    return math.sqrt(float(v.dot(v)))


try:   # the gufunc np.linalg.lstsq calls (LAPACK gelsd); it takes a stack of systems in one call
    from numpy.linalg import _umath_linalg
    _GELSD = _umath_linalg.lstsq
except (ImportError, AttributeError):   # (a numpy without it: one lstsq call per system)
    _GELSD = None


def _no_convergence(err, flag):
    raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")


def _lstsq_many(A, b) -> np.ndarray:
    """x_k = np.linalg.lstsq(A[k], b, rcond=None)[0] for a stack A (K, m, n) of float64 systems, b (m,):
    (K, n), bitwise the same numbers (the same gelsd call, the same rcond, on the same values), in one
    call of the gufunc that lstsq calls once per system. A fit solves up to 13 systems of 8 x 3, where
    lstsq's checks and conversions cost ~4x its LAPACK call; ``_lstsq_many`` pays them once."""
    K, m, n = A.shape
    if _GELSD is None:
        return np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a in A])
    with np.errstate(call=_no_convergence, invalid="call", over="ignore", divide="ignore", under="ignore"):
        x = _GELSD(A, b[:, None], np.finfo(np.float64).eps * max(m, n), signature="ddd->ddid")[0]   # b broadcast
    return x[..., 0]


def _gelsd_agrees() -> bool:
    """Whether the private gufunc, as ``_lstsq_many`` calls it, gives np.linalg.lstsq's numbers on a
    small full-rank and a rank-deficient stack (checked once at import: a numpy whose private
    signature differs falls back to the public call instead of failing or drifting)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 8, 3))
    A[1, :, 2] = A[1, :, 0]                 # rank 2
    b = rng.standard_normal(8)
    try:
        got = _lstsq_many(A, b)
    except Exception:  # noqa: BLE001  (any failure of the private call: use the public one)
        return False
    want = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a in A])
    return got.shape == want.shape and np.array_equal(got, want)


if _GELSD is not None and not _gelsd_agrees():
    _GELSD = None


def stack(probes) -> Probe:
    """2-D probes as one batch: rows padded to the widest C with -inf classes on both sides (which
    change no divergence: minikd gives them probability 0 exactly), labels kept."""
    C = max(p.s.shape[-1] for p in probes)

    def pad(x):
        x = x.reshape(-1, x.shape[-1])
        return np.concatenate([x, np.full((x.shape[0], C - x.shape[1]), -np.inf)], axis=1)
    ys = [p.y.reshape(-1) for p in probes] if probes[0].y is not None else None
    return Probe(np.concatenate([pad(p.s) for p in probes]), np.concatenate([pad(p.t) for p in probes]),
                 None if ys is None else np.concatenate(ys))


class Problem:
    """The user's values on the core probes, and the per-row hard terms (fixed across hypotheses)."""

    def __init__(self, probes, values, has_labels: bool):
        self.probes = probes
        self.values = [np.asarray(v, dtype=np.float64) for v in values]
        self.has_labels = has_labels
        self.per_row = all(v.shape == p.s.shape[:-1] and v.ndim > 0 for v, p in zip(self.values, probes))
        self.hard = [hard_rows(p) for p in probes] if has_labels else None
        self.all = stack(probes)
        self.soft_rows = SoftRows(self.all)
        self.starts = np.cumsum([0] + [int(np.prod(p.s.shape[:-1])) for p in probes])[:-1]
        self.den = {d: np.array([count(d, p.s, p.y) for p in probes])
                    for d in ("sum", "rows", "elements", "leading_axis")}
        if has_labels:
            self.H = np.array([[h[0].sum(), h[1].sum()] for h in self.hard])
        self.L = np.array([float(v.reshape(-1)[0]) if v.size == 1 else np.nan for v in self.values])
        # what every fit's least squares share (none of it depends on the hypothesis)
        self.dens = ("sum", "rows", "elements") + (("leading_axis",) if probes[0].s.ndim > 2 else ())
        self.pairs = list(itertools.product(self.dens, self.dens if has_labels else ("rows",)))
        self.soft_den = np.array([self.den[ds] for ds, _ in self.pairs])              # (pairs, probes)
        if has_labels:   # the hard columns of each pair, H / n_h
            self.hard_cols = np.array([self.H / self.den[dh][:, None] for _, dh in self.pairs])
        self.L_scale = max(_norm(self.L), 1e-300)
        self._fits = {}   # (divergence, temp_on, T, beta) -> Fit (``fit``)
        if self.per_row:   # the per-row fit's hard columns and values
            self.row_cols = [np.concatenate([h[0] for h in self.hard]),
                             np.concatenate([h[1] for h in self.hard])] if has_labels else []
            self.row_values = np.concatenate([v.reshape(-1) for v in self.values])

    def fit(self, divergence, temp_on, T, beta=None) -> Fit:
        """The best coefficients and denominators for one (divergence, temp_on, T, beta), computed once:
        the search asks for some hypotheses again (the grid points around a coarse best, the
        roundest T after a golden-section search, the eps stage), ~15% of its fits."""
        key = (divergence, temp_on, float(T), beta)
        fit = self._fits.get(key)
        if fit is None:
            fit = self._fits[key] = self._fit(divergence, temp_on, T, beta)
        return fit

    def _fit(self, divergence, temp_on, T, beta) -> Fit:
        """``fit``: for every pair of denominators (soft, hard) the least-squares coefficients (all pairs
        solved in one ``_lstsq_many`` call), then for the two best pairs the simplest fit (``simplest``)."""
        try:
            rows = self.soft_rows(divergence, temp_on, T, beta)
        except (ValueError, FloatingPointError):
            return Fit(math.inf, None)
        if not np.all(np.isfinite(rows)):
            return Fit(math.inf, None)
        base = dict(divergence=divergence, T=float(T), temp_on=temp_on, beta=beta, per_row=self.per_row,
                    has_labels=self.has_labels)
        if self.per_row:
            x, res = _solve(np.stack([rows] + self.row_cols, 1), self.row_values)
            return Fit(res, clean(Convention(**base, a=float(x[0]), b1=float(x[1]) if self.has_labels else 0.0,
                                             b2=float(x[2]) if self.has_labels else 0.0, soft_den="none",
                                             hard_den="none")))
        L, scale = self.L, self.L_scale
        Dsum = np.add.reduceat(rows, self.starts)
        A = np.empty((len(self.pairs), len(L), 3 if self.has_labels else 1))   # one system per pair
        A[:, :, 0] = Dsum / self.soft_den
        if self.has_labels:
            A[:, :, 1:] = self.hard_cols
        full = [_solution(a, x, L, scale) for a, x in zip(A, _lstsq_many(A, L))]
        # the two best pairs of denominators (ties: the first), then their simplest fit
        top = sorted(range(len(full)), key=lambda i: full[i][1])[:2]
        fewer = [_lstsq_many(A[top, :, :k], L) for k in range(1, A.shape[2])]   # the top pairs, fewer columns
        best, best_res = None, math.inf
        for j, i in enumerate(top):
            x, res = _simplest([_solution(A[i][:, :k + 1], sol[j], L, scale) for k, sol in enumerate(fewer)]
                               + [full[i]])
            if res < best_res:
                best, best_res = (i, x), res
        if best is None:
            return Fit(math.inf, None)
        i, x = best
        ds, dh = self.pairs[i]
        # every core row is labeled: "rows" and "labeled_rows" agree; rows labeled -100 are
        # probed later (minikd.diagnose), the labeled count is the first guess
        return Fit(best_res, clean(Convention(**base, a=float(x[0]), b1=float(x[1]) if self.has_labels else 0.0,
                                              b2=float(x[2]) if self.has_labels else 0.0,
                                              soft_den=LABELED.get(ds, ds) if self.has_labels else ds,
                                              hard_den=LABELED.get(dh, dh) if self.has_labels else dh)))

    def search(self, refine: int = 4) -> list[Fit]:
        """Every (divergence, temp_on) at its best T (and beta) on a grid; the ``refine`` best of them
        (and any within 10x of the best) refined to machine precision; best first."""
        coarse = []
        for divergence, temp_on in itertools.product(DIVERGENCES, TEMP_ON):
            if divergence == "jsd":
                fit = self._grid_jsd(temp_on)
            else:
                fit = min((self.fit(divergence, temp_on, T) for T in T_GRID), key=lambda f: f.residual)
            if fit.convention is not None:
                coarse.append(fit)
        coarse.sort(key=lambda f: f.residual)
        out = []
        for i, f in enumerate(coarse):
            c = f.convention
            if i < refine or f.residual <= 10 * coarse[0].residual:
                if c.divergence == "jsd":
                    f = self._refine_jsd(c.temp_on, f)
                else:
                    j = T_GRID.index(c.T)
                    f = self._search_T(c.divergence, c.temp_on, None, grid=T_GRID[max(j - 1, 0):j + 2])
            out.append(f)
        out.sort(key=lambda f: f.residual)
        return out

    def _search_T(self, divergence, temp_on, beta, grid=T_GRID) -> Fit:
        """The best T on a grid, then to machine precision (``_ternary``), then the roundest T that fits
        as well (7 and not 7.00000005)."""
        fits = [(self.fit(divergence, temp_on, T, beta), T) for T in grid]
        i = int(np.argmin([f.residual for f, _ in fits]))
        best, T0 = fits[i]
        if not math.isfinite(best.residual):
            return best
        lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
        u = _ternary(lambda u: self.fit(divergence, temp_on, math.exp(u), beta).residual, lo, hi)
        top = min([best, self.fit(divergence, temp_on, math.exp(u), beta)], key=lambda f: f.residual)
        return self._roundest_T(divergence, temp_on, beta, top)

    def _roundest_T(self, divergence, temp_on, beta, top: Fit) -> Fit:
        for T in _roundings(top.convention.T):
            f = self.fit(divergence, temp_on, T, beta)
            if f.residual <= max(2 * top.residual, 1e-13):
                return f
        return top

    def _grid_jsd(self, temp_on) -> Fit:
        best = Fit(math.inf, None)
        for beta in BETA_GRID:
            for T in T_GRID[::4]:
                f = self.fit("jsd", temp_on, T, float(beta))
                if f.residual < best.residual:
                    best = f
        return best

    def _refine_jsd(self, temp_on, best: Fit) -> Fit:
        from scipy.optimize import minimize  # noqa: PLC0415
        c = best.convention

        def clip(b):   # beta kept in [0.001, 0.999]: nearer an endpoint JSD / beta is a scaled KL, not a JSD
            return min(max(b, 1e-3), 1 - 1e-3)

        def obj(v):
            return self.fit("jsd", temp_on, math.exp(v[0]), clip(1.0 / (1.0 + math.exp(-v[1])))).residual
        beta0 = min(max(c.beta, 1e-6), 1 - 1e-6)
        r = minimize(obj, [math.log(c.T), math.log(beta0 / (1 - beta0))], method="Nelder-Mead",
                     options={"xatol": 1e-12, "fatol": 1e-16, "maxiter": 300})
        u, beta = r.x[0], clip(1.0 / (1.0 + math.exp(-r.x[1])))
        for _ in range(3):   # to machine precision, one coordinate at a time
            u = _ternary(lambda x: self.fit("jsd", temp_on, math.exp(x), beta).residual, u - 1e-4, u + 1e-4)
            beta = clip(_ternary(lambda b: self.fit("jsd", temp_on, math.exp(u), clip(b)).residual,
                                 beta - 1e-4, beta + 1e-4))
        top = min([best, self.fit("jsd", temp_on, math.exp(u), beta)], key=lambda f: f.residual)
        for b in _roundings(top.convention.beta):   # the roundest beta (then T) that fits as well
            if 0 < b < 1:
                g = self._search_T("jsd", temp_on, b, grid=tuple(top.convention.T * np.geomspace(0.98, 1.02, 5)))
                if g.residual <= max(2 * top.residual, 1e-13):
                    return g
        return self._roundest_T("jsd", temp_on, top.convention.beta, top)


def _ternary(f, lo, hi, iterations=80):
    """The minimum of a unimodal f on [lo, hi] by golden-section search, to the last bits (scipy's
    bounded search stops at a relative 1.5e-8, too coarse to call T = 7.00000005 seven)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if b - a <= 1e-16 * max(abs(a), abs(b), 1e-300):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return c if fc <= fd else d


def _roundings(x: float):
    """x at 1, 2, ... 10 significant digits (the roundest first)."""
    seen = []
    for k in range(1, 11):
        r = float(f"{x:.{k}g}")
        if r not in seen:
            seen.append(r)
    return seen


LABELED = {"rows": "labeled_rows", "elements": "labeled_elements"}


def _snap(x: float) -> float:
    """x rounded to 10 significant digits (a fitted 14.400000000000015 is 14.4), 0 below 1e-12."""
    if abs(x) < 1e-12:
        return 0.0
    return float(f"{x:.10g}")


def clean(c: Convention) -> Convention:
    if abs(c.T - 1.0) <= 1e-12:   # at T = 1 the temperature is on no side: one name for it
        c = replace(c, T=1.0, temp_on="both")
    a, b1, b2 = _snap(c.a), max(_snap(c.b1), 0.0), max(_snap(c.b2), 0.0)
    if b1 == 0.0:   # label smoothing b2 / (b1 + b2) < 1: no U term without a CE term
        b2 = 0.0
    if abs(b2) < 1e-10 * max(abs(b1), 1e-300) or abs(b2) < 1e-12:
        b2 = 0.0
    return replace(c, a=a, b1=b1, b2=b2)
