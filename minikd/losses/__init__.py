"""Distillation losses (floor 2): each a forward/backward pair with a hand-derived gradient."""
from .kd import cross_entropy_and_grad, kd_backward, kd_forward, kd_loss, kd_loss_and_grad

__all__ = ["kd_forward", "kd_backward", "kd_loss", "kd_loss_and_grad", "cross_entropy_and_grad"]
