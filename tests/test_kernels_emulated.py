"""The CUDA kernels of kernels/softmax_kl.cu, the source itself, run on the CPU emulator of
tests/cuda_emu (g++; CUDA threads are OS threads, barriers and shuffles are std::barriers) against
the float64 reference, through the launcher's own plan and argument tuple. What this cannot see:
timing, the real memory model beyond what barriers order, and the PTX of the cluster and cp.async
functions (the emulator supplies its own versions of those five functions). Sizes are small and
blocks narrow (64 threads) where the kernel allows it: every CUDA thread costs an OS thread here.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emu_runner
import minikd as mk

reason = emu_runner.available()
if reason:
    pytest.skip(f"CUDA emulator: {reason}", allow_module_level=True)

from kernel_cases import (DIVERGENCE_SETTINGS, DIVERGENCES, NO_FALLBACK, SETTINGS, check, make,  # noqa: E402
                          make_divergences, prepared)
from minikd.kernels.cupy_gpu import kernel_args, plan  # noqa: E402
from minikd.losses import conventions  # noqa: E402


def emulated(student, teacher, labels, *, T, alpha, kind="kl", reduction="batchmean", mask=None, out=None,
             unlabeled="ignore", beta=None, sum_threads=1024, **plan_options):
    """What softmax_kl_cupy does, with NumPy arrays and the emulator: (loss, grad, flags, launch).
    ``sum_threads``: sum_rows' block (the launcher's 1024; 64 where a test launches it often: each
    emulated thread is an OS thread)."""
    rows = prepared(student, teacher, labels, T=T, alpha=alpha, kind=kind, reduction=reduction, mask=mask,
                    unlabeled=unlabeled, beta=beta)
    N, C = rows.s.shape
    buf = out if out is not None else np.empty_like(rows.s)
    row_loss = np.full(N, np.nan, np.float32)
    flags = np.zeros(N, np.int8)
    args = kernel_args(rows, kind, buf, row_loss, flags, beta)
    aligned = (C * rows.s.dtype.itemsize) % 16 == 0 and all(a.ctypes.data % 16 == 0 for a in (rows.s, rows.t, buf))
    launch = plan(N, C, rows.s.dtype.itemsize, aligned, dtype=rows.s.dtype.name, **plan_options)
    emu_runner.run(launch.kernel, launch.grid, launch.block, args, shared=launch.shared, cluster=launch.cluster)
    if reduction == "none":   # in the input dtype, as softmax_kl_cupy returns them
        return row_loss.astype(rows.s.dtype), buf, flags, launch
    total = np.zeros(1, np.float64)
    emu_runner.run("sum_rows", 1, sum_threads, (row_loss, np.int64(N), total))
    return conventions.reduce_total(total[0], reduction, rows.n_valid), buf, flags, launch


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("C,variant", [(1, "rows"), (3, "rows"), (10, "rows"), (33, "rows"), (100, "rows"),
                                       (129, "rows"), (1000, "rows"), (129, "rows_recompute"),
                                       (1000, "rows_recompute")])
def test_rows_kernel(dtype, C, variant):
    s, t, y, mask = make(11, C, C, dtype)   # 11 rows: the last block is partly past N
    for (T, alpha, unlabeled), kind, reduction in zip(SETTINGS, ("kl", "ce", "kl", "ce"),
                                                      ("batchmean", "sum", "none", "batchmean")):
        kw = dict(T=T, alpha=alpha, kind=kind, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad, flags, launch = emulated(s, t, y, variant=variant, **kw)
        assert launch.kernel.startswith(f"softmax_kl_{variant}_") and not flags.any()
        check(loss, grad, s, t, y, dtype, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("C,cluster", [(2048, 1), (5000, 2), (4104, 4), (12800, 8), (40, 8), (6400, 16)])
def test_cluster_kernel(dtype, C, cluster):
    """Chunks that do not divide evenly (5000 / 2 packs of 4; 4104 f32 = 1026 packs over 4 blocks),
    a cluster with an empty block (40 classes over 8 blocks of 2 packs: in bf16 5 packs, 3 blocks empty)."""
    s, t, y, mask = make(5, C, C + cluster, dtype)
    for (T, alpha, unlabeled), kind in zip(SETTINGS, ("kl", "ce", "ce", "kl")):
        kw = dict(T=T, alpha=alpha, kind=kind, reduction="batchmean", mask=mask, unlabeled=unlabeled)
        loss, grad, flags, launch = emulated(s, t, y, variant="cluster", cluster=cluster,
                                             threads=32 if cluster == 16 else 64, **kw)
        assert launch.kernel.endswith(f"_c{cluster}") and launch.cluster == cluster and not flags.any()
        check(loss, grad, s, t, y, dtype, **kw)


# a third of the profile's examples: each one launches a few thousand emulated threads
def draw_family(data, C, itemsize):
    """A kernel family that can take rows of C values (and its cluster size / block threads, kept
    small for the emulator): (variant, options) for ``emulated``."""
    vec = 16 // itemsize
    families = ["auto", "block", "warp"] + (["rows", "rows_recompute"] if C <= 1024 else []) + \
        (["cluster"] if C % vec == 0 else [])
    variant = data.draw(st.sampled_from(families), label="variant")
    options = {}
    if variant == "cluster":
        options["cluster"] = data.draw(st.sampled_from([1, 2, 4, 8, 16]), label="cluster")
    if variant in ("block", "cluster") or (variant == "auto" and C > 1024):
        options["threads"] = 32 if options.get("cluster") == 16 else 64
    return variant, options


@settings(max_examples=max(20, settings.default.max_examples // 3))
@given(data=st.data(), C=st.integers(1, 3000), N=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), kind=st.sampled_from(["kl", "ce"]),
       reduction=st.sampled_from(["batchmean", "sum", "none"]), T=st.sampled_from([0.05, 0.5, 1.0, 4.0, 50.0]),
       alpha=st.sampled_from([0.0, 0.3, 1.0]), unlabeled=st.sampled_from(["ignore", "soft"]))
def test_property_every_kernel_family(data, C, N, seed, dtype, kind, reduction, T, alpha, unlabeled):
    """Fresh shapes, options and inputs (x20 outliers, -inf classes, an ignored row, a mask) through
    every kernel family that can take the shape, against the float64 reference."""
    s, t, y, mask = make(N, C, seed, dtype)
    variant, options = draw_family(data, C, s.dtype.itemsize)
    kw = dict(T=T, alpha=alpha, kind=kind, reduction=reduction, mask=mask, unlabeled=unlabeled)
    loss, grad, flags, launch = emulated(s, t, y, variant=variant, **options, **kw)
    assert not flags.any()
    check(loss, grad, s, t, y, dtype, **kw)


# ---------------------------------------------------------------- reverse KL, JSD, TVD

# (variant, C, plan options, dtype): every kernel family, each form of each (the rows kernel with
# the exponentials kept and recomputed, the cluster kernel with even and uneven chunks, the block
# kernel with and without 16-byte loads), every dtype somewhere
DIVERGENCE_FAMILIES = [("rows", 10, {}, "float32"), ("rows", 100, {}, "bfloat16"), ("rows", 129, {}, "float32"),
                       ("rows_recompute", 1000, {}, "float16"), ("cluster", 2048, {"cluster": 2}, "float32"),
                       ("cluster", 2056, {"cluster": 2}, "bfloat16"), ("block", 1031, {}, "float32"),
                       ("block", 4096, {}, "float16"), ("warp", 100, {}, "float32")]


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("variant,C,options,dtype", DIVERGENCE_FAMILIES)
def test_divergences_every_kernel_family(kind, beta, variant, C, options, dtype):
    """reverse_kl, jsd (beta 0, 0.3, 1) and tvd through each kernel family against the float64
    reference: outliers, -inf classes in the student alone, the teacher alone and both, rows without
    a label (soft term alone, or ignored), masked rows, alpha 0, 0.5, 1, T 1 and 2.5, each reduction.
    Reverse KL (and JSD at beta = 1) is +inf on the rows where the teacher alone has -inf classes:
    the kernel must say so, with a NaN gradient there, and stay exact on the other rows; JSD at
    beta = 0 (forward KL) is +inf where the student alone has them, its gradient finite."""
    s, t, y, mask = make_divergences(7, C, C + 1, dtype)
    threads = 64 if variant in ("block", "cluster") else None
    infinite_seen = False
    for (T, alpha), reduction, unlabeled in zip(DIVERGENCE_SETTINGS, ("batchmean", "sum", "none", "none", "batchmean"),
                                                ("soft", "ignore", "soft", "ignore", "soft")):
        kw = dict(T=T, alpha=alpha, kind=kind, beta=beta, reduction=reduction, mask=mask, unlabeled=unlabeled)
        loss, grad, flags, launch = emulated(s, t, y, variant=variant, threads=threads, sum_threads=64, **options, **kw)
        assert launch.kernel.startswith(f"softmax_kl_{variant}_") and not flags.any()
        check(loss, grad, s, t, y, dtype, **kw)
        infinite_seen |= bool(np.isinf(loss).any())
    # infinite: reverse KL (-inf classes of the teacher alone) and JSD at beta = 0, the forward KL
    # (of the student alone: there its gradient stays finite); the interior JSD and TVD never
    assert infinite_seen == (kind == "reverse_kl" or beta in (0.0, 1.0))


# a third of the profile's examples, as above
@settings(max_examples=max(20, settings.default.max_examples // 3))
@given(data=st.data(), C=st.integers(1, 3000), N=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), kind=st.sampled_from(["reverse_kl", "jsd", "tvd"]),
       reduction=st.sampled_from(["batchmean", "sum", "none"]), T=st.sampled_from([0.5, 1.0, 2.5, 4.0, 50.0]),
       alpha=st.sampled_from([0.0, 0.3, 1.0]), unlabeled=st.sampled_from(["ignore", "soft"]))
def test_property_divergences_every_kernel_family(data, C, N, seed, dtype, kind, reduction, T, alpha, unlabeled):
    """test_property_every_kernel_family for the divergences of make_divergences' inputs, beta drawn
    too. (T = 0.05, where both sides are one-hot to far below float32's resolution, is left out: the
    reference's own gradient there is float64 rounding, e.g. a JSD entry of 1e-19 where the terms are
    0.3: no float32 kernel can match it; kl and ce, whose gradient p - q has no such cancellation,
    are tested there.)"""
    s, t, y, mask = make_divergences(N, C, seed, dtype, Ts=(T,))
    beta = data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]), label="beta") if kind == "jsd" else None
    variant, options = draw_family(data, C, s.dtype.itemsize)
    kw = dict(T=T, alpha=alpha, kind=kind, beta=beta, reduction=reduction, mask=mask, unlabeled=unlabeled)
    loss, grad, flags, launch = emulated(s, t, y, variant=variant, sum_threads=64, **options, **kw)
    assert not flags.any()
    check(loss, grad, s, t, y, dtype, **kw)


@pytest.mark.parametrize("variant,C,options", [("rows", 10, {}), ("rows", 129, {}), ("rows_recompute", 1000, {}),
                                               ("cluster", 2048, {"cluster": 2}), ("block", 1031, {}),
                                               ("block", 1024, {}), ("warp", 100, {})])
def test_tvd_subgradient_at_exact_ties(variant, C, options):
    """TVD's subgradient sign(0) = 0 where p = q > 0 exactly. Rows built so that the tie is exact in
    float32 and float64 alike: two classes at logit 0 in both, two more swapped between student and
    teacher (-40, -45: below half an ulp of the sum 2, so Zs = Zt = 2 exactly and p = q = 1/2 at the
    first two), the rest at -60 in both (ties too, of mass ~1e-26). The gradient at the tied classes
    is tiny ((P- - P+)/2 = 1e-18); a kernel that counted a tie as p > q or p < q would give them
    +-1/4. The tie rows are checked on their own scale (1e-18: reduction "none", one weight a
    row), so that the tied mass P0 in the other classes' coefficients counts too; a random row
    runs beside them."""
    s, t, y, _ = make(3, C, 4, "float32")
    for row in (0, 2):
        s[row], t[row] = -60.0, -60.0
        s[row, :4] = t[row, :4] = 0.0, 0.0, -40.0, -45.0
        t[row, 2:4] = -45.0, -40.0
        q = mk.softmax(t[row].astype(np.float64))
        assert q[0] == mk.softmax(s[row].astype(np.float64))[0] == 0.5   # the reference sees the tie too
    kw = dict(T=1.0, alpha=1.0, kind="tvd", reduction="none", unlabeled="soft")
    threads = 64 if variant in ("block", "cluster") else None
    loss, grad, flags, _ = emulated(s, t, y, variant=variant, threads=threads, **options, **kw)
    assert not flags.any() and np.abs(grad[[0, 2], :2]).max() < 1e-17
    for rows in ([0, 2], [1]):
        check(loss[rows], grad[rows], s[rows], t[rows], y[rows], "float32", **kw)


def test_jsd_endpoints_and_near_them():
    """beta = 0 and 1 are the forward and reverse KL (the same kernel arguments, decided on the
    float64 beta); a beta a hair inside (1e-9, 1 - 1e-9) is the interior JSD, nearly 0, not a KL:
    1 - beta travels rounded from float64, not as float32(1) - float32(beta) = 0."""
    s, t, y, mask = make_divergences(5, 100, 8, "float32")
    rows = prepared(s, t, y, T=2.0, kind="jsd", beta=0.3)
    buffers = (np.empty_like(s), np.zeros(5, np.float32), np.zeros(5, np.int8))
    args = {(kind, beta): kernel_args(rows, kind, *buffers, beta) for kind, beta in
            (("kl", None), ("reverse_kl", None), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 1 - 1e-9))}
    assert args["jsd", 0.0][10] == args["kl", None][10] == 0 and args["jsd", 1.0][10] == args["reverse_kl", None][10]
    assert args["jsd", 1 - 1e-9][10] == 3 and args["jsd", 1 - 1e-9][12] == np.float32(1e-9)
    for beta in (1e-9, 1 - 1e-9):
        kw = dict(T=2.0, alpha=1.0, kind="jsd", beta=beta, reduction="none", mask=mask, unlabeled="soft")
        loss, grad, _, _ = emulated(s, t, y, variant="rows", **kw)
        assert np.isfinite(loss).all() and np.abs(loss).max() < 1e-6   # not the KL of the endpoint
        check(loss, grad, s, t, y, "float32", **kw)


def test_cluster_sizes_of_the_plan():
    """Portable sizes first; 16 only when no portable size fits; nothing fits -> the block kernel."""
    from functools import partial

    from minikd.kernels.cupy_gpu import plan
    cluster = partial(plan, variant="cluster")
    assert cluster(2048, 128256, 4, True).cluster == 8          # 1 MB rows: 128 KB a block
    assert cluster(4096, 32000, 4, True).cluster == 4           # 256 KB rows: 64 KB a block (target 100 KB)
    assert cluster(64, 262144, 4, True).cluster == 16          # 2 MB rows: 8 blocks would need 256 KB each
    assert cluster(64, 600000, 4, True).kernel == "softmax_kl_block_vec_f32"
    assert cluster(64, 600000, 2, True, dtype="bfloat16").cluster == 16


def test_default_plan_is_the_measured_winners():
    """The H200 runs' winners (cupy_gpu's module doc): rows for C <= 128, the recompute form up to
    1024, above it the 512-thread block kernel (16-byte loads when aligned) once the rows fill the
    SMs, a cluster of 8 a row (1024 / 512 threads) when they do not."""
    from minikd.kernels.cupy_gpu import plan
    assert plan(65536, 10, 4, False).kernel == "softmax_kl_rows_f32_L4_E4"
    assert plan(65536, 100, 2, True, dtype="bfloat16").kernel == "softmax_kl_rows_bf16_L32_E4"
    assert plan(16384, 1000, 4, True).kernel == "softmax_kl_rows_recompute_f32_L32_E32"
    assert plan(16384, 1000, 2, True, dtype="bfloat16").kernel == "softmax_kl_rows_recompute_bf16_L32_E32"
    for C, itemsize, dtype in ((32000, 4, "float32"), (128256, 2, "bfloat16")):
        launch = plan(2048, C, itemsize, True, dtype=dtype)
        assert launch.kernel.startswith("softmax_kl_block_vec_") and launch.block == 512 and launch.grid == 2048
        few = plan(64, C, itemsize, True, dtype=dtype)
        assert few.kernel.startswith("softmax_kl_cluster_") and few.cluster == 8 and few.grid == 64 * 8
        assert few.block == {4: 1024, 2: 512}[itemsize]
        assert plan(131, C, itemsize, True, dtype=dtype).cluster == 8          # the H200's 132 SMs: the edge
        assert plan(132, C, itemsize, True, dtype=dtype).kernel.startswith("softmax_kl_block_vec_")
        assert plan(64, C, itemsize, True, dtype=dtype, sms=32).kernel.startswith("softmax_kl_block_vec_")
        assert plan(64, C, itemsize, True, dtype=dtype, clusters=False).kernel.startswith("softmax_kl_block_vec_")
    assert plan(7, 4099, 4, True).kernel == "softmax_kl_block_f32"     # C not a multiple of the vector
    assert plan(64, 262144, 4, True).cluster == 16                      # 8 blocks cannot hold the row
    assert plan(64, 600000, 4, True)[:3] == ("softmax_kl_block_vec_f32", 64, 512)   # nor can 16


def test_cluster_size_chosen_by_shared_memory():
    """The plan's automatic cluster size, run: 12,800 float32 classes = 3,200 packs; with a 64 KB
    target a block holds at most ~2,000 packs of each input, so the plan takes CL = 2."""
    s, t, y, mask = make(3, 12800, 5, "float32")
    kw = dict(T=3.0, alpha=0.6, kind="kl", reduction="sum", mask=mask)
    loss, grad, _, launch = emulated(s, t, y, variant="cluster", threads=128, smem_target=64 * 1024, **kw)
    assert launch.cluster == 2
    check(loss, grad, s, t, y, "float32", **kw)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("C", [100, 1031, 4096])
def test_block_and_warp_kernels(dtype, C):
    """The two-pass block kernel (with and without 16-byte vectors) and the warp-per-row kernel."""
    s, t, y, mask = make(6, C, C, dtype)
    variant = "warp" if C == 100 else "block"
    for unlabeled in ("ignore", "soft"):
        kw = dict(T=2.0, alpha=0.7, kind="kl", reduction="batchmean", mask=mask, unlabeled=unlabeled)
        loss, grad, _, launch = emulated(s, t, y, variant=variant, threads=64 if variant == "block" else None, **kw)
        assert variant in launch.kernel
        check(loss, grad, s, t, y, dtype, **kw)


@pytest.mark.parametrize("variant,C,options", [("rows", 10, {}), ("rows", 1000, {}), ("rows_recompute", 1000, {}),
                                               ("cluster", 5000, {"cluster": 4}),
                                               ("cluster", 2048, {"cluster": 1}), ("block", 1031, {}),
                                               ("warp", 300, {})])
def test_in_place_and_repeatable(variant, C, options):
    """out = student gives the same bits as a separate output (the kernel reads every value it needs
    before any thread overwrites it), and a second run gives the same bits."""
    s, t, y, _ = make(5, C, 3, "float32")
    kw = dict(T=2.0, alpha=0.5, kind="kl", reduction="batchmean")
    threads = None if variant in ("rows", "warp") else 64
    l1, g1, _, _ = emulated(s, t, y, variant=variant, threads=threads, **options, **kw)
    l2, g2, _, _ = emulated(s, t, y, variant=variant, threads=threads, **options, **kw)
    s2 = s.copy()
    l3, g3, _, _ = emulated(s2, t, y, out=s2, variant=variant, threads=threads, **options, **kw)
    assert g3 is s2
    assert l1 == l2 == l3 and g1.tobytes() == g2.tobytes() == g3.tobytes()
    check(l1, g1, s, t, y, "float32", **kw)


@pytest.mark.parametrize("variant,C,options", [("rows", 10, {}), ("rows", 200, {}), ("cluster", 2048, {"cluster": 2}),
                                               ("block", 1031, {}), ("warp", 10, {})])
def test_flags_and_masked_rows(variant, C, options):
    """Rows with NaN / +inf / all -inf are flagged (1: student, 2: teacher) with zero gradient; rows
    that count nowhere (label -100, masked) are not read (NaN there is fine): zero gradient and loss."""
    s, t, y, _ = make(6, C, 1, "float32")
    assert y[1] == -100
    s[0, 3] = np.nan
    s[1, 5] = np.nan   # ignored by its label
    t[2, 4] = np.inf
    s[3] = -np.inf
    s[4, 5] = np.nan   # masked
    mask = np.array([True, True, True, True, False, True])
    threads = None if variant in ("rows", "warp") else 64
    loss, grad, flags, _ = emulated(s, t, y, T=2.0, alpha=0.5, reduction="none", mask=mask, variant=variant,
                                    threads=threads, **options)
    assert flags.tolist() == [1, 0, 2, 1, 0, 0]
    assert not grad[:5].any() and loss[1] == 0.0 and loss[4] == 0.0
    kw = dict(T=2.0, alpha=0.5, kind="kl", reduction="none")
    check(loss[5:], grad[5:], s[5:], t[5:], y[5:], "float32", **kw)


@pytest.mark.parametrize("variant,C,options", [("rows", 10, {}), ("cluster", 2048, {"cluster": 2}), ("block", 1031, {})])
def test_infinite_kl(variant, C, options):
    """A student class at -inf where the teacher has mass: the KL is +inf (as the reference says)."""
    s, t, y, _ = make(2, C, 2, "float32")
    t[0] = np.linspace(0.0, 1.0, C, dtype=np.float32)   # finite: the teacher has mass everywhere
    s[0, 2] = -np.inf
    threads = None if variant == "rows" else 64
    loss, _, flags, _ = emulated(s, t, np.zeros(2, np.int64), T=1.0, alpha=1.0, reduction="none", variant=variant,
                                 threads=threads, **options)
    assert loss[0] == np.inf and np.isfinite(loss[1]) and not flags.any()


def test_the_emulator_catches_what_hardware_leaves_undefined():
    """A test of the tests: two deliberately wrong kernels of the harness. Reading shared memory
    before its cp.async is waited for sees the poison (NaN), not the data; a shuffle whose partner
    lane has exited is refused; so is a grid that is not a multiple of the cluster size."""
    x = np.arange(4 * 32, dtype=np.float32)
    y = np.zeros(32, np.float32)
    emu_runner.run("broken_read_before_wait", 1, 32, (x, y), shared=4 * x.nbytes)
    assert np.isnan(y).all()
    with pytest.raises(AssertionError, match="lane that has exited"):
        emu_runner.run("broken_shuffle_after_exit", 1, 32, (x, y))
    s = np.zeros((2, 64), np.float32)
    args = kernel_args(prepared(s, s, np.zeros(2, np.int64)), "kl", s.copy(), np.zeros(2, np.float32),
                       np.zeros(2, np.int8))
    with pytest.raises(AssertionError, match="multiple of the cluster size"):
        emu_runner.run("softmax_kl_cluster_f32_c2", 3, 64, args, shared=4096, cluster=2)


# ---------------------------------------------------------------- the CuPy launcher and the GPU benchmark

@pytest.mark.filterwarnings(NO_FALLBACK)
def test_cupy_launcher_on_the_emulator(monkeypatch):
    """softmax_kl(..., backend="cupy") whole -- plan, arguments, launch, flags, sum, out= -- with the
    stand-in cupy of fake_cupy.py, against the reference; bad values raise the reference's error."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    from minikd.kernels import softmax_kl
    # 8192 float32: one block a row with 66 KB of shared memory, over the 48 KB a launch gets
    # without opting in (the stand-in refuses that launch as the driver would)
    for C, dtype in ((10, "float32"), (2048, "bfloat16"), (1031, "float16"), (8192, "float32")):
        s, t, y, mask = make(6 if C < 8192 else 3, C, C, dtype)
        kw = dict(T=2.0, alpha=0.7, kind="ce", reduction="batchmean")
        S = cp.asarray(s)
        loss, grad = softmax_kl(S, cp.asarray(t), cp.asarray(y), mask=cp.asarray(mask), backend="cupy", **kw)
        assert type(grad).__module__ == "cupy"
        check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, dtype, mask=mask, **kw)
        l2, g2 = softmax_kl(S, cp.asarray(t), cp.asarray(y), mask=cp.asarray(mask), out=S, backend="cupy", **kw)
        assert g2 is S and cp.asnumpy(g2).tobytes() == cp.asnumpy(grad).tobytes()
    s = cp.zeros((4, 50), np.float32)
    s[2, 3] = np.nan
    with pytest.raises(ValueError, match="student: row 2 contains NaN"):
        softmax_kl(s, cp.zeros_like(s), cp.zeros(4, np.int64), T=1.0, alpha=0.5, backend="cupy")


