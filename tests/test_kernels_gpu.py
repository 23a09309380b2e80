"""The CuPy kernel against the float64 reference on a GPU (skipped without one); the tolerances
are stated in kernel_cases.py. The same cases run on the CPU emulator in test_kernels_emulated.py.
"""
import pytest

cupy = pytest.importorskip("cupy")
try:
    HAVE_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001  (no driver, no device)
    HAVE_GPU = False
if not HAVE_GPU:
    pytest.skip("no CUDA GPU", allow_module_level=True)

from minikd.kernels import softmax_kl  # noqa: E402

from kernel_cases import (DIVERGENCE_SETTINGS, DIVERGENCES, NO_FALLBACK, SETTINGS, check, make,  # noqa: E402
                          make_divergences)

pytestmark = pytest.mark.filterwarnings(NO_FALLBACK)   # these tests test what the plan named


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("C", [10, 100, 1000, 4096, 4099, 32000])   # rows kernel; cluster; block (C odd)
@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(dtype, C, kind, reduction):
    s, t, y, mask = make(64, C, C, dtype)
    for T, alpha, unlabeled in SETTINGS:
        kw = dict(T=T, alpha=alpha, kind=kind, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad = softmax_kl(cupy.asarray(s), cupy.asarray(t), cupy.asarray(y), backend="cupy",
                                **{**kw, "mask": cupy.asarray(mask)})
        check(cupy.asnumpy(loss), cupy.asnumpy(grad), s, t, y, dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant,C,cluster", [("warp", 100, None), ("block", 32000, None), ("cluster", 16000, 1),
                                               ("cluster", 32000, 2), ("cluster", 128256, 8), ("cluster", 5000, 4),
                                               ("cluster", 32000, 16)])   # 16: the non-portable opt-in
def test_every_kernel_family(dtype, variant, C, cluster):
    """The kernels the plan does not pick by default, forced (benchmarks compare them)."""
    from minikd.kernels.cupy_gpu import softmax_kl_cupy
    s, t, y, mask = make(16, C, 7, dtype)
    for unlabeled in ("ignore", "soft"):
        kw = dict(T=2.0, alpha=0.7, kind="kl", reduction="batchmean", mask=mask, unlabeled=unlabeled)
        loss, grad = softmax_kl_cupy(cupy.asarray(s), cupy.asarray(t), cupy.asarray(y), scale_t2=True,
                                     ignore_index=-100, out=None, variant=variant, cluster=cluster,
                                     **{**kw, "mask": cupy.asarray(mask)})
        check(cupy.asnumpy(loss), cupy.asnumpy(grad), s, t, y, dtype, **kw)


# the settings of the emulated test_divergences_every_kernel_family: (T, alpha), reduction, unlabeled
DIVERGENCE_RUNS = tuple(zip(DIVERGENCE_SETTINGS, ("batchmean", "sum", "none", "none", "batchmean"),
                            ("soft", "ignore", "soft", "ignore", "soft")))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("C", [10, 1000, 4096, 4099, 32000])   # rows; rows recompute; cluster (N < SMs); block
@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_divergences_match_reference(dtype, C, kind, beta):
    """reverse_kl, jsd (beta 0, 0.3, 1), tvd through the plan's own choice (make_divergences: -inf
    classes in the student alone, the teacher alone and both; infinite reverse-KL rows)."""
    s, t, y, mask = make_divergences(64 if C < 32000 else 16, C, C, dtype)
    for (T, alpha), reduction, unlabeled in DIVERGENCE_RUNS:
        kw = dict(T=T, alpha=alpha, kind=kind, beta=beta, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad = softmax_kl(cupy.asarray(s), cupy.asarray(t), cupy.asarray(y), backend="cupy",
                                **{**kw, "mask": cupy.asarray(mask)})
        check(cupy.asnumpy(loss), cupy.asnumpy(grad), s, t, y, dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant,C,cluster", [("rows", 129, None), ("warp", 100, None), ("block", 32000, None),
                                               ("cluster", 5000, 4)])
@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_divergences_every_kernel_family(dtype, variant, C, cluster, kind, beta):
    """The forms the plan does not pick for the shapes above: the rows kernel keeping its
    exponentials, the warp kernel, the block kernel with 16-byte loads, a cluster of uneven chunks."""
    from minikd.kernels.cupy_gpu import softmax_kl_cupy
    s, t, y, mask = make_divergences(16, C, 7, dtype)
    for (T, alpha), reduction, unlabeled in DIVERGENCE_RUNS:
        kw = dict(T=T, alpha=alpha, kind=kind, beta=beta, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad = softmax_kl_cupy(cupy.asarray(s), cupy.asarray(t), cupy.asarray(y), scale_t2=True,
                                     ignore_index=-100, out=None, variant=variant, cluster=cluster,
                                     **{**kw, "mask": cupy.asarray(mask)})
        check(cupy.asnumpy(loss), cupy.asnumpy(grad), s, t, y, dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bitwise_repeatable_and_in_place(dtype):
    if cupy.__version__.startswith("fake"):
        pytest.skip("2048 x 32000 is too large for the CPU emulator (MINIKD_EMULATED_GPU)")
    s, t, y, _ = make(2048, 32000, 0, dtype)
    S, Tt, Y = cupy.asarray(s), cupy.asarray(t), cupy.asarray(y)
    l1, g1 = softmax_kl(S, Tt, Y, T=2.0, alpha=0.5, backend="cupy")
    l2, g2 = softmax_kl(S, Tt, Y, T=2.0, alpha=0.5, backend="cupy")
    assert cupy.asnumpy(l1).tobytes() == cupy.asnumpy(l2).tobytes()
    assert cupy.asnumpy(g1).tobytes() == cupy.asnumpy(g2).tobytes()
    S2 = S.copy()
    l3, g3 = softmax_kl(S2, Tt, Y, T=2.0, alpha=0.5, out=S2, backend="cupy")
    assert g3 is S2 and cupy.asnumpy(g3).tobytes() == cupy.asnumpy(g1).tobytes()


def test_bad_values_raise_like_the_reference():
    s = cupy.zeros((4, 50), cupy.float32)
    s[2, 3] = cupy.nan
    with pytest.raises(ValueError, match="student: row 2 contains NaN"):
        softmax_kl(s, cupy.zeros_like(s), cupy.zeros(4, cupy.int64), T=1.0, alpha=0.5, backend="cupy")


def test_auto_picks_cupy():
    from minikd.kernels import resolve_backend
    assert resolve_backend("auto", cupy.zeros((1, 2))) == "cupy"
