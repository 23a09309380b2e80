"""Element-wise activations, dropout and reshaping layers.

    ReLU       y = max(x, 0)                    dx = dy * [x > 0]
    LeakyReLU  y = x if x > 0 else a x          dx = dy * (1 if x > 0 else a)
    Tanh       y = tanh x                       dx = dy * (1 - y^2)
    GELU       y = x Phi(x), Phi the standard normal CDF = (1 + erf(x / sqrt 2)) / 2
               dx = dy * (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
               approximate="tanh": y = x (1 + tanh u) / 2, u = sqrt(2/pi) (x + 0.044715 x^3)
               dx = dy * ((1 + tanh u) / 2 + x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2)
    Dropout    train: y = x * keep / (1 - p), keep ~ Bernoulli(1 - p) from the layer's seeded
               generator; dx = dy * keep / (1 - p).  eval: identity.
The derivative of ReLU at exactly 0 is taken as 0, as in PyTorch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import get_namespace, is_cupy_array
from .init import make_rng
from .module import Layer, check_float, check_int, register

__all__ = ["ReLU", "LeakyReLU", "Tanh", "GELU", "Dropout", "Flatten", "Reshape"]


class XCache(NamedTuple):
    x: object


@register
class ReLU(Layer):
    def forward(self, x, train=True):
        return get_namespace(x).maximum(x, 0), XCache(x)

    def backward(self, dy, cache):
        return dy * (cache.x > 0)


@register
class LeakyReLU(Layer):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = check_float(negative_slope, "negative_slope", "LeakyReLU")

    def config(self):
        return {"negative_slope": self.negative_slope}

    def forward(self, x, train=True):
        return get_namespace(x).where(x > 0, x, self.negative_slope * x), XCache(x)

    def backward(self, dy, cache):
        return get_namespace(dy).where(cache.x > 0, dy, self.negative_slope * dy)


@register
class Tanh(Layer):
    def forward(self, x, train=True):
        y = get_namespace(x).tanh(x)
        return y, XCache(y)

    def backward(self, dy, cache):
        return dy * (1 - cache.x * cache.x)


def _erf(x):
    if is_cupy_array(x):
        from cupyx.scipy.special import erf  # noqa: PLC0415
    else:
        from scipy.special import erf  # noqa: PLC0415
    return erf(x)


@register
class GELU(Layer):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def config(self):
        return {"approximate": self.approximate}

    def forward(self, x, train=True):
        xp = get_namespace(x)
        if self.approximate == "tanh":
            u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return 0.5 * x * (1 + xp.tanh(u)), XCache(x)
        return 0.5 * x * (1 + _erf(x / math.sqrt(2))), XCache(x)

    def backward(self, dy, cache):
        xp = get_namespace(dy)
        x = cache.x
        if self.approximate == "tanh":
            t = xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
            return dy * d
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)))
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return dy * (cdf + x * pdf)


class DropoutCache(NamedTuple):
    scale: object       # keep / (1 - p), or None in eval mode


@register
class Dropout(Layer):
    def __init__(self, p: float = 0.5, seed=None):
        super().__init__()
        self.p = check_float(p, "p", "Dropout", 0.0, 1.0)   # p = 1 drops everything, as in PyTorch
        self.rng = make_rng(seed)

    def config(self):
        return {"p": self.p}

    def forward(self, x, train=True):
        if not train or self.p == 0.0:
            return x, DropoutCache(None)
        xp = get_namespace(x)
        keep = xp.asarray(self.rng.random(x.shape) >= self.p)
        scale = keep.astype(x.dtype) / (1.0 - self.p) if self.p < 1.0 else xp.zeros_like(x)
        return x * scale, DropoutCache(scale)

    def backward(self, dy, cache):
        return dy if cache.scale is None else dy * cache.scale


class ShapeCache(NamedTuple):
    shape: tuple


@register
class Flatten(Layer):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x, train=True):
        return x.reshape(x.shape[0], -1), ShapeCache(tuple(x.shape))

    def backward(self, dy, cache):
        return dy.reshape(cache.shape)


@register
class Reshape(Layer):
    """(N, ...) -> (N, *shape), e.g. Reshape([1, 40]) turns 40 features into one channel."""

    def __init__(self, shape):
        super().__init__()
        if not isinstance(shape, (tuple, list)) or not shape:
            raise ValueError(f"Reshape: shape: expected a non-empty list of positive integers, got {shape!r}")
        self.shape = [check_int(s, "shape", "Reshape") for s in shape]

    def config(self):
        return {"shape": list(self.shape)}

    def forward(self, x, train=True):
        if int(np.prod(x.shape[1:])) != int(np.prod(self.shape)):
            raise ValueError(f"Reshape: cannot view input {tuple(x.shape)} as (N, {self.shape})")
        return x.reshape((x.shape[0],) + tuple(self.shape)), ShapeCache(tuple(x.shape))

    def backward(self, dy, cache):
        return dy.reshape(cache.shape)
