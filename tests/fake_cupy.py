"""A stand-in ``cupy`` module for tests on machines without a GPU: NumPy arrays in a subclass whose
type claims the ``cupy`` module (as minikd.backend checks), and ``RawModule`` kernels that run on
the CPU emulator of tests/cuda_emu. With it, the CuPy launcher (``softmax_kl(..., backend="cupy")``)
and the GPU benchmark (``benchmarks/softmax_kl.py --gpu``) execute every line they would on a GPU; the
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


# the emulated device (H100's values; tests may change them): cupy.cuda.Device().compute_capability,
# the most dynamic shared memory a block may opt in to, an SM's shared memory, the driver's share per block
COMPUTE_CAPABILITY = "90"
SMEM_OPT_IN_LIMIT = 227 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MULTIPROCESSORS = 132
_FUNCTIONS = {}   # CUfunction handle -> _Function, for driver.funcSetAttribute


class CUDADriverError(RuntimeError):
    """cupy.cuda.driver.CUDADriverError: what CuPy raises when the driver refuses a call."""


class _Function:
    """cupy.cuda.function.Function: the device's CUfunction (``ptr``), where attributes live."""

    def __init__(self, name):
        self.name = name
        self.ptr = id(self)
        self.max_dynamic_shared = 48 * 1024
        self.non_portable_cluster = False
        _FUNCTIONS[self.ptr] = self


class RawKernel:
    """cupy.RawKernel as RawModule.get_function returns it (a new one each call, over the same
    function): ``kernel.ptr``, a settable ``max_dynamic_shared_size_bytes``, no ``ptr`` of its own.
    A launch the driver would refuse raises CUDADriverError: dynamic shared memory over the
    function's limit, a cluster of more than 8 blocks without the non-portable opt-in."""

    def __init__(self, function):
        self._function = function

    @property
    def kernel(self):
        return self._function

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._function.max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, n):
        _set_attribute(self._function.ptr, 8, n)

    def __call__(self, grid, block, args, *, shared_mem=0):
        f = self._function
        m = re.search(r"_c(\d+)$", f.name)
        cluster = int(m.group(1)) if m else 1
        if shared_mem > f.max_dynamic_shared:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {f.name} asks for {shared_mem} bytes of dynamic "
                                  f"shared memory, its limit is {f.max_dynamic_shared}")
        if cluster > 8 and not f.non_portable_cluster:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_CLUSTER_SIZE: {f.name}: {cluster} blocks without the "
                                  f"non-portable cluster size attribute")
        args = tuple(np.asarray(a).view(np.ndarray) if isinstance(a, np.ndarray) else a for a in args)
        emu_runner.run(f.name, grid[0], block[0], args, shared=shared_mem, cluster=cluster)


def _set_attribute(ptr, attribute, value):
    f = _FUNCTIONS[ptr]
    if attribute == 8:    # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if value > SMEM_OPT_IN_LIMIT:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {value} bytes of dynamic shared memory")
        f.max_dynamic_shared = value
    elif attribute == 14:   # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
        f.non_portable_cluster = bool(value)
    else:
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: attribute {attribute} is not settable")


class RawModule:
    def __init__(self, code, options=()):
        self.code = code
        self.functions = {}

    def get_function(self, name):
        """As NVRTC would compile the .cu for the emulated device: no cluster kernels before sm_90."""
        if not re.search(rf'\b{re.escape(name)}\b|_##NAME', self.code) or \
                (name.startswith("softmax_kl_cluster_") and int(COMPUTE_CAPABILITY) < 90):
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        if name not in self.functions:
            self.functions[name] = _Function(name)
        return RawKernel(self.functions[name])


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
    cuda.Device = lambda *a: types.SimpleNamespace(synchronize=lambda: None, compute_capability=COMPUTE_CAPABILITY)
    attributes = {"cudaDevAttrMaxSharedMemoryPerBlockOptin": (97, lambda: SMEM_OPT_IN_LIMIT),   # (CUDA's number,
                  "cudaDevAttrMaxSharedMemoryPerMultiprocessor": (81, lambda: SMEM_PER_SM),    # the value now)
                  "cudaDevAttrReservedSharedMemoryPerBlock": (111, lambda: SMEM_RESERVED_PER_BLOCK),
                  "cudaDevAttrMultiProcessorCount": (16, lambda: MULTIPROCESSORS)}
    by_number = {number: value for number, value in attributes.values()}
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0,
                                         getDeviceProperties=lambda i: {"name": b"CPU emulator"},
                                         deviceGetAttribute=lambda attr, dev: by_number[attr](),
                                         **{name: number for name, (number, _) in attributes.items()})
    cuda.driver = types.SimpleNamespace(funcSetAttribute=_set_attribute, CUDADriverError=CUDADriverError,
                                        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
    mod.cuda = cuda
    return mod


def install(monkeypatch):
    """Put the stand-in in sys.modules as ``cupy`` and ``cupy.cuda`` for one test. Not as
    ``cupy.cuda.driver``: in CuPy that is an attribute of ``cupy.cuda`` (the module is
    ``cupy_backends.cuda.api.driver``), so ``from cupy.cuda.driver import X`` fails on a real GPU and
    must fail here too."""
    mod = make_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setitem(sys.modules, "cupy.cuda", mod.cuda)
    import minikd.kernels.cupy_gpu as g
    monkeypatch.setattr(g, "_MODULE", None)
    monkeypatch.setattr(g, "_KERNELS", {})
    monkeypatch.setattr(g, "_SMEM_OPT_IN", {})
    monkeypatch.setattr(g, "_CLUSTER_OPT_IN", set())
    monkeypatch.setattr(g, "_CAPS", {})
    return mod
