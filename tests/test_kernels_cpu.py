"""The fused Numba kernel equals the reference (float64 to 1e-12, float32 to 1e-5)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given

import minikd as mk
from kernel_cases import make
from minikd.gradcheck import random_logits, relative_error
from minikd.kernels import softmax_kl
from minikd.testing import kd_cases

pytest.importorskip("numba")


def kw_of(case):
    kw = case.options()
    del kw["teacher_as"]   # the kernels take teacher logits
    return kw


@given(kd_cases(teacher_forms=("logits",)))
def test_float64_matches_reference(case):
    kw = kw_of(case)
    loss, grad = mk.kd_loss_and_grad(case.student, case.teacher, case.labels, **kw)
    kloss, kgrad = softmax_kl(case.student, case.teacher, case.labels, backend="numba", **kw)
    tau = case.T**2 if case.scale_t2 else 1.0
    # relative to the size of the terms (a KL of equal rows cancels to ~0; see test_torch_parity)
    scale_loss = max(np.max(np.abs(loss)), case.alpha * tau * np.log(case.student.shape[-1] + 1) + 1 - case.alpha)
    assert relative_error(kloss, loss, scale_loss) <= 1e-12
    assert relative_error(kgrad, grad) <= 1e-12 or np.max(np.abs(kgrad - grad)) <= 1e-15


ALL_KINDS = (("kl", None), ("ce", None), ("reverse_kl", None), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("tvd", None))
KIND_IDS = [f"{k}{'' if b is None else b}" for k, b in ALL_KINDS]


def grad_error(kgrad, grad):
    """max |kgrad - grad| relative to max |grad|."""
    return np.max(np.abs(np.asarray(kgrad, np.float64) - grad)) / np.max(np.abs(grad))


# every reduction for kl (the kernels' reductions are one code path, the conventions module's), two
# for the other kinds
KIND_REDUCTIONS = [(k, b, r) for k, b in ALL_KINDS for r in (("batchmean", "sum", "none") if k == "kl" else
                                                             ("batchmean", "none"))]


@pytest.mark.parametrize("C", [3, 16, 700])           # the short-row kernel (C <= 32, kl / ce) and the row kernel
@pytest.mark.parametrize("kind, beta, reduction", KIND_REDUCTIONS,
                         ids=[f"{k}{'' if b is None else b}-{r}" for k, b, r in KIND_REDUCTIONS])
@pytest.mark.parametrize("unlabeled", ["ignore", "soft"])
def test_float64_outliers_inf_masks(C, kind, beta, reduction, unlabeled):
    # some classes the teacher alone rules out (not for the reverse KL: there the loss is +inf, see
    # test_reverse_kl_of_a_teacher_without_mass); a fifth of the rows unlabeled (the transfer set)
    s, t, y, mask = make(40, C, C, "float64", teacher_only_inf=0.0 if kind == "reverse_kl" or beta == 1.0 else 0.05,
                         unlabeled_fraction=0.2)
    for T, alpha in ((0.05, 0.3), (1.0, 0.5), (50.0, 1.0), (2.0, 0.0)):
        kw = dict(T=T, alpha=alpha, kind=kind, beta=beta, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad = mk.kd_loss_and_grad(s, t, y, **kw)
        kloss, kgrad = softmax_kl(s, t, y, backend="numba", **kw)
        np.testing.assert_allclose(kloss, loss, rtol=1e-12, atol=1e-12 * (1 + T * T))
        # relative to max |grad| (the label entry p1_y - 1 cancels differently in the two orders; the
        # JSD's log-ratios come from log1p/expm1 of a difference formed in another order: 1e-11)
        assert grad_error(kgrad, grad) <= (1e-11 if kind == "jsd" else 1e-12)


def finite_rows(N, C, seed, T):
    """float32 rows without -inf (the fast path), built to reach every branch of its online maxima:
    outliers x20; rows rising block after block (the maxima change at every block); rows whose
    maximum jumps far above the first block's (beyond the reach the exponentials are allowed, at
    low T); a constant row; a row of one huge logit."""
    rng = np.random.default_rng(seed)
    s = random_logits(rng, (N, C), scale=3.0, outliers=0.01, p_inf=0.0)
    t = random_logits(rng, (N, C), scale=3.0, outliers=0.01, p_inf=0.0)
    s[0] = np.linspace(-5, 5, C)                  # rising: new maxima in every block
    t[1] = np.linspace(-5, 5, C)
    s[2, -1] = s[2].max() + 60                   # a jump in the last block
    t[3, C // 2] = t[3].max() + 45 * min(T, 1.0)  # just past the reach at any T
    s[4] = 1.5                                    # constant
    t[5, :] = -3.0
    t[5, C - 2] = 1e4                             # one class holds everything
    y = rng.integers(0, C, N)
    y[rng.random(N) < 0.2] = -100
    return s.astype(np.float32), t.astype(np.float32), y


@pytest.mark.parametrize("C", [10, 300, 1000, 5000])
@pytest.mark.parametrize("T", [0.05, 1.0, 2.5, 4.0, 50.0])
def test_float32_matches_reference(C, T):
    """float32 against the float64 reference on the float32 inputs: the loss within 1e-5 of the size
    of its terms, the gradient within 1e-5 of max |grad|; rows with -inf classes (the general
    path) and rows without (the fast path, online maxima over blocks of BLOCK values) for every kind."""
    s64, t64, y, _ = make(64, C, C, "float64", unlabeled_fraction=0.2)
    cases = [(s64.astype(np.float32), t64.astype(np.float32), y), finite_rows(64, C, C + 1, T)]
    for s, t, yy in cases:
        for (kind, beta), unlabeled in zip(ALL_KINDS, ("ignore", "soft") * 4):
            kw = dict(T=T, alpha=0.6, kind=kind, beta=beta, unlabeled=unlabeled)
            l32, g32 = softmax_kl(s, t, yy, backend="numba", **kw)
            assert g32.dtype == np.float32
            ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), yy, **kw)
            scale = max(abs(ref), 0.6 * T * T * 1e-3)   # a KL of nearly equal rows cancels to ~0
            assert abs(l32 - ref) <= 1e-5 * scale, (kind, beta, l32, ref)
            assert grad_error(g32, gref) <= 1e-5, (kind, beta)


@pytest.mark.parametrize("C", [2, 10, 32])
@pytest.mark.parametrize("T", [1.0, 2.5, 3.0, 4.0])
def test_short_rows_every_branch(C, T):
    """C <= 32 (kl / ce, float32): the row-transposed kernel over blocks of 128 rows and a partial
    last one (700 rows: parallel at C >= 6; 130 rows: serial), at hard powers 1 (T = 1), 0 (2.5: a
    third exponential), 3 and 4; with alpha 1 (no hard term) and 0 (no soft term); unlabeled rows
    soft or ignored; rows with -inf (leaving the block for the general path), the teacher's alone
    too; a masked row holding NaN (counts nowhere: not inspected). Every entry of out= is written;
    a NaN in a row that counts raises the reference's error with its row."""
    for N in (700, 130):
        s, t, y = finite_rows(N, C, C * N, T)
        mask = np.random.default_rng(N).random(N) < 0.85
        mask[[0, 1, 2, 3, 4, 5, 20, 21, 129]] = True
        mask[200 % N] = False
        s[200 % N, 0] = np.nan
        s[20, 1] = t[20, 1] = -np.inf
        t[21, 0] = -np.inf
        s[129, C - 1] = t[129, C - 1] = -np.inf   # in the second block
        y[[20, 129]] = 0                      # (a label on a -inf class would make the loss +inf)
        for kind, alpha, unlabeled in (("kl", 0.6, "soft"), ("ce", 0.6, "ignore"), ("kl", 1.0, "ignore"),
                                       ("ce", 0.0, "soft")):
            kw = dict(T=T, alpha=alpha, kind=kind, mask=mask, unlabeled=unlabeled)
            out = np.full_like(s, np.nan)
            l32, g32 = softmax_kl(s, t, y, backend="numba", out=out, **kw)
            ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
            assert abs(l32 - ref) <= 1e-5 * max(abs(ref), 1e-3), (N, kind, alpha, l32, ref)
            assert not np.isnan(out).any() and grad_error(out, gref) <= 1e-5, (N, kind, alpha)
            rows, ref_rows = (softmax_kl(s, t, y, backend="numba", reduction="none", **kw)[0],
                              mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, reduction="none",
                                                  **kw)[0])
            assert np.allclose(rows, ref_rows, rtol=1e-5, atol=1e-5 * max(1.0, T * T)), (N, kind, alpha)
        s[N - 3, C // 2] = np.nan
        mask[N - 3] = True
        y[N - 3] = 0                          # (a row that counts)
        with pytest.raises(ValueError, match=f"student: row {N - 3} contains NaN"):
            softmax_kl(s, t, y, T=T, alpha=0.5, mask=mask, backend="numba")


@pytest.mark.parametrize("N", [130, 700])
def test_short_rows_touch_no_row_past_the_end(N):
    """The short-row kernel's last block is partial (130 rows: serial, 700: parallel, blocks of
    128): the rows past N are neither read nor written. student, teacher and out= are views of
    larger buffers: the rows after the student's and teacher's are NaN (read, they would raise or
    spoil the loss), and the rows after out's hold a sentinel; the last row holds -inf (the general path)."""
    C, T = 10, 2.0
    s, t, y = finite_rows(N, C, N, T)
    s[N - 1, 3] = t[N - 1, 3] = -np.inf
    y[N - 1] = 0
    sb, tb = np.full((N + 128, C), np.nan, np.float32), np.full((N + 128, C), np.nan, np.float32)
    sb[:N], tb[:N] = s, t
    for kind, alpha in (("kl", 0.6), ("ce", 0.6), ("kl", 1.0)):
        kw = dict(T=T, alpha=alpha, kind=kind, unlabeled="soft")
        ob = np.full((N + 128, C), 7.0, np.float32)
        loss, g = softmax_kl(sb[:N], tb[:N], y, backend="numba", out=ob[:N], **kw)
        ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
        assert np.all(ob[N:] == 7.0), (kind, alpha)
        assert abs(loss - ref) <= 1e-5 * abs(ref) and grad_error(ob[:N], gref) <= 1e-5, (kind, alpha)


@pytest.mark.parametrize("T", [2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0])
def test_float32_hard_term_from_powers_of_the_tempered_exponentials(T):
    """At an integer T in 2..8 the fast path takes e^(s - ms) = es^T by multiplications (9: a third
    exponential): every power against the reference, at the label entries too."""
    s, t, y = finite_rows(64, 1200, 11, T)
    kw = dict(T=T, alpha=0.3, unlabeled="soft")
    l32, g32 = softmax_kl(s, t, y, backend="numba", **kw)
    ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
    assert abs(l32 - ref) <= 1e-5 * abs(ref) and grad_error(g32, gref) <= 1e-5


@pytest.mark.parametrize("where", ["first block", "last block"])
@pytest.mark.parametrize("value, who, what", [(np.nan, "student", "contains NaN"),
                                              (np.inf, "teacher", "contains \\+inf")])
def test_float32_bad_values_in_any_block_raise_the_reference_error(where, value, who, what):
    """The fast path's finiteness check (a sum of 0 x) sees NaN and +inf in every block; the row
    then takes the general path, which flags it, and the reference's error is raised."""
    s, t, y = finite_rows(8, 1500, 3, 2.0)
    (s if who == "student" else t)[5, 3 if where == "first block" else 1400] = value
    with pytest.raises(ValueError, match=f"{who}: row 5 {what}"):
        softmax_kl(s, t, y, T=2.0, alpha=0.5, backend="numba")


@pytest.mark.parametrize("C", [300, 1500, 2600])   # one block, two, three (C >= FUSE_FROM)
def test_float32_neg_inf_in_a_later_block_takes_the_general_path(C):
    """-inf classes are legal: a row whose -inf appears after the fast path has measured blocks
    leaves it for the general path, with the reference's result (the general path reuses the row
    buffers the fast path had filled; the fast rows before and after it are complete: the previous
    row's gradient, written inside this row's first pass, is finished from the buffers first, from
    whichever block this row left at; rows that count nowhere leave it pending)."""
    s, t, y = finite_rows(64, C, 4, 3.0)   # 4 rows a chunk: fast and general rows in one chunk
    y[y < 0] = 7               # every row counts
    s[2, C - 300] = t[2, C - 300] = -np.inf   # the last block
    t[3, C - 200] = -np.inf    # the teacher alone: kl is fine, the student keeps mass there
    s[6, 40] = t[6, 40] = -np.inf   # the first block, past the classes the running maxima start from
    t[9, 0] = -np.inf          # the first class (the teacher alone)
    mask = np.ones(64, bool)
    mask[[12, 13, 14]] = False   # rows that count nowhere between a pending row and the next
    for kind, beta in ALL_KINDS:
        if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
            continue           # +inf where the teacher has no mass: test_reverse_kl_of_a_teacher_without_mass
        kw = dict(T=3.0, alpha=0.5, kind=kind, beta=beta, mask=mask)
        out = np.full_like(s, np.nan)   # every entry must be written (the previous row's gradient too)
        l32, g32 = softmax_kl(s, t, y, backend="numba", out=out, **kw)
        ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
        assert abs(l32 - ref) <= 1e-5 * abs(ref) and grad_error(g32, gref) <= 1e-5


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_float32_rows_start_from_the_previous_rows_maxima_within_the_reach(T):
    """A fast row's running maxima start from its first classes' maxima raised toward the previous
    row's, by at most the reach: rows far below the previous one (120 logits: started from the
    previous row's maxima, the row's e^(s - m) would all underflow), far above it (the block is
    redone), and alike (the raised start saves the redo) all give the reference's result."""
    rng = np.random.default_rng(21)
    N, C = 24, 1500                          # two blocks a row (C >= FUSE_FROM: the fused rows)
    shift = np.where(np.arange(N) % 6 < 3, 60.0, -60.0)[:, None]   # runs of 3 rows alike, then a jump
    s = (rng.standard_normal((N, C)) * 3 + shift).astype(np.float32)
    t = (rng.standard_normal((N, C)) * 3 + shift).astype(np.float32)
    y = rng.integers(0, C, N)
    for kind in ("kl", "ce"):
        kw = dict(T=T, alpha=0.6, kind=kind)
        l32, g32 = softmax_kl(s, t, y, backend="numba", **kw)
        ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
        assert abs(l32 - ref) <= 1e-5 * abs(ref) and grad_error(g32, gref) <= 1e-5, (kind, l32, ref)


def test_reverse_kl_of_a_teacher_without_mass():
    """Reverse KL where the teacher has no mass on a class the student has: the reference's +inf
    loss for that row and a gradient that is not finite there, other rows untouched."""
    rng = np.random.default_rng(8)
    for dtype in (np.float64, np.float32):
        s, t = rng.standard_normal((5, 700)).astype(dtype), rng.standard_normal((5, 700)).astype(dtype)
        t[2, 11] = -np.inf
        y = rng.integers(0, 700, 5)
        kw = dict(T=2.0, alpha=0.5, kind="reverse_kl", reduction="none")
        loss, grad = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
        kloss, kgrad = softmax_kl(s, t, y, backend="numba", **kw)
        assert np.isinf(kloss[2]) and np.isinf(loss[2])
        np.testing.assert_array_equal(np.isfinite(kgrad).all(1), np.isfinite(grad).all(1))
        ok = [0, 1, 3, 4]
        np.testing.assert_allclose(kloss[ok], loss[ok], rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tvd_ties_take_the_zero_subgradient(dtype):
    """TVD's kink: where p_c = q_c exactly, sign(0) = 0 (the reference's subgradient). Rows whose
    probabilities are exactly 1/3 or 0 tie bit for bit in both implementations (random rows never
    tie; where permuted logits tie only up to rounding, which side of the kink a class is taken on
    depends on the last bit of p and q, in the reference as here)."""
    s = np.array([[0, 0, -np.inf, 0, -np.inf], [1, 0, 0, -np.inf, 0]], dtype)
    t = np.array([[0, -np.inf, 0, 0, -np.inf], [-np.inf, 0, 0, 0, 0]], dtype)
    kw = dict(T=1.0, alpha=1.0, kind="tvd", unlabeled="soft", reduction="none")
    loss, grad = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), None, **kw)
    kloss, kgrad = softmax_kl(s, t, None, backend="numba", **kw)
    assert abs(grad[0, 0] + 1 / 18) < 1e-15          # a tied class: p_k (P- - P+) / 2 = -(1/3)(1/3)/2
    tol = 1e-15 if dtype == np.float64 else 1e-7
    np.testing.assert_allclose(kgrad, grad, rtol=0, atol=tol)
    np.testing.assert_allclose(kloss, loss, rtol=tol)


