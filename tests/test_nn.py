"""nn layers: float64 gradient checks, naive references, PyTorch parity, save/load, training."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minikd as mk
from minikd.gradcheck import check_vjp
from minikd.nn import models

nn = mk.nn
RTOL = 1e-7
F64 = "float64"


def layer_vjp_check(layer, x, g, train=True, eps=1e-5):
    """Max relative error of d<g, y>/dx and d<g, y>/dparam for every param."""
    layer.zero_grad()
    _, cache = layer.forward(x, train)
    dx = layer.backward(g, cache)
    worst = check_vjp(lambda x: layer.forward(x, train)[0], [x], g, [dx], eps=eps).max_rel
    for k in list(layer.params):
        analytic = layer.grads[k].copy()
        orig = layer.params[k]

        def f(w, k=k):
            layer.params[k] = w
            return layer.forward(x, train)[0]
        worst = max(worst, check_vjp(f, [orig.copy()], g, [analytic], eps=eps).max_rel)
        layer.params[k] = orig
    return worst


def rng_of(seed):
    return np.random.default_rng(seed)


LAYER_CASES = {
    "Linear": (lambda r: nn.Linear(5, 3, seed=r, dtype=F64), (4, 5)),
    "Conv1d": (lambda r: nn.Conv1d(2, 3, 3, stride=2, padding=1, seed=r, dtype=F64), (2, 2, 7)),
    "Conv2d": (lambda r: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=1, seed=r, dtype=F64), (2, 2, 5, 4)),
    "MaxPool1d": (lambda r: nn.MaxPool1d(3, stride=2), (2, 3, 9)),
    "MaxPool2d": (lambda r: nn.MaxPool2d(2), (2, 2, 4, 6)),
    "AvgPool1d": (lambda r: nn.AvgPool1d(3, stride=2), (2, 3, 9)),
    "AvgPool2d": (lambda r: nn.AvgPool2d((2, 3), stride=1), (2, 2, 4, 5)),
    "GlobalAvgPool": (lambda r: nn.GlobalAvgPool(), (3, 2, 5)),
    "BatchNorm1d": (lambda r: nn.BatchNorm1d(3, dtype=F64), (6, 3)),
    "BatchNorm1d_seq": (lambda r: nn.BatchNorm1d(3, dtype=F64), (4, 3, 5)),
    "BatchNorm2d": (lambda r: nn.BatchNorm2d(2, dtype=F64), (3, 2, 3, 3)),
    "ReLU": (lambda r: nn.ReLU(), (4, 6)),
    "LeakyReLU": (lambda r: nn.LeakyReLU(0.1), (4, 6)),
    "Tanh": (lambda r: nn.Tanh(), (4, 6)),
    "GELU": (lambda r: nn.GELU(), (4, 6)),
    "GELU_tanh": (lambda r: nn.GELU("tanh"), (4, 6)),
    "Flatten": (lambda r: nn.Flatten(), (2, 3, 4)),
    "Reshape": (lambda r: nn.Reshape([2, 6]), (3, 12)),
}


def perturb_params(layer, rng):
    """BatchNorm starts at weight 1, bias 0: move it off that point so the check can fail."""
    for k, v in layer.params.items():
        layer.params[k] = v + 0.5 * rng.standard_normal(v.shape)


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
@given(seed=st.integers(0, 2**32 - 1))
def test_layer_gradients(name, seed):
    make, shape = LAYER_CASES[name]
    rng = rng_of(seed)
    layer = make(rng)
    perturb_params(layer, rng)
    x = rng.standard_normal(shape) * 2
    if name.startswith(("ReLU", "LeakyReLU")):
        x = np.where(np.abs(x) < 1e-3, 0.5, x)  # keep clear of the kink
    if name.startswith("MaxPool"):  # keep window maxima apart (a tie is a kink)
        x = rng.permutation(np.arange(x.size, dtype=float)).reshape(shape) * 0.1
    y, _ = layer.forward(x, True)
    g = rng.standard_normal(y.shape)
    assert layer_vjp_check(layer, x, g, eps=1e-5) <= RTOL
    if name.startswith("BatchNorm"):  # eval mode uses the running statistics as constants
        layer.buffers["running_var"] = layer.buffers["running_var"] + 0.3
        assert layer_vjp_check(layer, x, g, train=False, eps=1e-5) <= RTOL


def test_backward_adds_into_grads():
    rng = rng_of(0)
    lin = nn.Linear(3, 2, seed=1, dtype=F64)
    x, g = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    _, c = lin.forward(x)
    lin.backward(g, c)
    once = lin.grads["weight"].copy()
    lin.backward(g, c)
    np.testing.assert_allclose(lin.grads["weight"], 2 * once)
    lin.zero_grad()
    assert not lin.grads["weight"].any()


def naive_conv2d(x, w, b, stride, pad):
    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    xp = np.pad(x, [(0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])])
    Ho, Wo = (xp.shape[2] - KH) // stride[0] + 1, (xp.shape[3] - KW) // stride[1] + 1
    y = np.zeros((N, O, Ho, Wo))
    for n in range(N):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    patch = xp[n, :, i * stride[0]:i * stride[0] + KH, j * stride[1]:j * stride[1] + KW]
                    y[n, o, i, j] = np.sum(patch * w[o]) + b[o]
    return y


def naive_pool2d(x, k, s, op):
    N, C, H, W = x.shape
    Ho, Wo = (H - k[0]) // s[0] + 1, (W - k[1]) // s[1] + 1
    y = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[:, :, i, j] = op(x[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]], axis=(2, 3))
    return y


@given(seed=st.integers(0, 2**32 - 1), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), k=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_conv2d_and_pool_against_naive_loops(seed, stride, pad, k):
    rng = rng_of(seed)
    x = rng.standard_normal((2, 3, 6, 7))
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=pad, seed=rng, dtype=F64)
    y, _ = conv.forward(x)
    np.testing.assert_allclose(y, naive_conv2d(x, conv.params["weight"], conv.params["bias"], stride, pad),
                               rtol=1e-12, atol=1e-12)
    for layer, op in ((nn.MaxPool2d(k, stride), np.max), (nn.AvgPool2d(k, stride), np.mean)):
        np.testing.assert_allclose(layer.forward(x)[0], naive_pool2d(x, k, stride, op), rtol=1e-13)


def test_dropout_is_seeded_and_exact():
    x = rng_of(0).standard_normal((50, 40))
    a, ca = nn.Dropout(0.3, seed=7).forward(x)
    b, _ = nn.Dropout(0.3, seed=7).forward(x)
    np.testing.assert_array_equal(a, b)
    kept = a != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(a[kept], x[kept] / 0.7)
    g = rng_of(1).standard_normal(x.shape)
    np.testing.assert_allclose(nn.Dropout(0.3).backward(g, ca), g * kept / 0.7)
    np.testing.assert_array_equal(nn.Dropout(0.3).forward(x, train=False)[0], x)


def small_cnn(seed=0, dtype="float32"):
    r = np.random.default_rng(seed)
    return nn.Sequential([
        nn.Reshape([1, 20]), nn.Conv1d(1, 4, 3, padding=1, seed=r, dtype=dtype), nn.BatchNorm1d(4, dtype=dtype),
        nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 6, 3, stride=2, seed=r, dtype=dtype), nn.GELU(),
        nn.GlobalAvgPool(), nn.Linear(6, 5, seed=r, dtype=dtype)])


def test_sequential_taps_and_tap_gradients():
    rng = rng_of(3)
    model = small_cnn(dtype=F64)
    x = rng.standard_normal((4, 20))
    y, cache = model.forward(x, taps=("3", "7"))
    assert set(cache.features) == {"3", "7"} and cache.features["7"].shape == (4, 6)
    g, g3, g7 = rng.standard_normal(y.shape), rng.standard_normal((4, 4, 20)), rng.standard_normal((4, 6))

    def objective(x):  # <g, y> + <g3, f3> + <g7, f7>
        yy, cc = model.forward(x, taps=("3", "7"))
        return np.sum(g * yy) + np.sum(g3 * cc.features["3"]) + np.sum(g7 * cc.features["7"])
    model.zero_grad()
    dx = model.backward(g, cache, tap_grads={"3": g3, "7": g7})
    assert check_vjp(objective, [x], 1.0, [dx], eps=1e-5).max_rel <= RTOL
    with pytest.raises(ValueError, match="taps: no layer named"):
        model.forward(x, taps=("nope",))
    with pytest.raises(ValueError, match="tap_grads: .* were not tapped"):
        model.backward(g, cache, tap_grads={"1": g3})


def test_save_load_round_trip_bit_for_bit(tmp_path):
    model = small_cnn(seed=5)
    x = rng_of(0).standard_normal((8, 20)).astype(np.float32)
    model.forward(x, train=True)  # move the running statistics
    nn.save(model, tmp_path / "m", extra={"note": "test"})
    loaded = nn.load(tmp_path / "m")
    np.testing.assert_array_equal(model.predict(x), loaded.predict(x))
    assert loaded.extra == {"note": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.npz"]
    assert json.loads((tmp_path / "m.json").read_text())["layers"][1]["type"] == "Conv1d"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        nn.load(tmp_path / "missing")
    nn.save(small_cnn(), tmp_path / "m")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        nn.load(tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({"format": "minikd.Sequential/1",
                                                  "layers": [{"type": "os.system", "name": "0", "args": {}}]}))
    with pytest.raises(ValueError, match="unknown layer type 'os.system'"):
        nn.load(tmp_path / "m")
    model = small_cnn()
    with pytest.raises(ValueError, match="state dict: 1.weight has shape"):
        nn.load_state_dict(model, {**nn.state_dict(model), "1.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="missing keys"):
        nn.load_state_dict(model, {})


def test_optimizers_reduce_loss_on_a_toy_problem():
    """Linearly separable 3-class blobs: every optimizer drives the training loss down."""
    rng = rng_of(0)
    centers = rng.standard_normal((3, 8)) * 3
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.standard_normal((300, 8))).astype(np.float32)
    for make_opt in (lambda m: nn.SGD(m, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                     lambda m: nn.Adam(m, 0.01), lambda m: nn.AdamW(m, 0.01)):
        model = nn.Sequential([nn.Linear(8, 16, seed=1), nn.ReLU(), nn.Linear(16, 3, seed=2)])
        opt = make_opt(model)
        losses = []
        for _ in range(60):
            model.zero_grad()
            logits, cache = model.forward(x)
            loss, dlogits = mk.kd_loss_and_grad(logits, logits, y, T=1.0, alpha=0.0)
            model.backward(dlogits, cache)
            opt.step()
            losses.append(float(loss))
        assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_schedules():
    s = nn.step_schedule(0.1, 10, 0.5)
    assert s(0) == 0.1 and s(9) == 0.1 and s(10) == 0.05 and s(25) == 0.025
    c = nn.cosine_schedule(1.0, 10, 0.1)
    assert c(0) == 1.0 and abs(c(5) - 0.55) < 1e-12 and abs(c(10) - 0.1) < 1e-12


def test_layer_shape_errors():
    with pytest.raises(ValueError, match="Linear: expected 5 input features"):
        nn.Linear(5, 2).forward(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"Conv1d: expected input \(N, 2, L\)"):
        nn.Conv1d(2, 3, 3).forward(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="BatchNorm2d: expected 3 channels"):
        nn.BatchNorm2d(3).forward(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="init: expected one of"):
        nn.Linear(2, 2, init="he")


BAD_CONSTRUCTIONS = [
    # (constructor, message fragment)
    (lambda: nn.Linear(0, 10), "Linear: in_features: expected a positive integer, got 0"),
    (lambda: nn.Linear(10, -3), "Linear: out_features: expected a positive integer, got -3"),
    (lambda: nn.Linear(2.5, 3), "Linear: in_features: expected a positive integer, got 2.5"),
    (lambda: nn.Linear(2.0, 3), "Linear: in_features: expected a positive integer, got 2.0"),
    (lambda: nn.Linear(True, 3), "Linear: in_features: expected a positive integer, got True"),
    (lambda: nn.Linear("4", 3), "Linear: in_features: expected a positive integer, got '4'"),
    (lambda: nn.Conv1d(0, 2, 3), "Conv1d: in_channels: expected a positive integer, got 0"),
    (lambda: nn.Conv1d(1, 0, 3), "Conv1d: out_channels: expected a positive integer, got 0"),
    (lambda: nn.Conv1d(1, 2, 0), "Conv1d: kernel_size: expected a positive integer, got 0"),
    (lambda: nn.Conv1d(1, 2, 3, stride=0), "Conv1d: stride: expected a positive integer, got 0"),
    (lambda: nn.Conv1d(1, 2, 3, padding=-1), "Conv1d: padding: expected an integer >= 0, got -1"),
    (lambda: nn.Conv2d(1, 2, (3, 0)), "Conv2d: kernel_size: expected a positive integer, got 0"),
    (lambda: nn.Conv2d(1, 2, (3,)), "Conv2d: kernel_size: expected one integer or a list of 2, got \\[3\\]"),
    (lambda: nn.Conv2d(1, 2, 3, stride=1.5), "Conv2d: stride: expected a positive integer, got 1.5"),
    (lambda: nn.BatchNorm1d(0), "BatchNorm1d: num_features: expected a positive integer, got 0"),
    (lambda: nn.BatchNorm2d(-1), "BatchNorm2d: num_features: expected a positive integer, got -1"),
    (lambda: nn.BatchNorm1d(3, eps=0.0), "BatchNorm1d: eps: expected a finite number > 0, got 0.0"),
    (lambda: nn.BatchNorm1d(3, momentum=1.5), "BatchNorm1d: momentum: expected a finite number in \\[0, 1\\]"),
    (lambda: nn.BatchNorm1d(3, momentum=None), "BatchNorm1d: momentum: expected a finite number in"),
    (lambda: nn.MaxPool1d(0), "MaxPool1d: kernel_size: expected a positive integer, got 0"),
    (lambda: nn.MaxPool2d(2, stride=0), "MaxPool2d: stride: expected a positive integer, got 0"),
    (lambda: nn.AvgPool1d(-2), "AvgPool1d: kernel_size: expected a positive integer, got -2"),
    (lambda: nn.AvgPool2d((2, 2.5)), "AvgPool2d: kernel_size: expected a positive integer, got 2.5"),
    (lambda: nn.Dropout(1.5), "Dropout: p: expected a finite number in \\[0, 1\\], got 1.5"),
    (lambda: nn.Dropout(-0.1), "Dropout: p: expected a finite number in \\[0, 1\\], got -0.1"),
    (lambda: nn.Dropout(float("nan")), "Dropout: p: expected a finite number in \\[0, 1\\], got nan"),
    (lambda: nn.LeakyReLU(float("inf")), "LeakyReLU: negative_slope: expected a finite number, got inf"),
    (lambda: nn.Reshape([0, 40]), "Reshape: shape: expected a positive integer, got 0"),
    (lambda: nn.Reshape([-1, 40]), "Reshape: shape: expected a positive integer, got -1"),
    (lambda: nn.Reshape(40), "Reshape: shape: expected a non-empty list of positive integers, got 40"),
    (lambda: models.student_mlp(40, 10, hidden=0), "student_mlp: hidden: expected a positive integer"),
    (lambda: models.student_mlp(40, 0), "student_mlp: classes: expected a positive integer"),
    (lambda: models.teacher_cnn(40, 10, width=0), "teacher_cnn: width: expected a positive integer"),
    (lambda: models.teacher_cnn(3, 10), "teacher_cnn: features: expected at least 4"),
]


@pytest.mark.parametrize("make, msg", BAD_CONSTRUCTIONS, ids=[m.split(",")[0] for _, m in BAD_CONSTRUCTIONS])
def test_layer_arguments_refused_at_construction(make, msg):
    """A size of 0, -1 or 2.5, a stride of 0, a negative padding, a probability outside [0, 1]:
    refused when the layer is built, naming the layer, the argument and what was expected (before,
    Linear(0, 10) failed with an OverflowError in the initializer, Conv1d(stride=0) with "slice step
    cannot be zero" at the first forward, Linear(2.5, 3) silently built Linear(2, 3) and
    BatchNorm1d(0) or Linear(4, 0) a layer with nothing in it)."""
    with pytest.raises(ValueError, match=msg):
        make()


def test_layer_arguments_accepted():
    """What the checks must still accept: NumPy integers (shapes read off arrays), lists from a
    JSON config, padding 0, p = 0 and p = 1 (PyTorch's range), momentum 0, the smallest CNN."""
    assert nn.Linear(np.int64(3), np.int32(4)).params["weight"].shape == (4, 3)
    conv = nn.Conv2d(1, 2, [3, 2], stride=[1, 2], padding=[0, 1])
    assert conv.kernel_size == (3, 2) and conv.stride == (1, 2) and conv.padding == (0, 1)
    assert nn.MaxPool1d(2).stride == (2,) and nn.Dropout(1.0).p == 1.0 and nn.Dropout(0).p == 0.0
    assert nn.BatchNorm1d(3, momentum=0).momentum == 0.0 and nn.LeakyReLU(0).negative_slope == 0.0
    y, _ = models.teacher_cnn(4, 3, width=2, seed=0).forward(np.zeros((2, 4), np.float32))
    assert y.shape == (2, 3)
    model = models.student_mlp(np.int64(40), 10, seed=0)
    again = nn.Sequential.from_config(json.loads(json.dumps(model.config())))
    assert again.config() == model.config()


def test_init_schemes_are_seeded():
    a = nn.Linear(100, 50, init="kaiming", seed=3).params["weight"]
    b = nn.Linear(100, 50, init="kaiming", seed=3).params["weight"]
    np.testing.assert_array_equal(a, b)
    assert abs(a.std() - np.sqrt(2 / 100)) < 0.01
    w = nn.Linear(100, 50, init="xavier", seed=3).params["weight"]
    assert np.abs(w).max() <= np.sqrt(6 / 150)
