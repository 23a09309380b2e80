"""Runs kernels/softmax_kl.cu on the CPU: builds tests/cuda_emu/harness.cpp with g++ against
the CUDA headers (for the half and bfloat16 types) and calls kernels through ctypes on NumPy arrays.
``available()`` says why it cannot (no g++, no CUDA headers) so tests can skip."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from minikd.kernels.cupy_gpu import SOURCE

HERE = Path(__file__).parent / "cuda_emu"
_LIB = None


def cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cuda_bf16.h").exists():
            return inc
    return None


def available() -> str | None:
    """None when the emulator can be built, else the reason it cannot."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include() is None:
        return "the CUDA headers (cuda_fp16.h, cuda_bf16.h) are not found"
    return None


def library():
    """Build (once per source version, cached in the temp folder) and load the emulator."""
    global _LIB
    if _LIB is None:
        files = [HERE / "emu.h", HERE / "harness.cpp", SOURCE]
        key = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        so = Path(tempfile.gettempdir()) / f"minikd_emu_{key}.so"
        if not so.exists():
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{cuda_include()}",
                   f'-DMINIKD_KERNEL_SOURCE="{SOURCE}"', str(HERE / "harness.cpp"), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"building the CUDA emulator failed:\n{res.stderr[-4000:]}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.emu_run.restype = ctypes.c_int
        lib.emu_run.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_uint,
                                ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
        _LIB = lib
    return _LIB


_CTYPE = {np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.int32): ctypes.c_int,
          np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def run(name: str, grid: int, block: int, args, *, shared: int = 0, cluster: int = 1) -> None:
    """Launch kernel `name` with `args` (NumPy arrays for pointers, NumPy scalars for values)."""
    lib = library()
    keep = []
    ptrs = (ctypes.c_void_p * len(args))()
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError(f"argument {i}: arrays must be C-contiguous")
            v = ctypes.c_void_p(a.ctypes.data)
        else:
            v = _CTYPE[np.asarray(a).dtype](a.item() if hasattr(a, "item") else a)
        keep.append(v)
        ptrs[i] = ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
    err = ctypes.create_string_buffer(512)
    rc = lib.emu_run(name.encode(), grid, block, shared, cluster, ptrs, err, len(err))
    if rc == 1:
        raise KeyError(f"the emulator has no kernel named {name}")
    if rc == 2:
        raise AssertionError(f"{name}: the emulator caught undefined behaviour: {err.value.decode()}")