@pytest.mark.filterwarnings(NO_FALLBACK)
def test_cupy_launcher_divergences(monkeypatch):
    """softmax_kl(..., backend="cupy", or "auto" on CuPy arrays) runs reverse_kl, jsd (beta passed
    through) and tvd on the CUDA kernel, not on the reference (made to refuse here); a missing beta
    and a kind the kernel lacks (dkd) are refused as before."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    import minikd.kernels as kernels
    from minikd.checks import UserError
    from minikd.kernels import softmax_kl

    def no_reference(*args, **kwargs):
        raise AssertionError("softmax_kl fell back to the reference")
    monkeypatch.setattr(kernels, "kd_loss_and_grad", no_reference)
    s, t, y, mask = make_divergences(6, 100, 3, "float32", Ts=(2.0,))
    S, T_, Y, M = cp.asarray(s), cp.asarray(t), cp.asarray(y), cp.asarray(mask)
    for kind, beta in (("reverse_kl", None), ("jsd", 0.3), ("tvd", None)):
        for backend, reduction in (("cupy", "none"), ("auto", "batchmean")):
            kw = dict(T=2.0, alpha=0.7, kind=kind, beta=beta, reduction=reduction, unlabeled="soft")
            loss, grad = softmax_kl(S, T_, Y, mask=M, backend=backend, **kw)
            assert type(grad).__module__ == "cupy"
            check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "float32", mask=mask, **kw)
    with pytest.raises(UserError, match="beta: kind='jsd' needs beta"):
        softmax_kl(S, T_, Y, T=2.0, alpha=0.5, kind="jsd", backend="cupy")
    with pytest.raises(UserError, match="kind='dkd': the cupy kernel computes kind kl, ce, reverse_kl, jsd, tvd"):
        softmax_kl(S, T_, Y, T=2.0, alpha=0.5, kind="dkd", backend="cupy")


def test_cupy_launcher_refuses_an_unsafe_out(monkeypatch):
    """The CuPy backend applies the same ``out=`` rule (minikd.kernels.check_out) before any launch:
    out over other rows of the student or over the teacher, out of the other kind (NumPy), out not
    an array; in place over the student (a view with its pointer, shape and strides) still runs."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    from minikd.kernels import softmax_kl
    s, t, y, _ = make(5, 10, 0, "float32")
    buf = cp.asarray(np.concatenate([s, s[:1]]))
    S, T_, Y = buf[:-1], cp.asarray(t), cp.asarray(y)
    kw = dict(T=2.0, alpha=0.5, backend="cupy")
    for out, name in ((buf[1:], "student"), (T_, "teacher"), (T_[::-1], "teacher")):
        with pytest.raises(ValueError, match=f"out: overlaps the memory of {name}; pass an array"):
            softmax_kl(S, T_, Y, out=out, **kw)
    with pytest.raises(TypeError, match="out: expected a CuPy array like the student, got numpy.ndarray"):
        softmax_kl(S, T_, Y, out=np.empty_like(s), **kw)
    with pytest.raises(TypeError, match="out: expected a NumPy or CuPy array, got list"):
        softmax_kl(S, T_, Y, out=s.tolist(), **kw)
    with pytest.raises(TypeError, match="student: expected a NumPy or CuPy array, got list"):
        softmax_kl(s.tolist(), T_, Y, **kw)
    assert cp.asnumpy(buf[:-1]).tobytes() == s.tobytes()   # refused before any work
    loss, grad = softmax_kl(S, T_, Y, out=S[:], **kw)
    check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "float32", T=2.0, alpha=0.5, kind="kl", reduction="batchmean")


