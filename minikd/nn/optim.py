"""Optimizers and learning-rate schedules, with PyTorch's update rules.

SGD (torch.optim.SGD), gradient g, parameter w, step t:
    g <- g + wd * w;  b <- g (t = 1) or mu * b + g;  g <- g + mu * b (Nesterov) or b;  w <- w - lr * g
Adam (Kingma & Ba 2015), L2 weight decay added to g like torch.optim.Adam:
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
AdamW (Loshchilov & Hutter 2019): decoupled decay w <- w (1 - lr * wd) before the Adam step.

Optimizers update each parameter array in place and keep their state per parameter key.
Schedules are functions epoch -> learning rate; set ``opt.lr = schedule(epoch)``.
"""
from __future__ import annotations

import math

from .. import checks
from ..backend import get_namespace

__all__ = ["SGD", "Adam", "AdamW", "step_schedule", "cosine_schedule"]


class SGD:
    def __init__(self, model, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        lr = checks.number("SGD: lr", lr, 0.0, exclusive_minimum=True)
        momentum = checks.number("SGD: momentum", momentum, 0.0)
        weight_decay = checks.number("SGD: weight_decay", weight_decay, 0.0)
        if nesterov and momentum <= 0:
            raise checks.UserError("SGD: Nesterov momentum needs momentum > 0")
        self.model, self.lr, self.momentum = model, lr, momentum
        self.nesterov, self.weight_decay = bool(nesterov), weight_decay
        self.state: dict = {}

    def step(self):
        for key, w, g in self.model.parameters():
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                b = self.state.get(key)
                b = g.copy() if b is None else self.momentum * b + g
                self.state[key] = b
                g = g + self.momentum * b if self.nesterov else b
            w -= self.lr * g


class Adam:
    decoupled = False

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        owner = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise checks.UserError(f"{owner}: betas: expected two numbers in [0, 1), got {betas!r}")
        betas = tuple(checks.number(f"{owner}: betas", b, 0.0, 1.0) for b in betas)
        if max(betas) >= 1:
            raise checks.UserError(f"{owner}: betas: expected two numbers in [0, 1), got {betas}")
        self.model, self.betas = model, betas
        self.lr = checks.number(f"{owner}: lr", lr, 0.0, exclusive_minimum=True)
        self.eps = checks.number(f"{owner}: eps", eps, 0.0, exclusive_minimum=True)
        self.weight_decay = checks.number(f"{owner}: weight_decay", weight_decay, 0.0)
        self.t = 0
        self.state: dict = {}

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for key, w, g in self.model.parameters():
            xp = get_namespace(w)
            if self.weight_decay and self.decoupled:
                w *= 1 - self.lr * self.weight_decay
            elif self.weight_decay:
                g = g + self.weight_decay * w
            m, v = self.state.get(key, (xp.zeros_like(w), xp.zeros_like(w)))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.state[key] = (m, v)
            w -= self.lr * (m / c1) / (xp.sqrt(v / c2) + self.eps)


class AdamW(Adam):
    decoupled = True

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(model, lr, betas, eps, weight_decay)


def step_schedule(base_lr: float, step_size: int, gamma: float = 0.1):
    """lr = base_lr * gamma ** (epoch // step_size)   (torch StepLR)."""
    return lambda epoch: base_lr * gamma ** (epoch // step_size)


def cosine_schedule(base_lr: float, total: int, min_lr: float = 0.0):
    """lr = min_lr + (base_lr - min_lr) (1 + cos(pi epoch / total)) / 2   (torch CosineAnnealingLR)."""
    return lambda epoch: min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * min(epoch, total) / total)) / 2
