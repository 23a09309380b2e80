"""Max, average and global average pooling in 1-D and 2-D (no padding).

Shapes: x (N, C, *S), kernel K, stride s (default K, as in PyTorch), O = (S - K) // s + 1.

    max:  y[n, c, u] = max_k x[n, c, s*u + k];  the gradient goes to the first maximal
          element of each window (PyTorch's tie rule), so dx = col2im(onehot(argmax) * dy)
    avg:  y[n, c, u] = mean_k x[n, c, s*u + k];  dx = col2im(dy / prod(K))
    global average: y[n, c] = mean_S x[n, c, :];  dx = dy / prod(S) broadcast over S
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .conv import col2im_add, windows
from .module import Layer, check_ints, register

__all__ = ["MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "GlobalAvgPool"]


class PoolCache(NamedTuple):
    x_shape: tuple
    argmax: object      # (N, C, *O) flat index in the window, or None for average pooling


class _PoolNd(Layer):
    dims = 0
    mode = ""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        owner = type(self).__name__
        self.kernel_size = check_ints(kernel_size, self.dims, "kernel_size", owner)
        self.stride = self.kernel_size if stride is None else check_ints(stride, self.dims, "stride", owner)

    def config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride)}

    def forward(self, x, train=True):
        d = self.dims
        if x.ndim != 2 + d or any(x.shape[2 + i] < k for i, k in enumerate(self.kernel_size)):
            raise ValueError(f"{type(self).__name__}: expected input (N, C, {'L' if d == 1 else 'H, W'}) "
                             f"at least as large as the kernel {self.kernel_size}, got {tuple(x.shape)}")
        xp = get_namespace(x)
        win = windows(x, self.kernel_size, self.stride)
        flat = win.reshape(win.shape[:2 + d] + (-1,))
        if self.mode == "max":
            argmax = xp.argmax(flat, axis=-1)
            y = xp.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]
            return y, PoolCache(tuple(x.shape), argmax)
        return flat.mean(axis=-1), PoolCache(tuple(x.shape), None)

    def backward(self, dy, cache):
        xp = get_namespace(dy)
        K = 1
        for k in self.kernel_size:
            K *= k
        if cache.argmax is None:
            dflat = xp.broadcast_to((dy / K)[..., None], dy.shape + (K,))
        else:
            dflat = xp.zeros(dy.shape + (K,), dtype=dy.dtype)
            xp.put_along_axis(dflat, cache.argmax[..., None], dy[..., None], axis=-1)
        dx = xp.zeros(cache.x_shape, dtype=dy.dtype)
        return col2im_add(dx, dflat.reshape(dy.shape + self.kernel_size), self.kernel_size, self.stride)


@register
class MaxPool1d(_PoolNd):
    dims, mode = 1, "max"


@register
class MaxPool2d(_PoolNd):
    dims, mode = 2, "max"


@register
class AvgPool1d(_PoolNd):
    dims, mode = 1, "avg"


@register
class AvgPool2d(_PoolNd):
    dims, mode = 2, "avg"


class GlobalCache(NamedTuple):
    x_shape: tuple


@register
class GlobalAvgPool(Layer):
    """Mean over every spatial axis: (N, C, *S) -> (N, C)."""

    def forward(self, x, train=True):
        if x.ndim < 3:
            raise ValueError(f"GlobalAvgPool: expected (N, C, *spatial), got {tuple(x.shape)}")
        return x.mean(axis=tuple(range(2, x.ndim))), GlobalCache(tuple(x.shape))

    def backward(self, dy, cache):
        xp = get_namespace(dy)
        n = 1
        for s in cache.x_shape[2:]:
            n *= s
        return xp.broadcast_to((dy / n).reshape(dy.shape + (1,) * (len(cache.x_shape) - 2)),
                               cache.x_shape).copy()