def test_cupy_launcher_opt_ins_and_fallback(monkeypatch):
    """The attributes a launch needs are set on the function CuPy's RawKernel wraps, and raised,
    never lowered, as launches of one kernel grow and shrink; a cluster launch the driver refuses
    falls back to the block kernel with a warning (same result), and with ``fallback=False`` the
    driver's error is raised."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    import minikd.kernels.cupy_gpu as g
    kw = dict(T=2.0, alpha=0.5, kind="kl", reduction="sum")
    forced = dict(scale_t2=True, ignore_index=-100, mask=None, out=None, variant="cluster", cluster=1, **kw)
    for C in (12288, 8192, 12288):   # 99 KB, 66 KB, 99 KB of shared memory: one kernel, cluster 1
        s, t, y, _ = make(2, C, C, "float32")
        loss, grad = g.softmax_kl_cupy(cp.asarray(s), cp.asarray(t), cp.asarray(y), **forced)
        check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "float32", **kw)
    fn = g._KERNELS[(0, "softmax_kl_cluster_f32_c1")]
    assert fn.max_dynamic_shared_size_bytes == g.SMEM_HEAD + 2 * 16 * (12288 // 4)
    # a limit the driver refuses: the block kernel runs instead, with a warning
    monkeypatch.setattr(fake_cupy, "SMEM_OPT_IN_LIMIT", 48 * 1024)
    monkeypatch.setattr(g, "_SMEM_OPT_IN", {})
    monkeypatch.setattr(g, "_KERNELS", {})
    monkeypatch.setattr(g, "_MODULE", None)
    s, t, y, _ = make(2, 8192, 8192, "float32")
    with pytest.warns(RuntimeWarning, match="ran softmax_kl_block_vec_f32 instead"):
        loss, grad = g.softmax_kl_cupy(cp.asarray(s), cp.asarray(t), cp.asarray(y), **forced)
    check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "float32", **kw)
    args = kernel_args(prepared(cp.asarray(s), cp.asarray(t), cp.asarray(y), T=2.0, on_device=True), "kl",
                       cp.empty_like(cp.asarray(s)), cp.empty(2, np.float32), cp.zeros(2, np.int8))
    launch = plan(2, 8192, 4, True, variant="cluster", cluster=1)
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="INVALID_VALUE"):
        g.launch_kernels(args, launch, fallback=False)


@pytest.mark.filterwarnings(NO_FALLBACK)
def test_cupy_launcher_before_sm90(monkeypatch):
    """A GPU without clusters (compute capability < 9.0): the module has no cluster kernels (the
    .cu leaves them out there; the stand-in's module too) and the plan never names one: long rows
    run on the block kernel, with no warning. Forcing the cluster variant is an error."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(fake_cupy, "COMPUTE_CAPABILITY", "80")
    import minikd.kernels.cupy_gpu as g
    from minikd.kernels import softmax_kl
    assert not g.device_caps().clusters
    s, t, y, mask = make(3, 2048, 5, "bfloat16")
    kw = dict(T=3.0, alpha=0.6, kind="kl", reduction="batchmean")
    loss, grad = softmax_kl(cp.asarray(s), cp.asarray(t), cp.asarray(y), mask=cp.asarray(mask), backend="cupy",
                            **kw)
    check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "bfloat16", mask=mask, **kw)
    assert {name for _, name in g._KERNELS} == {"softmax_kl_block_vec_bf16", "sum_rows"}
    with pytest.raises(ValueError, match="compute capability >= 9.0"):
        g.softmax_kl_cupy(cp.asarray(s), cp.asarray(t), cp.asarray(y), scale_t2=True, ignore_index=-100,
                          mask=None, out=None, variant="cluster", **kw)


