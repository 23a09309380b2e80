"""Calling a user's KD loss: loading it, telling its framework, passing minikd's float64 probes in
the argument order and form it expects, and reading back its value and its autograd gradient.

A loss is called as ``fn(student_logits, teacher_logits, labels)`` by default. ``order`` names the
roles in positional order (("teacher", "student", "labels"), or ("student", "teacher") for a loss
without labels); ``names`` maps roles to keyword names instead (only the named roles are passed);
``fixed`` adds keyword arguments the user fixes (``T=4``); ``teacher_as`` passes the teacher as
"logits", "probs" (softmax at T = 1) or "log_probs"; a ``torch.nn.Module`` class is instantiated with ``module_init``. PyTorch and JAX are
imported only when the loss needs them.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..checks import MissingDependency, UserError
from ..softmax import _log_softmax

FRAMEWORKS = ("torch", "jax", "numpy")
ROLES = ("student", "teacher", "labels")
TEACHER_FORMS = ("logits", "probs", "log_probs")
DTYPES = ("float64", "float32", "bfloat16", "float16")


class CallFailed(Exception):
    """The user's loss raised, or returned something that is not a loss; the message says which."""


class Output(NamedTuple):
    value: np.ndarray            # the loss as float64 (a scalar, or per-row)
    grad: np.ndarray | None      # d sum(value) / d student logits, float64; None: no gradient reached them
    teacher_grad: np.ndarray | None


def load(spec: str):
    """``FILE.py:NAME`` or ``package.module:NAME`` -> the object."""
    if ":" not in spec:
        raise UserError(f"expected FILE.py:NAME or package.module:NAME, got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise UserError(f"{where}: no such file")
        mod_name = f"_minikd_diagnose_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec_.loader.exec_module(module)
        except ImportError as e:
            raise MissingDependency(f"{where}: {e} (pip install the framework the loss uses)") from None
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"{where}: cannot import it ({e})") from None
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise UserError(f"{where} has no {name!r}") from None
    if not callable(obj):
        raise UserError(f"{spec}: {name} is not callable")
    return obj


def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    m = torch.nn.Module
    return isinstance(obj, m) or (inspect.isclass(obj) and issubclass(obj, m))


def detect_framework(fn) -> str:
    """From what the loss is: a torch.nn.Module, or the modules its code refers to (its globals,
    and the module it is defined in); NumPy when it names neither torch nor jax."""
    if _is_torch_module(fn):
        return "torch"
    target = inspect.unwrap(getattr(fn, "forward", None) or getattr(fn, "__call__", fn)) \
        if inspect.isclass(fn) else inspect.unwrap(fn)
    target = getattr(target, "__func__", target)
    names = set()
    glob = getattr(target, "__globals__", {}) or {}
    code = getattr(target, "__code__", None)
    used = _globals_loaded(code) if code is not None else set(glob)
    seen = [val for key, val in glob.items() if key in used]
    cells = getattr(target, "__closure__", None) or ()
    seen += [c.cell_contents for c in cells if _has_contents(c)]      # modules a closure captured
    for val in seen:
        mod = getattr(val, "__name__", "") if inspect.ismodule(val) else getattr(val, "__module__", "") or ""
        names.add(str(mod).split(".")[0])
    if "torch" in names:
        return "torch"
    if "jax" in names or "jaxlib" in names or "optax" in names or "flax" in names:
        return "jax"
    return "numpy"


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _globals_loaded(code) -> set:
    """The global names a code object (and the functions defined in it) loads: ``jax.nn`` loads
    ``jax``, not a global ``nn``."""
    import dis  # noqa: PLC0415
    out = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if inspect.iscode(const):
            out |= _globals_loaded(const)
    return out


def _import(framework):
    try:
        if framework == "torch":
            import torch  # noqa: PLC0415
            return torch
        import jax  # noqa: PLC0415
        jax.config.update("jax_enable_x64", True)
        return jax
    except ImportError:
        extra = "torch" if framework == "torch" else "jax"
        raise MissingDependency(f"the loss is a {framework} function but {framework} is not installed "
                                f"(pip install '.[{extra}]')") from None


