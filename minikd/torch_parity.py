"""The losses against PyTorch autograd (floor 4): what ``minikd verify`` runs.

Each loss is written here the way a PyTorch user writes it (``F.kl_div(log_target=True)``,
``F.cross_entropy``, ``F.mse_loss``, the RKD authors' ``pdist`` / ``F.normalize`` / ``bmm`` code), run
in float64 on seeded random cases, and compared with minikd's value and hand-derived gradient. The
table gives the worst relative error per loss; use it to check a framework install, or copy a
reference function to check your own implementation against minikd.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .gradcheck import relative_error
from .losses import hint_backward, hint_forward, kd_backward, kd_forward, mutual_backward, mutual_forward
from .losses.relational import RKD_TERMS

__all__ = ["VerifyRow", "run_all", "reference_divergence", "reference_dkd_terms", "reference_topk", "reference_pdist", "reference_rkd_distance", "reference_rkd_angle"]


class VerifyRow(NamedTuple):
    op: str
    cases: int
    value_rel: float
    grad_rel: float


def reference_divergence(torch, kind, log_p, log_q, beta=None):
    """The soft term per row as PyTorch code writes it: F.kl_div for the KLs (its input is the log
    of the second argument of KL), TRL's generalized JSD (the mixture's log by logsumexp over
    log p + log(1 - beta) and log q + log beta, KL(q||m) and KL(p||m) by F.kl_div), Liger's TVD."""
    F = torch.nn.functional
    if kind == "kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    if kind == "ce":
        return -(log_q.exp() * log_p).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if kind == "jsd":
        b = torch.tensor(beta, dtype=log_p.dtype)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-b), log_q + torch.log(b)]), dim=0)
        kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
        kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
        return beta * kl_q + (1 - beta) * kl_p
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(kind)


def reference_dkd_terms(torch, S, Tt, y, T, log_target=False):
    """(TCKD, NCKD) as mdistiller defines them (its DKD.py, reimplemented from the definition): masks of
    the target and of the other classes, the binary distributions as masked sums of the tempered
    softmaxes and their torch.log, NCKD from softmaxes of the logits / T with 1000 subtracted at the
    target, F.kl_div summed, times T^2, divided by the batch size.

    ``log_target=True`` gives the teacher to F.kl_div as log-probabilities: the same values, but an
    autograd teacher gradient. With probabilities (mdistiller's way, its teacher under no_grad) that
    gradient is NaN: the masked target's teacher probability exp(-1000) is exactly 0, and
    d(q log q)/dq = log q + 1 = -inf there meets the softmax Jacobian's 0."""
    F = torch.nn.functional
    target = F.one_hot(y, S.shape[1]).to(S.dtype)
    other = 1 - target

    def binary(logits):
        pr = F.softmax(logits / T, dim=1)
        return torch.stack([(pr * target).sum(1), (pr * other).sum(1)], dim=1)
    b_q = binary(Tt)
    tckd = F.kl_div(torch.log(binary(S)), torch.log(b_q) if log_target else b_q, reduction="sum",
                    log_target=log_target)
    teacher_rest = (F.log_softmax if log_target else F.softmax)(Tt / T - 1000.0 * target, dim=1)
    log_p_rest = F.log_softmax(S / T - 1000.0 * target, dim=1)
    nckd = F.kl_div(log_p_rest, teacher_rest, reduction="sum", log_target=log_target)
    return tckd * T**2 / y.shape[0], nckd * T**2 / y.shape[0]


def _dkd_cases(torch, rng):
    """DKD against mdistiller's formulation (``reference_dkd_terms``), where its -1000 target
    masking does not matter (moderate logits)."""
    from .losses import dkd_backward, dkd_forward  # noqa: PLC0415
    for T, (a, b) in zip((1.0, 4.0), ((1.0, 8.0), (0.5, 2.0))):
        s, t, y = rng.standard_normal((16, 10)) * 3, rng.standard_normal((16, 10)) * 3, rng.integers(0, 10, 16)
        S = torch.tensor(s, requires_grad=True)
        tckd, nckd = reference_dkd_terms(torch, S, torch.tensor(t), torch.tensor(y), T)
        L = a * tckd + b * nckd
        L.backward()
        value, cache = dkd_forward(s, t, y, T=T, alpha_tckd=a, beta_nckd=b)
        yield "dkd", value, L.item(), dkd_backward(1.0, cache), S.grad.numpy()


