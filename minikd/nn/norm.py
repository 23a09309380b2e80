"""Batch normalization (Ioffe & Szegedy 2015), PyTorch's defaults (eps 1e-5, momentum 0.1).

Shapes: x (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for BatchNorm2d; statistics per
channel C over the m = N * prod(spatial) values of that channel; gamma = weight, beta = bias.

Train:  mu = mean x,  var = mean (x - mu)^2 (biased),  xhat = (x - mu) / sqrt(var + eps)
        y = gamma * xhat + beta
        running_mean <- (1 - momentum) running_mean + momentum * mu
        running_var  <- (1 - momentum) running_var  + momentum * var * m / (m - 1)  (unbiased)
Eval:   xhat = (x - running_mean) / sqrt(running_var + eps)   (constants: dx = dy gamma / sd)

Backward in train mode. mu and var depend on x, so with g = dy * gamma (d loss / d xhat):
    dbeta = sum dy,  dgamma = sum dy * xhat
    dx = (1 / (m sd)) * (m g - sum g - xhat * sum(g * xhat))
(sums over the m values of each channel; derived by differentiating xhat through mu and var,
using sum xhat = 0 and sum xhat^2 = m).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_namespace
from .module import Layer, check_float, check_int, register

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class BatchNormCache(NamedTuple):
    xhat: object
    inv_sd: object      # broadcastable (1, C, 1...)
    train: bool


class _BatchNorm(Layer):
    ndims = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype="float32"):
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_int(num_features, "num_features", owner)
        self.eps = check_float(eps, "eps", owner, 0.0, low_open=True)
        self.momentum = check_float(momentum, "momentum", owner, 0.0, 1.0)
        C = self.num_features
        self.params = {"weight": np.ones(C, dtype), "bias": np.zeros(C, dtype)}
        self.buffers = {"running_mean": np.zeros(C, dtype), "running_var": np.ones(C, dtype),
                        "num_batches_tracked": np.zeros((), np.int64)}
        self._init_grads()

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def _shape(self, x):
        return (1, -1) + (1,) * (x.ndim - 2)

    def forward(self, x, train=True):
        if x.ndim not in self.ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels on axis 1 "
                             f"and {' or '.join(map(str, self.ndims))} axes, got shape {tuple(x.shape)}")
        xp = get_namespace(x)
        axes = (0,) + tuple(range(2, x.ndim))
        shape = self._shape(x)
        if train:
            m = x.size // x.shape[1]
            if m < 2:
                raise ValueError(f"{type(self).__name__}: training needs more than 1 value per channel, "
                                 f"got input shape {tuple(x.shape)}")
            mu = x.mean(axis=axes)
            var = ((x - mu.reshape(shape)) ** 2).mean(axis=axes)
            b = self.buffers
            mom = self.momentum
            b["running_mean"] = ((1 - mom) * b["running_mean"] + mom * mu).astype(b["running_mean"].dtype)
            b["running_var"] = ((1 - mom) * b["running_var"] + mom * var * (m / (m - 1))).astype(
                b["running_var"].dtype)
            b["num_batches_tracked"] = b["num_batches_tracked"] + 1
        else:
            mu, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_sd = (1.0 / xp.sqrt(var + self.eps)).reshape(shape).astype(x.dtype)
        xhat = (x - mu.reshape(shape).astype(x.dtype)) * inv_sd
        y = self.params["weight"].reshape(shape) * xhat + self.params["bias"].reshape(shape)
        return y, BatchNormCache(xhat, inv_sd, train)

    def backward(self, dy, cache):
        axes = (0,) + tuple(range(2, dy.ndim))
        shape = self._shape(dy)
        xhat = cache.xhat
        self.grads["bias"] += dy.sum(axis=axes)
        self.grads["weight"] += (dy * xhat).sum(axis=axes)
        g = dy * self.params["weight"].reshape(shape)
        if not cache.train:
            return g * cache.inv_sd
        m = dy.size // dy.shape[1]
        sum_g = g.sum(axis=axes).reshape(shape)
        sum_gx = (g * xhat).sum(axis=axes).reshape(shape)
        return (cache.inv_sd / m) * (m * g - sum_g - xhat * sum_gx)


@register
class BatchNorm1d(_BatchNorm):
    ndims = (2, 3)


@register
class BatchNorm2d(_BatchNorm):
    ndims = (4,)
