"""minikd: exact, autodiff-free knowledge distillation in NumPy/CuPy.

    import minikd as mk
    loss, grad = mk.kd_loss_and_grad(student, teacher, labels, T=4.0, alpha=0.9)
"""
from . import nn
from .backend import get_namespace
from .losses import (cross_entropy_and_grad, hint_backward, hint_forward, hint_loss, kd_backward, kd_forward,
                     kd_loss, kd_loss_and_grad, mutual_backward, mutual_forward, mutual_loss, rkd_angle,
                     rkd_angle_backward, rkd_angle_forward, rkd_distance, rkd_distance_backward,
                     rkd_distance_forward)
from .softmax import (log_softmax, log_softmax_backward, log_softmax_forward, logsumexp,
                      logsumexp_backward, logsumexp_forward, softmax, softmax_backward,
                      softmax_forward)

__version__ = "0.1.0"

__all__ = ["get_namespace", "logsumexp", "logsumexp_forward", "logsumexp_backward",
           "log_softmax", "log_softmax_forward", "log_softmax_backward", "softmax",
           "softmax_forward", "softmax_backward", "kd_forward", "kd_backward", "kd_loss",
           "kd_loss_and_grad", "cross_entropy_and_grad", "hint_forward", "hint_backward", "hint_loss",
           "rkd_distance_forward", "rkd_distance_backward", "rkd_distance", "rkd_angle_forward",
           "rkd_angle_backward", "rkd_angle", "mutual_forward", "mutual_backward", "mutual_loss"]
