"""A stand-in ``cupy`` module for tests on machines without a GPU: NumPy arrays in a subclass whose
type claims the ``cupy`` module (as minikd.backend checks), and ``RawModule`` kernels that run on
the CPU emulator of tests/cuda_emu. With it, the CuPy launcher (``softmax_kl(..., backend="cupy")``)
and the GPU benchmark (``minikd bench --gpu``) execute every line they would on a GPU; the
numbers they time are the emulator's and mean nothing. Only what minikd uses is provided.
"""
from __future__ import annotations

import re
import sys
import time
import types

import numpy as np

import emu_runner


HOST_READS = 0   # values read back to the host (each one a device-to-host sync on a GPU)


def _read(fn):
    def read(self, *args):
        global HOST_READS
        HOST_READS += 1
        return fn(np.asarray(self).view(np.ndarray), *args)
    return read


class ndarray(np.ndarray):   # noqa: N801  (CuPy's name)
    @property
    def data(self):   # CuPy: a MemoryPointer with .ptr
        return types.SimpleNamespace(ptr=self.ctypes.data)

    get = _read(lambda a: np.array(a))
    __bool__ = _read(np.ndarray.__bool__)
    __int__ = _read(np.ndarray.__int__)
    __float__ = _read(np.ndarray.__float__)
    __index__ = _read(np.ndarray.__index__)
    item = _read(np.ndarray.item)
    tolist = _read(np.ndarray.tolist)


ndarray.__module__ = "cupy"


def _wrap(x):
    return x.view(ndarray) if isinstance(x, np.ndarray) and not isinstance(x, ndarray) else x


def _wrapped(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(_wrap(o) for o in out) if isinstance(out, tuple) else _wrap(out)
    return call


class _Event:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Function:
    def __init__(self, name):
        self.name = name
        self.ptr = 0

    def __call__(self, grid, block, args, shared_mem=0):
        m = re.search(r"_c(\d+)$", self.name)
        args = tuple(np.asarray(a).view(np.ndarray) if isinstance(a, np.ndarray) else a for a in args)
        emu_runner.run(self.name, grid[0], block[0], args, shared=shared_mem, cluster=int(m.group(1)) if m else 1)


class RawModule:
    def __init__(self, code, options=()):
        self.code = code

    def get_function(self, name):
        if not re.search(rf'\b{re.escape(name)}\b|_##NAME', self.code):
            raise KeyError(name)
        return _Function(name)


def make_module() -> types.ModuleType:
    mod = types.ModuleType("cupy")
    mod.__version__ = "fake (CPU emulator)"
    mod.ndarray = ndarray

    def __getattr__(name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr
        return _wrapped(attr)
    mod.__getattr__ = __getattr__
    mod.asarray = lambda x, dtype=None: np.array(x, dtype=dtype).view(ndarray)
    mod.asnumpy = lambda x: x.get() if isinstance(x, ndarray) else np.array(x)
    mod.RawModule = RawModule
    mod.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    cuda = types.ModuleType("cupy.cuda")
    cuda.Event = _Event
    cuda.get_elapsed_time = lambda a, b: 1e3 * (b.t - a.t)
    cuda.Device = lambda *a: types.SimpleNamespace(synchronize=lambda: None)
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1,
                                         getDeviceProperties=lambda i: {"name": b"CPU emulator"})
    cuda.driver = types.SimpleNamespace(funcSetAttribute=lambda *a: None,
                                        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
    mod.cuda = cuda
    return mod


def install(monkeypatch):
    """Put the stand-in in sys.modules as ``cupy`` (and ``cupy.cuda``, ``cupy.cuda.driver``) for one test."""
    mod = make_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setitem(sys.modules, "cupy.cuda", mod.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.driver", mod.cuda.driver)
    import minikd.kernels.cupy_gpu as g
    monkeypatch.setattr(g, "_MODULE", None)
    monkeypatch.setattr(g, "_PREPARED", set())
    return mod
