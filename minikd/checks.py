"""Checks of scalar settings (floor 1): each returns the value (converted) or raises a
``ValueError`` that starts with the setting's name and says what was expected. Configs
(``minikd.distill.TrainConfig``, ``minikd.experiments``' configs) and the command line's option
types call these, so a setting is checked one way wherever it comes from, before any work.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["integer", "number", "MAX_SEED", "MissingDependency"]

# NumPy's legacy seeding (used by the mnist1d generator, with an offset for the transfer set)
# takes seeds below 2**32; this bound leaves room for the offsets minikd adds.
MAX_SEED = 2**31 - 1


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, not 2.5) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name}: expected an integer {' and '.join(x for x in (lo, hi) if x)}, got {value}")
    return value


def number(name: str, value, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False) -> float:
    """A finite real number in [minimum, maximum] ((minimum, maximum] when ``exclusive_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
        raise ValueError(f"{name}: expected a finite number{' ' + ' and '.join(parts) if parts else ''}, got {value}")
    return value
