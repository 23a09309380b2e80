"""Array namespace and input validation (floor 1).

Every function in minikd takes its array namespace from its inputs: NumPy arrays are computed
with NumPy, CuPy arrays with CuPy. CuPy is never imported unless a CuPy array is passed in, so
the package works on machines without it.

Validation lives here once, so that every op reports bad input the same way: the argument's
name, what was wrong, and the first offending row.
"""
from __future__ import annotations

import numpy as np

__all__ = ["get_namespace", "to_numpy", "is_cupy_array", "check_float_array",
           "check_logits", "first_bad_row", "row_index"]


def is_cupy_array(x) -> bool:
    """True when ``x`` is a CuPy ndarray (checked by type module, without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_namespace(*arrays):
    """The array module (``numpy`` or ``cupy``) of the given arrays.

    Mixing NumPy and CuPy arrays is an error: a silent host/device copy is exactly the kind of
    cost a reference implementation must not hide.
    """
    kinds = {is_cupy_array(a) for a in arrays if a is not None and hasattr(a, "shape")}
    if kinds == {True}:
        import cupy  # noqa: PLC0415  (only when CuPy arrays are really passed in)
        return cupy
    if kinds == {True, False}:
        raise TypeError("inputs mix NumPy and CuPy arrays; move them to one device first")
    return np


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def row_index(flat_row: int, lead_shape: tuple) -> str:
    """Human-readable index of a flattened row: ``3`` for (N, C) inputs, ``(1, 2)`` for (B, S, C)."""
    if len(lead_shape) <= 1:
        return str(int(flat_row))
    return str(tuple(int(i) for i in np.unravel_index(int(flat_row), lead_shape)))


def first_bad_row(bad_rows) -> int:
    """Index of the first True entry of a 1-D boolean array (NumPy or CuPy)."""
    return int(to_numpy(bad_rows).nonzero()[0][0])


def check_float_array(x, name: str, ndim_min: int = 1):
    """Refuse non-arrays, non-floating dtypes and arrays with too few axes."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":  # bfloat16 (ml_dtypes) has kind "V"
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} axis(es) with classes last, "
                         f"got shape {tuple(x.shape)}")
    return x


def check_logits(x, name: str = "logits", valid_rows=None):
    """Validate logits: classes on the last axis, finite or ``-inf``, at least one finite class per row.

    ``-inf`` marks a class of probability 0 (vocabulary padding, masked classes) and is legal.
    NaN, ``+inf`` and a row that is entirely ``-inf`` (no probability distribution exists)
    raise ``ValueError`` naming ``name`` and the first bad row. Rows where ``valid_rows`` (a
    boolean array over the flattened leading axes) is False are not inspected: they count nowhere.
    """
    check_float_array(x, name)
    xp = get_namespace(x)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: the class axis is empty (shape {tuple(x.shape)})")
    rows = x.reshape(-1, x.shape[-1])
    lead = tuple(x.shape[:-1])
    checks = (
        (xp.isnan(rows).any(axis=-1), "contains NaN"),
        (xp.isposinf(rows).any(axis=-1), "contains +inf"),
        (xp.isneginf(rows).all(axis=-1), "is entirely -inf (no class has probability > 0)"),
    )
    for bad, what in checks:
        if valid_rows is not None:
            bad = bad & valid_rows
        if bool(bad.any()):
            raise ValueError(f"{name}: row {row_index(first_bad_row(bad), lead)} {what}")
    return x
