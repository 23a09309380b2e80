"""Distillation losses (floor 2): each a forward/backward pair with a hand-derived gradient."""
from .dkd import dkd_backward, dkd_forward, dkd_loss, dkd_loss_and_grad
from .feature import hint_backward, hint_forward, hint_loss
from .kd import cross_entropy_and_grad, kd_backward, kd_forward, kd_loss, kd_loss_and_grad
from .mutual import mutual_backward, mutual_forward, mutual_loss
from .relational import (rkd_angle, rkd_angle_backward, rkd_angle_forward, rkd_distance,
                         rkd_distance_backward, rkd_distance_forward)
from .topk import TopK, topk_backward, topk_forward, topk_from_dense, topk_loss, topk_loss_and_grad

__all__ = ["kd_forward", "kd_backward", "kd_loss", "kd_loss_and_grad", "cross_entropy_and_grad",
           "dkd_forward", "dkd_backward", "dkd_loss", "dkd_loss_and_grad",
           "hint_forward", "hint_backward", "hint_loss", "rkd_distance_forward", "rkd_distance_backward",
           "rkd_distance", "rkd_angle_forward", "rkd_angle_backward", "rkd_angle", "mutual_forward",
           "mutual_backward", "mutual_loss", "topk_forward", "topk_backward", "topk_loss", "topk_loss_and_grad",
           "topk_from_dense", "TopK"]
