"""Convolution (cross-correlation, as in PyTorch) in 1-D and 2-D by im2col.

Shapes: x (N, C_in, *S) with d = 1 or 2 spatial axes, W (C_out, C_in, *K), b (C_out,),
stride s and zero padding P on every spatial axis; output size O = (S + 2P - K) // s + 1.

    y[n, o, u] = b[o] + sum_{c, k} W[o, c, k] * xpad[n, c, s*u + k]

im2col gathers the windows xpad[n, :, s*u + k] into a matrix X_col of shape
(N * prod(O), C_in * prod(K)) (a strided view, then one copy), so that
    Y_col = X_col W_mat^T + b,         W_mat = W.reshape(C_out, -1)
and the backward pass is that of a linear layer:
    dW_mat = dY_col^T X_col,   db = sum dY_col,   dX_col = dY_col W_mat
followed by col2im, the adjoint of the gather: each window position adds its column back to
the input positions it read. col2im loops over the prod(K) kernel offsets (a strided slice add
each), never over pixels.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

from ..backend import get_namespace
from .init import init_weight_bias
from .module import Layer, check_int, check_ints, register

__all__ = ["Conv1d", "Conv2d", "windows", "col2im_add"]


def windows(xpad, kernel, stride):
    """Strided view (N, C, *O, *K) of the windows of xpad (N, C, *S) (no copy)."""
    xp = get_namespace(xpad)
    d = len(kernel)
    win = xp.lib.stride_tricks.sliding_window_view(xpad, kernel, axis=tuple(range(2, 2 + d)))
    return win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]


def col2im_add(dpad, dwin, kernel, stride):
    """Adjoint of ``windows``: add dwin (N, C, *O, *K) into dpad (N, C, *S) in place."""
    d = len(kernel)
    out = dwin.shape[2:2 + d]
    for offs in itertools.product(*(range(k) for k in kernel)):
        target = (slice(None), slice(None)) + tuple(
            slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offs, stride, out))
        dpad[target] += dwin[(Ellipsis,) + offs]
    return dpad


def pad_spatial(x, padding):
    xp = get_namespace(x)
    if not any(padding):
        return x
    return xp.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])


def unpad_spatial(x, padding):
    return x[(slice(None), slice(None)) + tuple(slice(p, x.shape[2 + i] - p) for i, p in enumerate(padding))]


class ConvCache(NamedTuple):
    cols: object        # (N * prod(O), C_in * prod(K))
    padded_shape: tuple
    out_shape: tuple    # O


class _ConvNd(Layer):
    dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, init="default", seed=None, dtype="float32"):
        super().__init__()
        d, owner = self.dims, type(self).__name__
        self.in_channels = check_int(in_channels, "in_channels", owner)
        self.out_channels = check_int(out_channels, "out_channels", owner)
        self.kernel_size = check_ints(kernel_size, d, "kernel_size", owner)
        self.stride = check_ints(stride, d, "stride", owner)
        self.padding, self.bias = check_ints(padding, d, "padding", owner, minimum=0), bool(bias)
        w, b = init_weight_bias((self.out_channels, self.in_channels) + self.kernel_size, init, seed, dtype)
        self.params = {"weight": w, "bias": b} if self.bias else {"weight": w}
        self._init_grads()

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.bias}

    def forward(self, x, train=True):
        d = self.dims
        if x.ndim != 2 + d or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected input (N, {self.in_channels}, "
                             f"{', '.join('L' * d if d == 1 else 'HW')}), got shape {tuple(x.shape)}")
        xp = get_namespace(x)
        xpad = pad_spatial(x, self.padding)
        if any(xpad.shape[2 + i] < k for i, k in enumerate(self.kernel_size)):
            raise ValueError(f"{type(self).__name__}: input {tuple(x.shape)} is smaller than the kernel")
        win = windows(xpad, self.kernel_size, self.stride)            # (N, C, *O, *K)
        out = win.shape[2:2 + d]
        perm = (0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d))
        cols = xp.ascontiguousarray(win.transpose(perm)).reshape(-1, self.in_channels * _prod(self.kernel_size))
        y = cols @ self.params["weight"].reshape(self.out_channels, -1).T
        if self.bias:
            y = y + self.params["bias"]
        y = xp.moveaxis(y.reshape((x.shape[0],) + out + (self.out_channels,)), -1, 1)
        return y, ConvCache(cols, tuple(xpad.shape), out)

    def backward(self, dy, cache):
        xp = get_namespace(dy)
        d = self.dims
        dyc = xp.moveaxis(dy, 1, -1).reshape(-1, self.out_channels)
        w = self.params["weight"]
        self.grads["weight"] += (dyc.T @ cache.cols).reshape(w.shape)
        if self.bias:
            self.grads["bias"] += dyc.sum(axis=0)
        dcols = (dyc @ w.reshape(self.out_channels, -1)).reshape(
            (dy.shape[0],) + cache.out_shape + (self.in_channels,) + self.kernel_size)
        # (N, *O, C, *K) -> (N, C, *O, *K), the layout of ``windows``
        perm = (0, 1 + d) + tuple(range(1, 1 + d)) + tuple(range(2 + d, 2 + 2 * d))
        dpad = xp.zeros(cache.padded_shape, dtype=dy.dtype)
        col2im_add(dpad, dcols.transpose(perm), self.kernel_size, self.stride)
        return unpad_spatial(dpad, self.padding)


def _prod(t):
    out = 1
    for v in t:
        out *= v
    return out


@register
class Conv1d(_ConvNd):
    """1-D convolution: x (N, C_in, L) -> (N, C_out, L_out)."""
    dims = 1


@register
class Conv2d(_ConvNd):
    """2-D convolution: x (N, C_in, H, W) -> (N, C_out, H_out, W_out)."""
    dims = 2