@pytest.mark.parametrize("C", [10, 1000, 3000])
@pytest.mark.parametrize("kind, beta", ALL_KINDS, ids=KIND_IDS)
def test_bfloat16_logits(C, kind, beta):
    """bfloat16 logits (ml_dtypes, read through their uint16 bits): the loss within 1e-5 of the
    float64 reference on the same (bfloat16-rounded) values; the gradient as bfloat16 within 1e-2
    of max |grad| (one rounding to 8 bits: 2^-9 relative), or into a float32 out= within 1e-5."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    s64, t64, y = finite_rows(48, C, C, 2.0)
    s64[7, 3] = t64[7, 3] = -np.inf             # one row on the general path
    s, t = s64.astype(ml_dtypes.bfloat16), t64.astype(ml_dtypes.bfloat16)
    kw = dict(T=2.0, alpha=0.7, kind=kind, beta=beta, unlabeled="soft")
    ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
    loss, grad = softmax_kl(s, t, y, backend="numba", **kw)
    assert grad.dtype == ml_dtypes.bfloat16 and grad.shape == s.shape
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    assert grad_error(grad, gref) <= 1e-2
    out = np.empty(s.shape, np.float32)
    loss32, g = softmax_kl(s, t, y, backend="numba", out=out, **kw)
    assert g is out and loss32 == loss and grad_error(out, gref) <= 1e-5
    # the bfloat16 gradient is the float32 one rounded once, to nearest even
    np.testing.assert_array_equal(grad.view(np.uint16), out.astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("C", [1024, 2600])
def test_streamed_gradient_at_every_alignment(C, dtype):
    """From C = STREAM_FROM on, the gradient is streamed (non-temporal stores from each block's first
    64-byte boundary, plain stores around them). Into out= views of a larger NaN-filled buffer that
    start 0..31 elements past a 64-byte boundary (float32 and bfloat16 out): the gradient equals the
    reference, every element of it is written, nothing before or after it; the label's entry in
    every block position; a row with -inf (the general path) between streamed rows."""
    from minikd.kernels.numba_cpu import BLOCK, STREAM_FROM
    assert C >= STREAM_FROM
    ml_dtypes = pytest.importorskip("ml_dtypes")
    s, t, y = finite_rows(12, C, C, 2.0)
    edges = [BLOCK - 1, BLOCK] if C > BLOCK else [C - 2, 1]
    y[:6] = [0, *edges, C - 1, C - 7, C // 2 + 1]   # the label at the blocks' edges
    s[8, 5] = t[8, 5] = -np.inf
    if dtype == "bfloat16":
        s, t = s.astype(ml_dtypes.bfloat16), t.astype(ml_dtypes.bfloat16)
    kw = dict(T=2.0, alpha=0.7)
    ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, **kw)
    loss0, g0 = softmax_kl(s, t, y, backend="numba", **kw)
    for out_dtype in (np.float32, s.dtype):
        size = np.dtype(out_dtype).itemsize
        for lead in range(64 // size):
            buf = np.full(s.size + 64 + 2 * 64 // size, np.nan, np.float32).astype(out_dtype)
            start = (-buf.ctypes.data % 64) // size + lead
            out = buf[start:start + s.size].reshape(s.shape)
            loss, g = softmax_kl(s, t, y, backend="numba", out=out, **kw)
            assert g is out and loss == loss0
            around = np.concatenate([buf[:start], buf[start + s.size:]]).astype(np.float32)
            assert np.isnan(around).all()   # nothing before or after the gradient written
            tol = 1e-5 if out_dtype == np.float32 else 1e-2
            assert grad_error(out.astype(np.float64), gref) <= tol, (lead, out_dtype)
            if out_dtype == g0.dtype:
                np.testing.assert_array_equal(out.view(np.uint8), g0.view(np.uint8))


def test_stream_row_against_plain_stores():
    """stream_row, the streamed stores themselves, against plain assignment: every destination
    alignment (0..15 elements past a 64-byte boundary), block starts and lengths around the vector
    width (0, 1, 15, 16, 17, 31, 32, 33, 64, 500), float32 and uint16 (bfloat16 bits); nothing
    outside out[i, c0:c0 + n] is touched."""
    from minikd.kernels.stream import store_fence, stream_row
    from numba import njit

    @njit
    def run(out, i, c0, n, g):
        stream_row(out, i, c0, n, g)
        store_fence()

    rng = np.random.default_rng(5)
    for dtype, fill in ((np.float32, np.float32(-7.5)), (np.uint16, np.uint16(0xBEEF))):
        C = 600
        for lead in range(16):
            buf = np.full(3 * C + 64, fill, dtype)
            start = (-buf.ctypes.data % 64) // buf.itemsize + lead
            out = buf[start:start + 3 * C].reshape(3, C)
            for c0 in (0, 1, 13, 16, 64):
                for n in (0, 1, 15, 16, 17, 31, 32, 33, 64, 500):
                    out[...] = fill
                    g = rng.integers(0, 1000, n).astype(dtype)
                    run(out, np.uint64(1), np.uint64(c0), n, g)
                    want = np.full((3, C), fill, dtype)
                    want[1, c0:c0 + n] = g
                    np.testing.assert_array_equal(out, want, err_msg=f"{dtype} lead {lead} c0 {c0} n {n}")
                    assert (buf[:start] == fill).all() and (buf[start + 3 * C:] == fill).all()


def test_same_input_same_bits():
    """Deterministic: the same input gives the same bits (for a given thread count), in loss and
    gradient, on both paths."""
    s, t, y = finite_rows(256, 3000, 9, 4.0)
    s[::7, 5] = -np.inf
    t[::7, 5] = -np.inf
    a = softmax_kl(s, t, y, T=4.0, alpha=0.7, backend="numba")
    b = softmax_kl(s, t, y, T=4.0, alpha=0.7, backend="numba")
    assert a[0] == b[0] and np.array_equal(a[1].view(np.uint32), b[1].view(np.uint32))


def test_in_place_and_out():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((32, 50)), rng.standard_normal((32, 50))
    y = rng.integers(0, 50, 32)
    ref_loss, ref_grad = mk.kd_loss_and_grad(s, t, y, T=3.0, alpha=0.5)
    out = np.empty_like(s)
    loss, g = softmax_kl(s, t, y, T=3.0, alpha=0.5, out=out, backend="numba")
    assert g is out and np.allclose(out, ref_grad, rtol=1e-12, atol=1e-16)
    s2 = s.copy()
    loss2, g2 = softmax_kl(s2, t, y, T=3.0, alpha=0.5, out=s2, backend="numba")
    assert g2 is s2 and np.allclose(s2, ref_grad, rtol=1e-12, atol=1e-16) and abs(loss2 - ref_loss) < 1e-12
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match="out: expected shape"):
            softmax_kl(s, t, y, T=3.0, alpha=0.5, out=np.empty((2, 2)), backend=backend)


BACKENDS_CPU = ("numpy", "numba", "auto")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("C", [12, 100, 1500])   # float32: the short-row kernel, the row kernel (two blocks)
def test_exactly_in_place_matches_reference(backend, dtype, C):
    """out=student (the same array, or a view with its data pointer, shape and strides) is the
    one overlap allowed, also for a student that is not contiguous: each row's student entries
    (the label's among them) are read before its gradient is written."""
    rng = np.random.default_rng(2)
    wide = (3 * rng.standard_normal((300, 2 * C))).astype(dtype)
    t = (3 * rng.standard_normal((300, C))).astype(dtype)
    y = rng.integers(0, C, 300)
    ref_loss, ref_grad = mk.kd_loss_and_grad(wide[:, :C].astype(np.float64), t.astype(np.float64), y,
                                             T=2.0, alpha=0.5)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for make_student in (lambda: wide[:, :C].copy(), lambda: wide.copy()[:, :C]):
        s = make_student()
        for out in (s, s[:]):
            s[...] = wide[:, :C]
            loss, g = softmax_kl(s, t, y, T=2.0, alpha=0.5, out=out, backend=backend)
            assert g is out and np.max(np.abs(s - ref_grad)) <= tol * np.max(np.abs(ref_grad))
            assert abs(loss - ref_loss) <= tol * abs(ref_loss)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_out_overlapping_an_input_is_refused(backend):
    """out over other rows of the student (the Numba kernel once wrote row i's gradient over row
    i + 1 before reading it: a gradient 15% off, silently) or over the teacher is refused before
    any work: the inputs are left as they were."""
    rng = np.random.default_rng(3)
    N, C = 200, 10
    buf = rng.standard_normal((N + 1, C))
    s, t, y = buf[:-1], rng.standard_normal((N, C)), rng.integers(0, C, N)
    before = buf.copy(), t.copy()
    for out, name in ((buf[1:], "student"), (s[::-1], "student"), (t, "teacher"), (t[::-1], "teacher")):
        with pytest.raises(ValueError, match=f"out: overlaps the memory of {name}; pass an array"):
            softmax_kl(s, t, y, T=2.0, alpha=0.5, out=out, backend=backend)
        assert np.array_equal(buf, before[0]) and np.array_equal(t, before[1])
    with pytest.raises(ValueError, match="out: overlaps the memory of teacher"):   # student is teacher
        softmax_kl(s, s, y, T=2.0, alpha=0.5, out=s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_out_not_an_array_or_read_only_is_refused(backend):
    s, t, y = np.zeros((3, 4)), np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(TypeError, match="out: expected a NumPy or CuPy array, got list"):
        softmax_kl(s, t, y, T=1.0, alpha=0.5, out=np.zeros((3, 4)).tolist(), backend=backend)
    read_only = np.zeros((3, 4))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        softmax_kl(s, t, y, T=1.0, alpha=0.5, out=read_only, backend=backend)
    with pytest.raises(ValueError, match="out: the array is read-only"):   # in place over a read-only student
        softmax_kl(read_only, t, y, T=1.0, alpha=0.5, out=read_only, backend=backend)


def _array_likes():
    s, y = np.zeros((3, 4)), np.array([0, 1, 2])
    return [
        ("student list", (s.tolist(), s, y), {}),
        ("teacher tuple", (s, tuple(map(tuple, s)), y), {}),
        ("labels list", (s, s, [0, 1, 2]), {}),
        ("labels tuple", (s, s, (0, 1, 2)), {}),
        ("labels float", (s, s, y.astype(np.float64)), {}),
        ("labels bool", (s, s, y > 0), {}),
        ("mask list", (s, s, y), dict(mask=[True, False, True])),
        ("student int", (np.zeros((3, 4), np.int64), s, y), {}),
        ("student 1-D", (np.zeros(4), np.zeros(4), y), {}),
    ]


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("what, args, kw", _array_likes(), ids=[c[0] for c in _array_likes()])
def test_array_likes_refused_as_the_reference_refuses_them(backend, what, args, kw):
    """Lists, tuples and wrong dtypes: the reference's error, word for word, on every backend
    (the Numba backend once gave Numba's typing error, or an AttributeError)."""
    with pytest.raises((TypeError, ValueError)) as ref:
        mk.kd_loss_and_grad(*args, T=1.0, alpha=0.5, **kw)
    with pytest.raises(type(ref.value)) as got:
        softmax_kl(*args, T=1.0, alpha=0.5, backend=backend, **kw)
    assert str(got.value) == str(ref.value)
    assert str(ref.value).split(":")[0] in ("student", "teacher", "labels", "mask")


def test_each_kernel_refuses_the_other_device():
    """CuPy arrays to the Numba kernel, NumPy arrays to the CuPy kernel: a TypeError saying so
    (the CuPy one before CuPy is imported: a NumPy user may not have it)."""
    import fake_cupy
    s = np.zeros((3, 4), np.float32)
    y = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="student: the CuPy kernel takes CuPy arrays, got numpy.ndarray"):
        softmax_kl(s, s, y, T=1.0, alpha=0.5, backend="cupy")
    S = s.view(fake_cupy.ndarray)
    with pytest.raises(TypeError, match="student: the Numba kernel takes NumPy arrays, got a CuPy array"):
        softmax_kl(S, S, y, T=1.0, alpha=0.5, backend="numba")


@pytest.mark.parametrize("args, exc, msg", [
    (dict(reduction="mean"), ValueError, "divides by N\\*C"),
    (dict(alpha=0.5, labels=None), ValueError, "labels: required"),
    (dict(T=-1.0), ValueError, "T: the temperature"),
    (dict(backend="tpu"), ValueError, "backend: expected"),
])
def test_same_errors_as_reference(args, exc, msg):
    s = np.zeros((3, 4))
    kw = dict(labels=np.array([0, 1, 2]), T=1.0, alpha=0.5, backend="numba")
    kw.update(args)
    labels = kw.pop("labels")
    with pytest.raises(exc, match=msg):
        softmax_kl(s, s, labels, **kw)
    t = s.copy()
    t[1, 2] = np.nan
    with pytest.raises(ValueError, match="teacher: row 1 contains NaN"):
        softmax_kl(s, t, np.array([0, 1, 2]), T=1.0, alpha=0.5, backend="numba")


def test_exp_over_its_whole_range():
    from minikd.kernels.fastexp import EXP_MAX, EXP_MIN, exp_f32_array
    x = np.linspace(EXP_MIN, EXP_MAX, 2_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(np.random.default_rng(0).uniform(EXP_MIN, EXP_MAX, 1_000_000))])
    ref = np.exp(x.astype(np.float64))
    got = exp_f32_array(x, np.empty_like(x))
    assert np.max(np.abs(got - ref) / ref) <= 1.5e-7
    neg = x[x <= 0]
    got = exp_f32_array(neg, np.empty_like(neg), True)
    assert np.max(np.abs(got - np.exp(neg.astype(np.float64))) / np.exp(neg.astype(np.float64))) <= 1.5e-7
    special = np.array([-np.inf, -1e4, -87.4, 0.0, 88.8, np.inf, np.nan], np.float32)
    got = exp_f32_array(special, np.empty_like(special))
    np.testing.assert_array_equal(got[:4], [0, 0, 0, 1])
    assert got[4] == np.inf and got[5] == np.inf and np.isnan(got[6])
    got = exp_f32_array(special[:4], np.empty(4, np.float32), True)
    np.testing.assert_array_equal(got, [0, 0, 0, 1])


