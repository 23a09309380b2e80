"""Seeded weight initialization.

    "default"  PyTorch's default for Linear/Conv: U(-b, b), b = 1/sqrt(fan_in), bias likewise
               (kaiming_uniform with a = sqrt(5)), so a fresh layer matches torch's statistics
    "kaiming"  He et al. 2015 normal, std = sqrt(2 / fan_in) (ReLU networks); bias 0
    "xavier"   Glorot & Bengio 2010 uniform, b = sqrt(6 / (fan_in + fan_out)); bias 0

fan_in = in_features * prod(kernel), fan_out = out_features * prod(kernel).
"""
from __future__ import annotations

import numpy as np

__all__ = ["INITS", "make_rng", "init_weight_bias"]

INITS = ("default", "kaiming", "xavier")


def make_rng(seed=None) -> np.random.Generator:
    """A Generator from a seed, or the Generator itself (shared state, reproducible order)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def init_weight_bias(shape, init="default", seed=None, dtype="float32"):
    """Weight of ``shape`` (out, in, *kernel) and bias (out,), drawn from ``seed``."""
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    rng = make_rng(seed)
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    if init == "default":
        b = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-b, b, shape)
        bias = rng.uniform(-b, b, shape[0])
    elif init == "kaiming":
        w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        bias = np.zeros(shape[0])
    else:
        b = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-b, b, shape)
        bias = np.zeros(shape[0])
    return w.astype(dtype), bias.astype(dtype)
