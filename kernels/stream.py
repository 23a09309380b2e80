"""Non-temporal (streaming) stores for the fused kernel's gradient, which it writes once and never
reads again.

A plain store to memory first reads the line it writes (read for ownership), so writing the
gradient moves 8 bytes of memory traffic per float32 instead of 4, and the line then takes room in
the caches that the row buffers need. A non-temporal store writes whole lines past the caches,
without reading them. LLVM emits one (``vmovntps`` and kin) for a vector store marked
``!nontemporal`` whose address is aligned to its width, so ``stream_row`` writes plain stores up to
the first 64-byte boundary of the destination, one 64-byte vector at a time from there, and plain
stores after the last whole vector.

Non-temporal stores are weakly ordered: ``store_fence`` (a sequentially consistent fence, an
``mfence`` on x86, which orders them too) must run after the last of them and before anyone reads
the gradient; each kernel chunk ends with one, before its thread reports completion.

Where it pays (2-core AVX-512 machine, 2026-11-28, the fused kernel on two threads, median of 31
calls alternating with the plain stores): long rows, 0.95 of the plain stores' time at C = 1500,
0.90 at 2000, 0.82 at 4000, 0.84 at 32000, 0.92 at 128256; even at C = 1000; slower on short rows
(1.13 at C = 512, 1.5 at 100, where a row is mostly partial lines, stored plainly around the
streamed ones). ``numba_cpu.STREAM_FROM`` holds the threshold.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["stream_row", "store_fence", "STREAM_BYTES"]

STREAM_BYTES = 64   # one vector store: a cache line, a zmm register

if config.DISABLE_JIT:  # plain Python (NUMBA_DISABLE_JIT=1): plain copies, the same values
    def _store_nt(dst, i, src, j):
        n = STREAM_BYTES // dst.itemsize
        dst.reshape(-1)[i:i + n] = src[j:j + n]

    def store_fence():
        pass

    def _address(a):
        return a.ctypes.data
else:
    @intrinsic
    def _store_nt(typingctx, dst, i, src, j):
        """STREAM_BYTES of ``src`` from element j (any alignment) to ``dst`` (C-contiguous, any
        number of dimensions, flat element index i, whose address is STREAM_BYTES-aligned) by one
        non-temporal vector store."""
        if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype
                and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            d = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
            s = cgutils.create_struct_proxy(signature.args[2])(context, builder, value=args[2])
            et = context.get_data_type(signature.args[0].dtype)
            size = context.get_abi_sizeof(et)
            vt = ir.VectorType(et, STREAM_BYTES // size)
            i64 = ir.IntType(64)
            ii, jj = (v if v.type.width == 64 else builder.zext(v, i64) for v in (args[1], args[3]))
            v = builder.load(builder.bitcast(builder.gep(s.data, [jj]), vt.as_pointer()), align=size)
            st = builder.store(v, builder.bitcast(builder.gep(d.data, [ii]), vt.as_pointer()), align=STREAM_BYTES)
            st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
            return context.get_dummy_value()
        return types.void(dst, i, src, j), codegen

    @intrinsic
    def store_fence(typingctx):
        """A sequentially consistent fence: every earlier store, non-temporal ones included, is
        visible before any later memory operation (x86: mfence)."""
        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()
        return types.void(), codegen

    @njit(inline="always")
    def _address(a):
        return a.ctypes.data


@njit(inline="always")
def stream_row(out, i, c0, n, g):
    """out[i, c0:c0 + n] = g[:n] (out 2-d C-contiguous, g of out's dtype), by non-temporal stores
    from the first STREAM_BYTES boundary of the destination to the last (plain stores before and
    after; plain stores only where an element is not aligned to its size)."""
    C = out.shape[1]
    size = out.itemsize
    lanes = STREAM_BYTES // size
    flat = np.uint64(i) * np.uint64(C) + np.uint64(c0)
    addr = np.uint64(_address(out)) + flat * np.uint64(size)
    head = np.uint64(((STREAM_BYTES - addr % STREAM_BYTES) % STREAM_BYTES) // size)
    un = np.uint64(n)
    if addr % np.uint64(size) != 0 or head > un:
        head = un
    for c in range(head):
        out[i, np.uint64(c0) + c] = g[c]
    k = head
    while k + np.uint64(lanes) <= un:
        _store_nt(out, flat + k, g, k)
        k += np.uint64(lanes)
    for c in range(k, un):
        out[i, np.uint64(c0) + c] = g[c]
