"""What can be checked of the GPU kernel's source without a GPU, besides running it on the CPU
emulator (test_kernels_emulated.py): it compiles for sm_90 with nvcc (when nvcc is on the machine)
without register spills and with NVRTC, the compiler CuPy's RawModule uses (when libnvrtc is
found), every kernel the launcher's plan names exists in it, and the launcher's argument tuple
matches the kernel signature."""
import ctypes
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from emu_runner import cuda_include   # the folder of cuda_fp16.h / cuda_bf16.h (CuPy passes its CUDA's too)

from minikd.kernels.cupy_gpu import SOURCE

HERE = Path(__file__).parent


def plan_kernel_names(clusters=True):
    """Every kernel name plan() can return, over dtypes, alignments, variants and sizes, on a GPU
    with thread-block clusters (sm_90) or without (older GPUs)."""
    from minikd.kernels.cupy_gpu import CLUSTER_SIZES, VARIANTS, plan
    names = set()
    for dtype, itemsize in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        for C in (1, 2, 3, 4, 5, 9, 17, 33, 64, 65, 100, 128, 129, 256, 257, 512, 513, 1000, 1024, 1025, 4096, 32000,
                  128256, 600000):
            for aligned in (False, True):
                for variant in VARIANTS:
                    if (variant.startswith("rows") and C > 1024) or (variant == "cluster" and not clusters):
                        continue
                    names.add(plan(7, C, itemsize, aligned, dtype=dtype, variant=variant, clusters=clusters).kernel)
                if clusters and aligned and C % (16 // itemsize) == 0:
                    for cl in CLUSTER_SIZES:
                        try:
                            names.add(plan(7, C, itemsize, True, dtype=dtype, variant="cluster", cluster=cl).kernel)
                        except ValueError:   # the row does not fit that many blocks
                            pass
    return names


def test_plan_names_kernels_of_the_source():
    """Without nvcc too: each name the plan returns is an extern "C" kernel of the .cu file
    (the macros expanded by hand: ROWS(NAME, T, L, E) and CLUSTER(NAME, T, CL) lines parsed)."""
    src = SOURCE.read_text()
    rows = re.findall(r"ROWS\(NAME, T, (\d+), (\d+)\)", src)
    recompute = re.findall(r"ROWS_RECOMPUTE\(NAME, T, (\d+), (\d+)\)", src)
    clusters = re.findall(r"CLUSTER\(NAME, T, (\d+)\)", src)
    defined = {"sum_rows"}
    for dt in ("f32", "f16", "bf16"):
        defined |= {f"softmax_kl_warp_{dt}", f"softmax_kl_block_{dt}", f"softmax_kl_block_vec_{dt}"}
        defined |= {f"softmax_kl_rows_{dt}_L{lanes}_E{elems}" for lanes, elems in rows}
        defined |= {f"softmax_kl_rows_recompute_{dt}_L{lanes}_E{elems}" for lanes, elems in recompute}
        defined |= {f"softmax_kl_cluster_{dt}_c{cl}" for cl in clusters}
    names = plan_kernel_names()
    assert names <= defined, names - defined
    assert len(names) >= 40   # all three families, every dtype


def test_plan_without_clusters_names_no_cluster_kernel():
    names = plan_kernel_names(clusters=False)
    assert names and not any(n.startswith("softmax_kl_cluster_") for n in names)
    assert plan_kernel_names(clusters=True) > names


def nvcc_parallel():
    """nvcc's option to compile the kernels on every core (CUDA >= 12.1; 129 s -> 64 s for sm_90 on
    2 cores), or nothing where this nvcc has no such option."""
    res = subprocess.run(["nvcc", "--help"], capture_output=True, text=True, timeout=60)
    return ["-split-compile=0"] if "--split-compile" in res.stdout else []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_source_compiles(tmp_path, arch):
    """sm_90 (H100): every kernel; sm_80 (A100): all but the cluster kernels, which need sm_90."""
    res = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", *nvcc_parallel(), "-c", str(SOURCE),
                          "-o", str(tmp_path / "softmax_kl.o")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    # every kernel the launcher's plan can name on that GPU exists, with no register spills
    clusters = arch == "sm_90"
    for name in sorted(plan_kernel_names(clusters)):
        assert f"Compiling entry function '{name}'" in res.stderr, name
    assert ("Compiling entry function 'softmax_kl_cluster_" in res.stderr) == clusters
    assert "sum_rows" in res.stderr
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    assert spills and all(int(n) == 0 for n in spills)
    # no local memory either (a row "in registers" indexed at run time would land there unspilled)
    frames = re.findall(r"(\d+) bytes stack frame", res.stderr)
    assert len(frames) == len(spills) and all(int(n) == 0 for n in frames)


def find_nvrtc():
    """libnvrtc: $MINIKD_NVRTC, else the one a pip wheel put under site-packages
    (``pip install nvidia-cuda-nvrtc`` for CUDA 13, ``nvidia-cuda-nvrtc-cu12`` for 12), else None."""
    if os.environ.get("MINIKD_NVRTC"):
        return os.environ["MINIKD_NVRTC"]
    import site
    for root in site.getsitepackages():
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            found = sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p
                           and ".alt." not in p)
            if found:
                return found[0]
    return None