def test_plan_follows_the_device(monkeypatch):
    """The plan's limits are read off the device: H100 (227 KB a block, 228 KB an SM) keeps the
    defaults; a GPU with 99 KB a block and 100 KB an SM (sm_120's) gets a smaller share per block,
    so a larger cluster, for the same row, and no cluster it could not launch."""
    import fake_cupy
    fake_cupy.install(monkeypatch)
    import minikd.kernels.cupy_gpu as g
    h100 = g.device_caps()
    assert h100 == g.DeviceCaps(True, g.SMEM_MAX, g.SMEM_TARGET)
    monkeypatch.setattr(g, "_CAPS", {})
    monkeypatch.setattr(fake_cupy, "COMPUTE_CAPABILITY", "120")
    monkeypatch.setattr(fake_cupy, "SMEM_OPT_IN_LIMIT", 99 * 1024)
    monkeypatch.setattr(fake_cupy, "SMEM_PER_SM", 100 * 1024)
    small = g.device_caps()
    assert small == g.DeviceCaps(True, 99 * 1024, 50 * 1024 - 1024)
    for C, cl_h100, cl_small in ((32000, 4, 8), (128256, 8, 16)):
        a = g.plan(64, C, 4, True, variant="cluster", **h100._asdict())
        b = g.plan(64, C, 4, True, variant="cluster", **small._asdict())
        assert (a.cluster, b.cluster) == (cl_h100, cl_small), (C, a, b)
        assert a.shared <= h100.smem_max and b.shared <= small.smem_max
    # a row no cluster of that device can hold: the block kernel
    assert g.plan(4, 600000, 4, True, variant="cluster", **small._asdict()).kernel == "softmax_kl_block_vec_f32"
    # a target above the block limit is held to the limit
    tight = g.DeviceCaps(True, 48 * 1024, g.SMEM_TARGET)
    assert g.plan(4, 8192, 4, True, variant="cluster", **tight._asdict()).shared <= 48 * 1024


