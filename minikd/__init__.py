"""minikd: exact, autodiff-free knowledge distillation in NumPy/CuPy.

    import minikd as mk
    loss, grad = mk.kd_loss_and_grad(student, teacher, labels, T=4.0, alpha=0.9)
    loss, grad = mk.kernels.softmax_kl(student, teacher, labels, T=4.0, alpha=0.9)   # fused

Every name below is imported on first use (``import minikd`` loads no NumPy: the ``minikd``
command starts in milliseconds and handles Ctrl-C from its first instant); ``mk.kernels`` (the
fused kernels, floor 3) likewise, so Numba loads only when a kernel runs.
"""
import importlib as _importlib
import sys as _sys
import types as _types
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
from pathlib import Path as _Path

__version__ = "0.1.0"

__all__ = ["get_namespace", "logsumexp", "logsumexp_forward", "logsumexp_backward",
           "log_softmax", "log_softmax_forward", "log_softmax_backward", "softmax",
           "softmax_forward", "softmax_backward", "kd_forward", "kd_backward", "kd_loss",
           "kd_loss_and_grad", "cross_entropy_and_grad", "hint_forward", "hint_backward", "hint_loss",
           "rkd_distance_forward", "rkd_distance_backward", "rkd_distance", "rkd_angle_forward",
           "rkd_angle_backward", "rkd_angle", "mutual_forward", "mutual_backward", "mutual_loss",
           "dkd_forward", "dkd_backward", "dkd_loss", "dkd_loss_and_grad", "topk_forward", "topk_backward",
           "topk_loss", "topk_loss_and_grad", "topk_from_dense", "TopK", "diagnose"]


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
    _sys.meta_path.insert(0, _CheckoutKernelsFinder())


# where each public name lives (``softmax`` and ``diagnose``, also submodules' names, are _Package's properties)
_LAZY = {"get_namespace": "backend",
         **dict.fromkeys(["logsumexp", "logsumexp_forward", "logsumexp_backward", "log_softmax", "log_softmax_forward",
                          "log_softmax_backward", "softmax_forward", "softmax_backward"], "softmax"),
         **dict.fromkeys(["kd_forward", "kd_backward", "kd_loss", "kd_loss_and_grad", "cross_entropy_and_grad",
                          "hint_forward", "hint_backward", "hint_loss", "rkd_distance_forward", "rkd_distance_backward",
                          "rkd_distance", "rkd_angle_forward", "rkd_angle_backward", "rkd_angle", "mutual_forward",
                          "mutual_backward", "mutual_loss", "dkd_forward", "dkd_backward", "dkd_loss",
                          "dkd_loss_and_grad", "topk_forward", "topk_backward", "topk_loss", "topk_loss_and_grad",
                          "topk_from_dense", "TopK"], "losses")}
_SUBMODULES = {"nn", "losses", "softmax", "backend", "files", "checks", "data", "distill", "experiments", "cli",
               "gradcheck", "gradcheck_ops", "testing", "torch_parity", "plots", "kernels"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _SUBMODULES:   # kernels: numba stays unloaded until a kernel runs
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__, *_SUBMODULES})


class _Package(_types.ModuleType):
    """``mk.softmax`` is the function, as ``__all__`` says, though ``minikd.softmax`` is also the
    submodule's name: the import system binds the submodule to this attribute when it first loads
    it, and the setter lets the function stay."""

    @property
    def softmax(self):
        return _importlib.import_module(__name__ + ".softmax").softmax

    @softmax.setter
    def softmax(self, value):
        pass

    @property
    def diagnose(self):   # the function; the package is minikd.diagnose (imported by its full name)
        return _importlib.import_module(__name__ + ".diagnose").diagnose

    @diagnose.setter
    def diagnose(self, value):
        pass


_sys.modules[__name__].__class__ = _Package
