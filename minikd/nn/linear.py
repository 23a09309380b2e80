"""Fully connected layer.

Shapes: x (N, D_in) (any leading axes), W (D_out, D_in) as in PyTorch, b (D_out,).

    y = x W^T + b
    dx = dy W,   dW = sum_n dy_n^T x_n,   db = sum_n dy_n
"""
from __future__ import annotations

from typing import NamedTuple

from .init import init_weight_bias
from .module import Layer, check_int, register

__all__ = ["Linear"]


class LinearCache(NamedTuple):
    x: object


@register
class Linear(Layer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init="default",
                 seed=None, dtype="float32"):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", "Linear")
        self.out_features = check_int(out_features, "out_features", "Linear")
        self.bias = bool(bias)
        w, b = init_weight_bias((self.out_features, self.in_features), init, seed, dtype)
        self.params = {"weight": w, "bias": b} if self.bias else {"weight": w}
        self._init_grads()

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias}

    def forward(self, x, train=True):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: expected {self.in_features} input features, got shape "
                             f"{tuple(x.shape)}")
        y = x @ self.params["weight"].T
        if self.bias:
            y = y + self.params["bias"]
        return y, LinearCache(x)

    def backward(self, dy, cache):
        x = cache.x
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        self.grads["weight"] += dy2.T @ x2
        if self.bias:
            self.grads["bias"] += dy2.sum(axis=0)
        return dy @ self.params["weight"]