def reference_topk(torch, S, idx, V, T, variant, values_as="logits"):
    """The top-k soft term per row as sparse-teacher code writes it (DistillKit's gather): the
    student's log_softmax over the full vocabulary gathered at the teacher's ids; the teacher's
    logits softmaxed over its ids (``values_as="logits"``) or its log-probabilities at T used as given,
    the tail 1 - sum exp(v); "renormalized" takes log_softmax of the gathered student logits and of
    the values, "tail" adds q_t log(q_t / p_t) with p_t = 1 - sum of the gathered student probabilities."""
    F = torch.nn.functional
    log_q = F.log_softmax(V / T, -1) if values_as == "logits" else V
    if variant == "renormalized":
        lq = F.log_softmax(log_q, -1)
        return (lq.exp() * (lq - F.log_softmax(S.gather(-1, idx) / T, -1))).sum(-1)
    log_p = F.log_softmax(S / T, -1).gather(-1, idx)
    D = (log_q.exp() * (log_q - log_p)).sum(-1)
    if variant == "tail":
        q_t, p_t = 1 - log_q.exp().sum(-1), 1 - log_p.exp().sum(-1)
        D = D + q_t * (torch.log(q_t) - torch.log(p_t))
    return D


def _topk_cases(torch, rng):
    """A top-k teacher (k = 4 of 12, kd_forward with mk.TopK) against ``reference_topk``; the gradient
    compared is the student's and the values', concatenated."""
    from .losses import TopK, topk_from_dense  # noqa: PLC0415
    F = torch.nn.functional
    for variant in ("gather", "renormalized", "tail"):
        for values_as, T in (("logits", 2.0), ("log_probs", 1.0), ("log_probs", 4.0)):
            s, t = rng.standard_normal((16, 12)) * 2, rng.standard_normal((16, 12)) * 2
            idx, v = topk_from_dense(t, 4, T)
            if values_as == "logits":
                v = np.take_along_axis(t, idx, -1)
            y = rng.integers(0, 12, 16)
            y[3] = -100
            alpha = float(rng.uniform(0.1, 0.9))
            S, V = torch.tensor(s, requires_grad=True), torch.tensor(v, requires_grad=True)
            Y = torch.tensor(y)
            labeled = Y != -100
            soft = reference_topk(torch, S, torch.tensor(idx), V, T, variant, values_as)
            hard = torch.where(labeled, F.cross_entropy(S, torch.where(labeled, Y, 0), reduction="none"), 0.0)
            L = (alpha * T * T * soft + (1 - alpha) * hard).sum() / 16
            L.backward()
            value, cache = kd_forward(s, TopK(idx, v, values_as, None, variant), y, T=T, alpha=alpha, unlabeled="soft")
            ds, dv = kd_backward(1.0, cache, teacher_grad=True)
            yield "topk", value, L.item(), np.concatenate([ds.ravel(), dv.ravel()]), \
                np.concatenate([S.grad.numpy().ravel(), V.grad.numpy().ravel()])


def _kd_cases(torch, rng):
    F = torch.nn.functional
    for kind in ("kl", "ce", "reverse_kl", "jsd", "tvd"):
        beta = 0.3 if kind == "jsd" else None
        for reduction in ("batchmean", "sum"):
            for T, unlabeled in zip((0.5, 1.0, 4.0, 20.0), ("ignore", "soft", "ignore", "soft")):
                s, t = rng.standard_normal((16, 10)) * 3, rng.standard_normal((16, 10)) * 3
                y = rng.integers(0, 10, 16)
                y[0] = y[5] = -100
                alpha = float(rng.uniform(0.1, 0.9))
                S = torch.tensor(s, requires_grad=True)
                Y = torch.tensor(y)
                labeled = Y != -100
                # unlabeled="soft": rows without a label keep the distillation term (the transfer set)
                counts = labeled if unlabeled == "ignore" else torch.ones_like(labeled)
                log_p, log_q = F.log_softmax(S / T, -1), F.log_softmax(torch.tensor(t) / T, -1)
                soft = reference_divergence(torch, kind, log_p, log_q, beta)
                hard = torch.where(labeled, F.cross_entropy(S, torch.where(labeled, Y, 0), reduction="none"), 0.0)
                rows = torch.where(counts, alpha * T * T * soft + (1 - alpha) * hard, 0.0)
                L = rows.sum() / counts.sum() if reduction == "batchmean" else rows.sum()
                L.backward()
                value, cache = kd_forward(s, t, y, T=T, alpha=alpha, kind=kind, reduction=reduction,
                                          unlabeled=unlabeled, beta=beta)
                yield ("kd_loss" if kind in ("kl", "ce") else kind), value, L.item(), kd_backward(1.0, cache), \
                    S.grad.numpy()


