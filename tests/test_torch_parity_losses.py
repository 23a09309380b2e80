"""Hint, RKD and mutual learning against PyTorch autograd in float64, RKD written the way the
authors' reference code computes it (pairwise distances, normalized difference vectors and
batched products). Skipped without torch."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import relative_error
from minikd.torch_parity import reference_rkd_angle, reference_rkd_distance  # the authors' formulation

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL = 1e-10


@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(1, 6), st.integers(1, 6),
       st.sampled_from([0.1, 1.0, 30.0]))
def test_rkd_matches_reference_code(seed, n, ds, dt, scale):
    r = np.random.default_rng(seed)
    E, Ft = r.standard_normal((n, ds)) * scale, r.standard_normal((n, dt))
    for ours_f, ours_b, ref in ((mk.rkd_distance_forward, mk.rkd_distance_backward, reference_rkd_distance),
                                (mk.rkd_angle_forward, mk.rkd_angle_backward, reference_rkd_angle)):
        S = torch.tensor(E, requires_grad=True)
        L = ref(S, torch.tensor(Ft))
        L.backward()
        value, cache = ours_f(E, Ft)
        # floors: a loss or gradient that is exactly 0 (n = 2 angles; collinear points in one
        # dimension) comes out as rounding noise of ~1e-16 in both implementations
        assert relative_error(value, L.item(), 1e-6) <= RTOL
        d = np.sqrt(((E[:, None] - E[None]) ** 2).sum(-1))[~np.eye(n, dtype=bool)]
        natural = 1.0 / (n * d.min())  # the gradient's natural size (cosines vary on the closest pair)
        assert relative_error(ours_b(1.0, cache), S.grad.numpy(), natural) <= RTOL


@given(st.integers(0, 2**32 - 1), st.sampled_from(["batchmean", "mean", "sum"]))
def test_hint_matches_mse(seed, reduction):
    r = np.random.default_rng(seed)
    s, t = r.standard_normal((5, 3, 4)), r.standard_normal((5, 3, 4))
    S = torch.tensor(s, requires_grad=True)
    if reduction == "batchmean":
        L = F.mse_loss(S, torch.tensor(t), reduction="sum") / 5
    else:
        L = F.mse_loss(S, torch.tensor(t), reduction=reduction)
    L.backward()
    value, cache = mk.hint_forward(s, t, reduction=reduction)
    assert relative_error(value, L.item()) <= RTOL and relative_error(mk.hint_backward(1.0, cache), S.grad.numpy()) <= RTOL


@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.sampled_from(["detached", "joint"]),
       st.floats(0.5, 8.0))
def test_mutual_matches_torch(seed, M, mode, T):
    r = np.random.default_rng(seed)
    zs = [r.standard_normal((6, 5)) * 2 for _ in range(M)]
    y = r.integers(0, 5, 6)
    Z = [torch.tensor(z, requires_grad=True) for z in zs]
    Y = torch.tensor(y)
    logp = [F.log_softmax(z / T, -1) for z in Z]

    def kl(i, j, detach_j):  # KL(p_j || p_i) batchmean, peers detached when asked
        target = logp[j].detach() if detach_j else logp[j]
        return F.kl_div(logp[i], target, log_target=True, reduction="batchmean")
    c = 1.0 / (M - 1)
    if mode == "detached":
        losses = [F.cross_entropy(Z[i], Y) + c * T * T * sum(kl(i, j, True) for j in range(M) if j != i)
                  for i in range(M)]
        total = sum(losses)  # each model's loss reaches only that model (peers detached)
    else:
        total = sum(F.cross_entropy(Z[i], Y) for i in range(M)) + \
            c * T * T * sum(kl(j, i, False) for i in range(M) for j in range(M) if j != i)
    total.backward()
    L, cache = mk.mutual_forward(zs, y, T=T, mode=mode)
    grads = mk.mutual_backward(np.ones(M) if mode == "detached" else 1.0, cache)
    assert relative_error(np.sum(L), total.item()) <= RTOL
    for g, z in zip(grads, Z):
        assert relative_error(g, z.grad.numpy()) <= RTOL


def test_verify_command(capsys):
    from minikd.cli import main
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    for op in ("kd_loss", "reverse_kl", "jsd", "tvd", "dkd", "topk", "hint", "rkd_distance", "rkd_angle",
               "mutual (joint)"):
        assert op in out
    assert "10 of 10 losses equal PyTorch autograd" in out