def test_exp2_fast_over_its_range():
    """The fast rows' 2^v (v <= 0 finite): relative error <= 3e-7 down to 2^-126 (the degree-5
    polynomial evaluated in float32); below, within 1.2e-38 of the exact value."""
    from minikd.kernels.fastexp import exp2_fast_array
    v = np.linspace(-126, 0, 2_000_001, dtype=np.float32)
    v = np.concatenate([v, np.random.default_rng(1).uniform(-126, 0, 1_000_000), [0.0, -0.5, -1.0]]).astype(np.float32)
    ref = np.exp2(v.astype(np.float64))
    got = exp2_fast_array(v, np.empty_like(v))
    assert np.max(np.abs(got - ref) / ref) <= 3e-7
    deep = np.array([-126.5, -140.0, -1e4, -3e38], np.float32)
    assert np.all(np.abs(exp2_fast_array(deep, np.empty_like(deep)) - np.exp2(deep.astype(np.float64))) <= 1.2e-38)


def test_auto_backend():
    from minikd.kernels import resolve_backend
    assert resolve_backend("auto", np.zeros((1, 2))) == "numba"


def test_interpreted_logic_without_jit():
    """The same kernel with NUMBA_DISABLE_JIT=1 (pure Python) on a small case."""
    code = ("import numpy as np, minikd as mk; from minikd.kernels import softmax_kl;"
            "r=np.random.default_rng(0); s=r.standard_normal((4,6)); t=r.standard_normal((4,6));"
            "s[1,2]=t[1,2]=-np.inf; y=np.array([0,1,3,-100]);"
            "a=mk.kd_loss_and_grad(s,t,y,T=2.0,alpha=0.5); b=softmax_kl(s,t,y,T=2.0,alpha=0.5,backend='numba');"
            "assert abs(a[0]-b[0])<1e-13 and np.abs(a[1]-b[1]).max()<1e-15; print('ok')")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_portable_form_without_avx512(tmp_path):
    """The kernel compiled for a CPU without AVX-512 (NUMBA_CPU_NAME=haswell): exp2_fast's portable
    form, which clamps its argument, so the fast rows check their inputs themselves (the sum of
    0 x). NaN and +inf in a later block still raise, -inf still takes the general path, and the
    float32 results still match the reference, on long and short rows."""
    code = """if True:
        import numpy as np, minikd as mk, pytest
        from minikd.kernels import fastexp, softmax_kl
        assert not fastexp.SCALEF and not fastexp.EXP2_PROPAGATES
        r = np.random.default_rng(0)
        for C in (1200, 10):
            s = (r.standard_normal((40, C)) * 3).astype(np.float32)
            t = (r.standard_normal((40, C)) * 3).astype(np.float32)
            y = r.integers(0, C, 40)
            s[3, C - 2] = t[3, C - 2] = -np.inf
            y[3] = 0
            l, g = softmax_kl(s, t, y, T=2.0, alpha=0.6, backend="numba")
            ref, gref = mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), y, T=2.0, alpha=0.6)
            assert abs(l - ref) <= 1e-5 * abs(ref) and np.abs(g - gref).max() <= 1e-5 * np.abs(gref).max()
            for bad, who in ((np.nan, "student"), (np.inf, "teacher")):
                x, z = s.copy(), t.copy()
                (x if who == "student" else z)[7, C - 1] = bad
                with pytest.raises(ValueError, match=f"{who}: row 7 contains"):
                    softmax_kl(x, z, y, T=2.0, alpha=0.6, backend="numba")
        print("ok")
    """
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.parametrize("C", [2, 10, 1000, 128256])
def test_sum_of_logs_by_products(C):
    from minikd.kernels import sum_of_logs
    rng = np.random.default_rng(C)
    x = np.exp(rng.uniform(-np.log(C), np.log(C), 10_007))   # the range of the row statistics
    x[:5] = [1.0 / C, C, 1.0, C, 1.0 / C]
    ref = np.log(x).sum()
    assert abs(sum_of_logs(x, C) - ref) <= 1e-12 * np.abs(np.log(x)).sum()