def _hint_cases(torch, rng):
    F = torch.nn.functional
    for reduction in ("mean", "sum"):
        s, t = rng.standard_normal((8, 12)), rng.standard_normal((8, 12))
        S = torch.tensor(s, requires_grad=True)
        L = F.mse_loss(S, torch.tensor(t), reduction=reduction)
        L.backward()
        value, cache = hint_forward(s, t, reduction=reduction)
        yield "hint", value, L.item(), hint_backward(1.0, cache), S.grad.numpy()


def reference_pdist(e, eps=1e-12):
    """The RKD authors' pairwise distances (a torch tensor (N, D) -> (N, N)), clamp included."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def reference_rkd_distance(s, t):
    """The RKD authors' distance loss, as their code computes it (teacher side without gradient)."""
    import torch  # noqa: PLC0415
    F = torch.nn.functional
    with torch.no_grad():
        td = reference_pdist(t)
        td = td / td[td > 0].mean()
    d = reference_pdist(s)
    return F.smooth_l1_loss(d / d[d > 0].mean(), td)


def reference_rkd_angle(s, t):
    """The RKD authors' angle loss: normalized difference vectors (N x N x D) and batched products."""
    import torch  # noqa: PLC0415
    F = torch.nn.functional
    with torch.no_grad():
        n = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
        ta = torch.bmm(n, n.transpose(1, 2)).view(-1)
    n = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
    return F.smooth_l1_loss(torch.bmm(n, n.transpose(1, 2)).view(-1), ta)


def _rkd_cases(torch, rng):
    references = {"rkd_distance": reference_rkd_distance, "rkd_angle": reference_rkd_angle}
    for _ in range(3):
        e, f = rng.standard_normal((12, 6)), rng.standard_normal((12, 4))
        for name, (fwd, bwd) in RKD_TERMS.items():
            ref = references[name]
            E = torch.tensor(e, requires_grad=True)
            L = ref(E, torch.tensor(f))
            L.backward()
            value, cache = fwd(e, f)
            yield name, value, L.item(), bwd(1.0, cache), E.grad.numpy()


def _mutual_cases(torch, rng):
    F = torch.nn.functional
    for T in (1.0, 3.0):
        zs = [rng.standard_normal((8, 6)) * 2 for _ in range(3)]
        y = rng.integers(0, 6, 8)
        Z = [torch.tensor(z, requires_grad=True) for z in zs]
        logp = [F.log_softmax(z / T, -1) for z in Z]
        L = sum(F.cross_entropy(z, torch.tensor(y)) for z in Z) + 0.5 * T * T * sum(
            F.kl_div(logp[j], logp[i], log_target=True, reduction="batchmean")
            for i in range(3) for j in range(3) if i != j)
        L.backward()
        value, cache = mutual_forward(zs, y, T=T, mode="joint")
        grads = mutual_backward(1.0, cache)
        yield "mutual (joint)", value, L.item(), np.stack(grads), np.stack([z.grad.numpy() for z in Z])


def run_all(seed: int = 0) -> list[VerifyRow]:
    """Every loss against its PyTorch formulation; raises ImportError without torch."""
    import torch  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    for make in (_kd_cases, _dkd_cases, _topk_cases, _hint_cases, _rkd_cases, _mutual_cases):
        for op, v, tv, g, tg in make(torch, rng):
            rows.setdefault(op, []).append((relative_error(v, tv), relative_error(g, tg)))
    return [VerifyRow(op, len(r), max(x[0] for x in r), max(x[1] for x in r)) for op, r in rows.items()]
