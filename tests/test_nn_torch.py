"""Every layer against torch.nn in float64 (values, input and parameter gradients), optimizers
against torch.optim, and weights exchanged with a torch state_dict. Skipped without torch."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import relative_error

torch = pytest.importorskip("torch")
nn = mk.nn
tnn = torch.nn
RTOL = 1e-10
F64 = "float64"


PAIRS = {
    "Linear": (lambda: nn.Linear(5, 3, dtype=F64), lambda: tnn.Linear(5, 3), (4, 5)),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype=F64),
               lambda: tnn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 2, 9)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=F64),
               lambda: tnn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 2, 6, 5)),
    "MaxPool1d": (lambda: nn.MaxPool1d(3, 2), lambda: tnn.MaxPool1d(3, 2), (2, 3, 9)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), lambda: tnn.MaxPool2d(2), (2, 2, 4, 6)),
    "AvgPool1d": (lambda: nn.AvgPool1d(2), lambda: tnn.AvgPool1d(2), (2, 3, 8)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, 1), lambda: tnn.AvgPool2d(2, 1), (2, 2, 4, 5)),
    "GlobalAvgPool": (lambda: nn.GlobalAvgPool(), lambda: tnn.AdaptiveAvgPool1d(1), (3, 2, 5)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3, dtype=F64), lambda: tnn.BatchNorm1d(3), (6, 3)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2, dtype=F64), lambda: tnn.BatchNorm2d(2), (3, 2, 3, 3)),
    "ReLU": (lambda: nn.ReLU(), lambda: tnn.ReLU(), (4, 6)),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), lambda: tnn.LeakyReLU(0.2), (4, 6)),
    "Tanh": (lambda: nn.Tanh(), lambda: tnn.Tanh(), (4, 6)),
    "GELU": (lambda: nn.GELU(), lambda: tnn.GELU(), (4, 6)),
    "GELU_tanh": (lambda: nn.GELU("tanh"), lambda: tnn.GELU("tanh"), (4, 6)),
    "Flatten": (lambda: nn.Flatten(), lambda: tnn.Flatten(), (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
@given(seed=st.integers(0, 2**32 - 1), train=st.booleans())
def test_layer_matches_torch(name, seed, train):
    ours_f, theirs_f, shape = PAIRS[name]
    rng = np.random.default_rng(seed)
    ours, theirs = ours_f(), theirs_f().double()
    theirs.train(train)
    sd = {k: v.detach().numpy() + 0.3 * rng.standard_normal(tuple(v.shape)) if v.is_floating_point()
          else v.numpy() for k, v in theirs.state_dict().items()}
    if "running_var" in sd:
        sd["running_var"] = np.abs(sd["running_var"]) + 0.5
    theirs.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    for store in (ours.params, ours.buffers):
        for k in store:
            store[k] = np.array(sd[k], dtype=store[k].dtype)
    ours.zero_grad()
    x = rng.standard_normal(shape) * 2
    X = torch.tensor(x, requires_grad=True)
    Y = theirs(X)
    if name == "GlobalAvgPool":
        Y = Y[..., 0]
    y, cache = ours.forward(x, train)
    g = rng.standard_normal(y.shape)
    Y.backward(torch.tensor(g))
    dx = ours.backward(g, cache)
    assert relative_error(y, Y.detach().numpy()) <= RTOL
    assert relative_error(dx, X.grad.numpy()) <= RTOL
    tparams = dict(theirs.named_parameters())
    for k in ours.params:
        assert relative_error(ours.grads[k], tparams[k].grad.numpy()) <= RTOL, k
    for k in ("running_mean", "running_var"):
        if k in ours.buffers:
            assert relative_error(ours.buffers[k], getattr(theirs, k).numpy()) <= RTOL, k


def test_state_dict_from_torch_npz(tmp_path):
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv1d(1, 4, 3, padding=1), tnn.BatchNorm1d(4), tnn.ReLU(), tnn.Flatten(),
                        tnn.Linear(4 * 10, 3)).double()
    tm.train()
    tm(torch.randn(16, 1, 10, dtype=torch.float64))  # running statistics move
    tm.eval()
    np.savez(tmp_path / "sd.npz", **{k: v.numpy() for k, v in tm.state_dict().items()})
    ours = nn.Sequential([nn.Conv1d(1, 4, 3, padding=1, dtype=F64), nn.BatchNorm1d(4, dtype=F64), nn.ReLU(),
                          nn.Flatten(), nn.Linear(40, 3, dtype=F64)])
    with np.load(tmp_path / "sd.npz") as data:
        nn.load_state_dict(ours, data)
    x = np.random.default_rng(1).standard_normal((5, 1, 10))
    assert relative_error(ours.predict(x), tm(torch.tensor(x)).detach().numpy()) <= RTOL


@pytest.mark.parametrize("opt", ["sgd", "sgd_nesterov", "adam", "adamw"])
def test_optimizers_match_torch(opt):
    rng = np.random.default_rng(0)
    ours = nn.Sequential([nn.Linear(4, 3, dtype=F64, seed=0)])
    theirs = tnn.Linear(4, 3).double()
    theirs.load_state_dict({k[2:]: torch.tensor(v) for k, v in nn.state_dict(ours).items()})
    make = {
        "sgd": (lambda m: nn.SGD(m, 0.1, momentum=0.9, weight_decay=0.01),
                lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, weight_decay=0.01)),
        "sgd_nesterov": (lambda m: nn.SGD(m, 0.1, momentum=0.8, nesterov=True),
                         lambda p: torch.optim.SGD(p, 0.1, momentum=0.8, nesterov=True)),
        "adam": (lambda m: nn.Adam(m, 0.01, weight_decay=0.01), lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.01)),
        "adamw": (lambda m: nn.AdamW(m, 0.01), lambda p: torch.optim.AdamW(p, 0.01)),
    }[opt]
    o1, o2 = make[0](ours), make[1](theirs.parameters())
    for _ in range(5):
        x, g = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
        ours.zero_grad()
        y, c = ours.forward(x)
        ours.backward(g, c)
        o1.step()
        o2.zero_grad()
        theirs(torch.tensor(x)).backward(torch.tensor(g))
        o2.step()
    for k, v in theirs.state_dict().items():
        assert relative_error(nn.state_dict(ours)["0." + k], v.numpy()) <= 1e-12, k
