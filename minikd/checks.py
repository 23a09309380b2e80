"""Checks of scalar settings (floor 1): each returns the value (converted) or raises a
``UserError`` that starts with the setting's name and says what was expected. Configs
(``minikd.distill.TrainConfig``, ``minikd.experiments``' configs) and the command line's option
types call these, so a setting is checked one way wherever it comes from, before any work.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["UserError", "integer", "number", "MAX_SEED", "MissingDependency"]

# NumPy's legacy seeding (used by the mnist1d generator, with an offset for the transfer set)
# takes seeds below 2**32; this bound leaves room for the offsets minikd adds.
MAX_SEED = 2**31 - 1


class UserError(ValueError):
    """A user's mistake (a setting, a file, a run that diverged), told in one line: the CLI prints
    these without a traceback. A plain ValueError elsewhere is a bug in minikd and keeps its
    traceback. Subclasses: ``minikd.files.FileError``, ``minikd.experiments.ConfigError``,
    ``minikd.distill.TrainingDiverged``."""


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, refused unless it is an integer (Python or NumPy; not a bool,
    not 2.0 or 2.5) in [minimum, maximum]: a size of 0, -1 or 2.5 would otherwise build something
    that fails, or silently does something else, later."""
    if minimum == 1 and maximum is None:
        what = "a positive integer"
    else:
        what = "an integer " + " and ".join(x for x in ("" if minimum is None else f">= {minimum}",
                                                        "" if maximum is None else f"<= {maximum}") if x)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UserError(f"{name}: expected {what.strip()}, got {value!r}")
    return int(value)


def number(name: str, value, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False) -> float:
    """``value`` as a float: a finite real number (not a bool) in [minimum, maximum]
    ((minimum, maximum] when ``exclusive_minimum``; None: unbounded)."""
    if minimum is not None and maximum is not None and not exclusive_minimum:
        what = f"a finite number in [{minimum:g}, {maximum:g}]"
    else:
        bounds = ([f"{'>' if exclusive_minimum else '>='} {minimum:g}"] if minimum is not None else []) + \
            ([f"<= {maximum:g}"] if maximum is not None else [])
        what = " ".join(["a finite number", " and ".join(bounds)]).strip()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and (value < minimum or (exclusive_minimum and value == minimum))) or \
            (maximum is not None and value > maximum):
        raise UserError(f"{name}: expected {what}, got {value!r}")
    return float(value)