class Caller:
    """Calls the user's loss with float64 (or lower-precision) probes; see the module doc."""

    def __init__(self, fn, *, framework=None, order=("student", "teacher", "labels"), names=None,
                 teacher_as="logits", fixed=None, module_init=None):
        if framework is not None and framework not in FRAMEWORKS:
            raise UserError(f"framework: expected one of {FRAMEWORKS}, got {framework!r}")
        order = tuple(order)
        if not set(order) <= set(ROLES) or len(set(order)) != len(order) or \
                not {"student", "teacher"} <= set(order):
            raise UserError(f"order: the roles student, teacher and optionally labels, each once, got {list(order)}")
        if teacher_as not in TEACHER_FORMS:
            raise UserError(f"teacher_as: expected one of {TEACHER_FORMS}, got {teacher_as!r}")
        if names:
            bad = set(names) - set(ROLES)
            if bad:
                raise UserError(f"names: unknown roles {sorted(bad)}; expected some of {ROLES}")
        self.framework = framework or detect_framework(fn)
        self.lib = None if self.framework == "numpy" else _import(self.framework)
        if module_init is not None or inspect.isclass(fn):
            try:
                fn = fn(**(module_init or {}))
            except Exception as e:  # noqa: BLE001  (the user's constructor: report, do not crash)
                raise UserError(f"could not construct {getattr(fn, '__name__', fn)!r}({module_init or ''}): "
                                f"{type(e).__name__}: {e}") from None
        self.fn = fn
        self.names = dict(names or {})
        if self.names and not {"student", "teacher"} <= set(self.names):
            raise UserError(f"names: name the student and the teacher (and the labels, if the loss takes "
                            f"them), got {sorted(self.names)}")
        self.order = () if self.names else order    # with names, exactly the named roles, by keyword
        self.teacher_as = teacher_as
        self.fixed = dict(fixed or {})
        self.has_labels = "labels" in (self.names or self.order)
        self._jax_grad, self._jitted, self._jax_jit = {}, {}, True

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return name

    def _teacher(self, t):
        if self.teacher_as == "probs":
            return np.exp(_log_softmax(t))
        if self.teacher_as == "log_probs":
            return _log_softmax(t)
        return t

    def _args(self, s, t, y):
        vals = {"student": s, "teacher": t, "labels": y}
        args = [vals[r] for r in self.order if r not in self.names]
        kwargs = {self.names[r]: vals[r] for r in self.names}
        kwargs.update(self.fixed)
        return args, kwargs

    def __call__(self, s, t, y=None, dtype="float64") -> Output:
        """The loss and its gradients at (s, t, y): float64 numpy in and out, run in ``dtype``."""
        t = self._teacher(t)
        try:
            with warnings.catch_warnings():   # the user's code's own warnings (deprecations, NaN) are not ours
                warnings.simplefilter("ignore")
                return self._dispatch(s, t, y, dtype)
        except CallFailed:
            raise
        except (MissingDependency, UserError):
            raise
        except Exception as e:  # noqa: BLE001  (the user's code: any failure is a finding)
            raise CallFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def _dispatch(self, s, t, y, dtype):
        if self.framework == "torch":
            return self._torch(s, t, y, dtype)
        if self.framework == "jax":
            return self._jax(s, t, y, dtype)
        return self._numpy(s, t, y, dtype)

    def _torch(self, s, t, y, dtype):
        torch = self.lib
        dt = getattr(torch, dtype)
        S = torch.tensor(s).to(dt).requires_grad_(True)
        Tt = torch.tensor(t).to(dt).requires_grad_(True)
        Y = None if y is None else torch.tensor(y, dtype=torch.long)
        args, kwargs = self._args(S, Tt, Y)
        out = self.fn(*args, **kwargs)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise CallFailed(f"returned {type(out).__name__}, expected a torch tensor")
        value = out.detach().to(torch.float64).cpu().numpy()
        g = gt = None
        if out.requires_grad:
            gs = torch.autograd.grad(out.sum(), [S, Tt], allow_unused=True)
            g, gt = (None if x is None else x.to(torch.float64).cpu().numpy() for x in gs)
        return Output(value, g, gt)

    def _jax(self, s, t, y, dtype):
        """jax.value_and_grad, jitted (one compilation per shape instead of one per operation per
        shape: 5x faster); a loss that cannot be traced (Python branching on values, boolean masks
        of data-dependent size) runs eagerly."""
        jax = self.lib
        jnp = jax.numpy
        dt = getattr(jnp, dtype)
        args = (jnp.asarray(s).astype(dt), jnp.asarray(t).astype(dt), None if y is None else jnp.asarray(y))
        grad_fn = self._jax_grad.get(dtype)
        if grad_fn is None:
            def f(S, Tt, Y):
                a, kw = self._args(S, Tt, Y)
                out = self.fn(*a, **kw)
                if isinstance(out, (tuple, list)) and out:
                    out = out[0]
                return jnp.sum(out).astype(jnp.float64), out
            grad_fn = self._jax_grad[dtype] = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        result = None
        if self._jax_jit:
            try:
                if dtype not in self._jitted:
                    self._jitted[dtype] = jax.jit(grad_fn)
                result = self._jitted[dtype](*args)
            except Exception:  # noqa: BLE001  (not traceable: run it eagerly from now on)
                self._jax_jit = False
        if result is None:
            result = grad_fn(*args)
        (_, out), (g, gt) = result
        return Output(np.asarray(out, dtype=np.float64), np.asarray(g, dtype=np.float64),
                      np.asarray(gt, dtype=np.float64))

    def _numpy(self, s, t, y, dtype):
        if dtype == "bfloat16":
            import ml_dtypes  # noqa: PLC0415
            dt = ml_dtypes.bfloat16
        else:
            dt = np.dtype(dtype)
        args, kwargs = self._args(s.astype(dt), t.astype(dt), y)
        out = self.fn(*args, **kwargs)
        g = None
        if isinstance(out, (tuple, list)) and len(out) == 2 and np.shape(out[1]) == s.shape:
            out, g = out
            g = np.asarray(g, dtype=np.float64)
        try:
            value = np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError):
            raise CallFailed(f"returned {type(out).__name__}, expected a number or an array") from None
        return Output(value, g, None)