@pytest.mark.skipif(find_nvrtc() is None or cuda_include() is None,
                    reason="no libnvrtc (pip install nvidia-cuda-nvrtc) or no CUDA headers")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_source_compiles_with_nvrtc(arch):
    """CuPy compiles the .cu with NVRTC, not nvcc, for the GPU at hand: the same source, CuPy's
    options, a cubin (so ptxas runs too); every kernel the plan can name there is a symbol of it."""
    lib = ctypes.CDLL(find_nvrtc())
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"softmax_kl.cu", 0, None, None) == 0
    # what cupy.RawModule passes (CuPy 14.2, read off its compile call): ours, -ftz=true, the
    # architecture, --device-as-default-execution-space (and include paths for its own headers)
    opts = [b"-std=c++17", b"-ftz=true", f"-arch={arch}".encode(), b"--device-as-default-execution-space",
            f"-I{cuda_include()}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()[-4000:]
    assert lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == 0 and size.value > 0
    cubin = ctypes.create_string_buffer(size.value)
    assert lib.nvrtcGetCUBIN(prog, cubin) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    symbols = set(re.findall(rb"[A-Za-z_][A-Za-z0-9_]*", cubin.raw))
    clusters = arch == "sm_90"
    missing = [name for name in sorted(plan_kernel_names(clusters) | {"sum_rows"}) if name.encode() not in symbols]
    assert not missing, missing
    assert any(name.startswith(b"softmax_kl_cluster_") for name in symbols) == clusters


def test_launcher_arguments_match_the_kernel_signature():
    """The CuPy launcher's argument tuple against the KERNEL_ARGS macro of the .cu file, parsed:
    pointers where the kernel takes pointers (with the right element dtype), and scalars of the
    exact C width (CuPy passes NumPy scalars by value as their own type)."""
    import numpy as np

    from kernel_cases import prepared
    from minikd.kernels.cupy_gpu import kernel_args
    text = SOURCE.read_text()
    macro = re.search(r"#define KERNEL_ARGS\(T\)(.*?)\n#define", text, re.S).group(1).replace("\\", " ")
    params = [" ".join(p.split()) for p in macro.split(",")]
    s = np.zeros((3, 5), np.float32)
    args = kernel_args(prepared(s, s, np.zeros(3, np.int64), T=2.0), "kl", s, np.zeros(3, np.float32),
                       np.zeros(3, np.int8))
    assert len(params) == len(args)
    scalar = {"long long": np.int64, "int": np.int32, "float": np.float32}
    pointer = {"T": np.float32, "long long": np.int64, "float": np.float32, "signed char": np.int8}
    for param, arg in zip(params, args):
        ctype = param.replace("const ", "").rsplit(" ", 1)[0]
        if "*" in param:
            base = ctype.replace("*", "").strip()
            assert isinstance(arg, np.ndarray) and arg.dtype == pointer[base], param
        else:
            assert type(arg) is scalar[ctype], param
