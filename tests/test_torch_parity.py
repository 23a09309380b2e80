"""Values and gradients equal PyTorch autograd in float64 (skipped without torch)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import relative_error
from minikd.testing import kd_cases, logits, shapes, temperatures, upstreams

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL = 1e-10


@given(st.data())
def test_log_softmax(data):
    shape = data.draw(shapes())
    x = data.draw(logits(shape, neg_inf=False))
    T = data.draw(temperatures())
    g = data.draw(upstreams(shape))
    X = torch.tensor(x, requires_grad=True)
    Y = F.log_softmax(X / T, dim=-1)
    Y.backward(torch.tensor(g))
    y, cache = mk.log_softmax_forward(x, T)
    assert relative_error(y, Y.detach().numpy()) <= RTOL
    assert relative_error(mk.log_softmax_backward(g, cache), X.grad.numpy()) <= RTOL


def torch_kd(case):
    """The KD loss written the usual PyTorch way on the valid rows."""
    C = case.student.shape[-1]
    s = torch.tensor(case.student.reshape(-1, C), requires_grad=True)
    t = torch.tensor(case.teacher.reshape(-1, C))
    n = s.shape[0]
    valid = torch.ones(n, dtype=torch.bool)
    y = torch.zeros(n, dtype=torch.long)
    has_label = torch.zeros(n, dtype=torch.bool)
    if case.labels is not None:
        y = torch.tensor(case.labels.reshape(-1))
        has_label = y != -100
        if case.unlabeled == "ignore":   # "soft": unlabeled rows keep the distillation term
            valid &= has_label
    if case.mask is not None:
        valid &= torch.tensor(case.mask.reshape(-1))
    log_p = F.log_softmax(s / case.T, dim=-1)
    log_q = {"logits": lambda: F.log_softmax(t / case.T, dim=-1),
             "probs": lambda: torch.log(t), "log_probs": lambda: t}[case.teacher_as]()
    tau = case.T**2 if case.scale_t2 else 1.0
    if case.kind == "kl":
        soft = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        soft = F.cross_entropy(s / case.T, log_q.exp(), reduction="none")
    rows = case.alpha * tau * soft
    if case.alpha < 1:
        ce = F.cross_entropy(s, torch.where(has_label, y, 0), reduction="none")
        rows = rows + (1 - case.alpha) * torch.where(has_label, ce, 0.0)
    rows = torch.where(valid, rows, 0.0)
    if case.reduction == "batchmean":
        if case.kind == "kl" and case.alpha == 1:  # the framework's own batchmean where it applies
            loss = F.kl_div(log_p[valid], log_q[valid], log_target=True, reduction="batchmean") * tau \
                if valid.any() else rows.sum()
        else:
            loss = rows.sum() / max(int(valid.sum()), 1)
    elif case.reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows
    return s, loss


@given(kd_cases(neg_inf=False), st.integers(0, 2**32 - 1))
def test_kd_loss_and_gradient(case, seed):
    s, loss = torch_kd(case)
    kw = case.options()
    ours, cache = mk.kd_forward(case.student, case.teacher, case.labels, **kw)
    if case.reduction == "none":
        g = np.random.default_rng(seed).standard_normal(ours.shape)
        loss.backward(torch.tensor(g.reshape(-1)))
    else:
        g = 1.0
        loss.backward()
    tau = case.T**2 if case.scale_t2 else 1.0
    n = max(int(cache.valid.sum()), 1)
    per_row = 1.0 / n if case.reduction == "batchmean" else 1.0
    loss_scale = (case.alpha * tau * np.log(case.student.shape[-1] + 1) + 1 - case.alpha) * \
        (n if case.reduction == "sum" else 1)
    grad_scale = (case.alpha * tau / case.T + 1 - case.alpha) * per_row * np.max(np.abs(g))
    assert relative_error(ours, loss.detach().numpy().reshape(np.shape(ours)), loss_scale) <= RTOL
    assert relative_error(mk.kd_backward(g, cache), s.grad.numpy().reshape(case.student.shape), grad_scale) <= RTOL


def test_torch_kl_div_gives_nan_on_neg_inf_targets_where_minikd_gives_zero():
    """A documented difference: padded classes (-inf) make torch's kl_div NaN (0 * -inf)."""
    s = np.array([[0.5, 1.0, -np.inf]])
    t = np.array([[0.2, 0.1, -np.inf]])
    torch_val = F.kl_div(F.log_softmax(torch.tensor(s), -1), F.log_softmax(torch.tensor(t), -1),
                         log_target=True, reduction="batchmean")
    assert torch.isnan(torch_val)
    ours = mk.kd_loss(s, t, T=1.0, alpha=1.0)
    ref = mk.kd_loss(s[:, :2], t[:, :2], T=1.0, alpha=1.0)
    assert np.isfinite(ours) and abs(ours - ref) <= 1e-15
