"""minikd: exact, autodiff-free knowledge distillation in NumPy/CuPy.

    import minikd as mk
    loss, grad = mk.kd_loss_and_grad(student, teacher, labels, T=4.0, alpha=0.9)
    loss, grad = mk.kernels.softmax_kl(student, teacher, labels, T=4.0, alpha=0.9)   # fused

``mk.kernels`` (the fused kernels, floor 3) is imported on first use, so ``import minikd`` loads
neither it nor Numba.
"""
import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
from pathlib import Path as _Path

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


# The fast paths live in the checkout's top-level kernels/ folder (DESIGN.md, floor 3). A wheel or
# an editable install maps that folder to minikd.kernels; a checkout used without installing
# (PYTHONPATH=., as benchmarks/gpu_check.sh runs on a lent GPU machine) has no such mapping, and
# this finder supplies it, for that one module name only. It also wins over a stale minikd/kernels/
# folder (a __pycache__ left by an older checkout, where the kernels used to live), which Python
# would otherwise import as an empty namespace package.
_CHECKOUT_KERNELS = _Path(__file__).resolve().parent.parent / "kernels"


class _CheckoutKernelsFinder(_importlib_abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return _importlib_util.spec_from_file_location(fullname, _CHECKOUT_KERNELS / "__init__.py",
                                                       submodule_search_locations=[str(_CHECKOUT_KERNELS)])


_spec = _importlib_util.find_spec(__name__ + ".kernels")
if (_spec is None or not _spec.has_location) and (_CHECKOUT_KERNELS / "__init__.py").exists():
    import sys as _sys
    _sys.meta_path.insert(0, _CheckoutKernelsFinder())


def __getattr__(name):
    if name == "kernels":   # imported on first use: numba stays unloaded until a kernel runs
        return _importlib.import_module(__name__ + ".kernels")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