def test_cupy_launcher_label_errors_like_the_reference(monkeypatch):
    """The label range is checked on the device (flag 4, read back with the row flags: one sync a
    call); the error is still the reference's, word for word, also for a masked row (the reference
    checks labels before the mask). No valid row at all: loss 0 and gradient 0."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    import minikd as mk
    from minikd.kernels import softmax_kl
    s, t, y, _ = make(5, 10, 0, "float32")
    for bad, mask in ((50, None), (-3, None), (10, np.array([True, False, True, True, True]))):
        yb = y.copy()
        yb[1] = bad
        with pytest.raises(ValueError) as ref:
            mk.kd_loss_and_grad(s.astype(np.float64), t.astype(np.float64), yb, T=2.0, alpha=0.5, mask=mask)
        with pytest.raises(ValueError) as got:
            softmax_kl(cp.asarray(s), cp.asarray(t), cp.asarray(yb), T=2.0, alpha=0.5, backend="cupy",
                       mask=None if mask is None else cp.asarray(mask))
        assert str(got.value) == str(ref.value) and "labels: row 1 has label" in str(got.value)
    loss, grad = softmax_kl(cp.asarray(s), cp.asarray(t), cp.asarray(np.full(5, -100)), T=2.0, alpha=0.5,
                            backend="cupy")
    assert float(loss) == 0.0 and not cp.asnumpy(grad).any()


def test_cupy_launcher_reads_back_once(monkeypatch):
    """A valid call reads one thing back to the host (the row flags): counted on the stand-in cupy's
    arrays, whose bool / int / float / item / get count as reads (a sync each on a GPU)."""
    import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    from minikd.kernels import softmax_kl
    s, t, y, mask = make(6, 100, 4, "float32")
    args = [cp.asarray(a) for a in (s, t, y, mask)]
    for reduction in ("batchmean", "sum", "none"):
        fake_cupy.HOST_READS = 0
        loss, grad = softmax_kl(*args[:3], mask=args[3], T=2.0, alpha=0.5, reduction=reduction, backend="cupy")
        assert fake_cupy.HOST_READS == 1, reduction
        check(cp.asnumpy(loss), cp.asnumpy(grad), s, t, y, "float32", T=2.0, alpha=0.5, kind="kl",
              reduction=reduction, mask=mask)


@pytest.mark.parametrize("with_torch", [False, True])
def test_gpu_benchmark_runs_on_the_emulator(monkeypatch, tmp_path, with_torch):
    """`python benchmarks/softmax_kl.py --gpu` end to end on tiny shapes: every variant checked against the reference,
    the JSON and the PNG written (N = 70 > the 64 rows the reference is computed on: the batchmean
    gradient of N rows is 64/N of the reference's); with PyTorch (if installed) its eager lines run on the CPU
    (torch.compile is left out: budget 0). The times are the emulator's: meaningless."""
    import json
    import sys

    import fake_cupy
    fake_cupy.install(monkeypatch)
    import softmax_kl_gpu as bg
    if with_torch:
        pytest.importorskip("torch")
        monkeypatch.setattr(bg, "TORCH_DEVICE", "cpu")
    else:
        monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    # with torch: its eager lines on one short shape; every kernel family and the other kinds'
    # timings are checked once, without torch (the emulator is slow)
    monkeypatch.setattr(bg, "SHAPES", [(70, 10), (3, 2048), (2, 1030)] if not with_torch else [(70, 10)])
    if with_torch:
        monkeypatch.setattr(bg, "KINDS", ())
    monkeypatch.setattr(bg, "GPU_EXTRA_SHAPES", [])
    monkeypatch.setattr(bg, "VARIANT_THREADS", (64,))   # every emulated CUDA thread is an OS thread
    monkeypatch.setattr(bg, "BLOCK_VARIANT_THREADS", (64,))
    import minikd.kernels.cupy_gpu as g
    monkeypatch.setattr(g, "SUM_THREADS", 64)
    monkeypatch.setattr(g, "BLOCK_THREADS", 64)
    monkeypatch.setattr(g, "CLUSTER_THREADS", 64)
    monkeypatch.setattr(g, "FEW_ROWS_THREADS", {4: 64, 2: 64})
    monkeypatch.setattr(g, "CLUSTER_SIZES", (1, 2, 16))   # fewer variants; 16 still takes the opt-in path
    monkeypatch.setattr(bg, "COPY_BYTES", 1 << 20)
    monkeypatch.setattr(bg, "FLUSH_BYTES", 1 << 16)
    from softmax_kl import main
    assert main(["--gpu", "--repeats", "1", "--compile-budget", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("softmax_kl-gpu-CPU-emulator.json")
    result = json.loads(path.read_text())
    assert len(result["rows"]) == 2 * len(bg.SHAPES) and (tmp_path / "softmax_kl-gpu-CPU-emulator.png").exists()
    for r in result["rows"]:
        assert r["variants"] and all(v.get("ok") for v in r["variants"]), r["variants"]
        assert [v["kind"] for v in r["kinds"]] == ([] if with_torch else ["reverse_kl", "jsd", "tvd"])
        assert all(v.get("ok") for v in r["kinds"])
        assert r["kernel_ms"] > 0 and r["call_ms"] > 0
        assert ("torch_eager_ms" in r) == with_torch and "torch_compile_ms" not in r
    kernels = {v["kernel"].split("_")[2] for r in result["rows"] for v in r["variants"]}
    assert kernels == ({"rows", "warp"} if with_torch else {"rows", "warp", "cluster", "block"})
    png = tmp_path / "softmax_kl-gpu-CPU-emulator.png"
    png.unlink()
    assert main(["--plot", str(path)]) == 0 and png.exists()   # redrawn from the JSON alone
