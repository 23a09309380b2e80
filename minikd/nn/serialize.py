"""Save and load models: weights as ``.npz``, the architecture as ``.json``; no pickle.

``save(model, "dir/student")`` writes ``dir/student.npz`` (parameters and buffers under
state_dict keys such as ``"0.weight"``) and ``dir/student.json`` (layer types and constructor
arguments). Each file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written file. ``load`` builds the layers from the JSON by class name (a fixed
registry: nothing from the file is executed) and reads both files through ``minikd.files`` (never
pickle); a damaged or inconsistent pair (a missing key, a wrong shape, a NaN weight) is refused
with a ``FileError`` naming the file. A round trip reproduces outputs bit for bit.

``load_state_dict(model, arrays)`` copies arrays (e.g. a PyTorch ``state_dict`` saved with
``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``) into a model of the same layout,
checking every key and shape.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..files import FileError, atomic_write, check_finite_rows, read_json, read_npz, write_npz
from .module import LAYER_TYPES, Sequential

__all__ = ["save", "load", "load_state_dict", "state_dict"]

FORMAT = "minikd.Sequential/1"


def state_dict(model: Sequential) -> dict:
    """Parameters and buffers as NumPy arrays under PyTorch-style keys."""
    out = {k: to_numpy(v) for k, v in model.state("params").items()}
    out.update({k: to_numpy(v) for k, v in model.state("buffers").items()})
    return out


def _stem(path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def save(model: Sequential, path, extra: dict | None = None):
    """Write ``<path>.npz`` and ``<path>.json``; ``extra`` is stored in the JSON (metadata)."""
    stem = _stem(path)
    arch = {"format": FORMAT, **model.config(), "extra": extra or {}}

    text = json.dumps(arch, indent=1)   # first: metadata JSON cannot hold fails before any file is written
    write_npz(stem.with_suffix(".npz"), state_dict(model))
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text))


def load_state_dict(model: Sequential, arrays, strict: bool = True) -> Sequential:
    """Copy arrays into the model's params and buffers, checking keys and shapes."""
    arrays = dict(arrays)
    expected = {**model.state("params"), **model.state("buffers")}
    missing = [k for k in expected if k not in arrays and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in arrays if k not in expected]
    if strict and (missing or unexpected):
        raise ValueError(f"state dict: missing keys {missing}, unexpected keys {unexpected}")
    for name, layer in model.named_layers():
        for store in (layer.params, layer.buffers):
            for k, v in store.items():
                key = f"{name}.{k}"
                if key not in arrays:
                    continue
                a = np.asarray(arrays[key])
                if tuple(a.shape) != tuple(v.shape):
                    raise ValueError(f"state dict: {key} has shape {tuple(a.shape)}, the model "
                                     f"expects {tuple(v.shape)}")
                store[k] = a.astype(v.dtype)
    model.zero_grad()
    return model


def _architecture(arch, jpath) -> Sequential:
    """The model a saved ``.json`` describes, every field checked (a FileError names what is wrong)."""
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise FileError(f"{jpath}: not a minikd model (expected format {FORMAT!r})")
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FileError(f"{jpath}: 'layers' must be a non-empty list of layers")
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict) or not {"type", "name", "args"} <= set(spec) or \
                not isinstance(spec["args"], dict):
            raise FileError(f"{jpath}: layer {i} must be an object with 'type', 'name' and 'args' (an object)")
        if spec["type"] not in LAYER_TYPES:
            raise FileError(f"{jpath}: layer {i}: unknown layer type {spec['type']!r}; known: {sorted(LAYER_TYPES)}")
    if not isinstance(arch.get("extra", {}), dict):
        raise FileError(f"{jpath}: 'extra' must be an object")
    try:
        return Sequential.from_config(arch)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FileError(f"{jpath}: the layers cannot be built from it ({exc})") from None
    except MemoryError:
        raise FileError(f"{jpath}: the layers it describes do not fit in memory") from None


def load(path) -> Sequential:
    """Rebuild a model saved by ``save``. A missing, damaged or inconsistent file (a key or shape
    that does not match the architecture, a non-finite weight) raises ``FileError`` naming it."""
    stem = _stem(path)
    jpath, npath = stem.with_suffix(".json"), stem.with_suffix(".npz")
    for p in (jpath, npath):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file (a saved model is a .json and a .npz pair)")
    arch = read_json(jpath, "a minikd model's architecture")
    model = _architecture(arch, jpath)
    arrays = read_npz(npath, "a minikd model's weights")
    for key, a in arrays.items():
        if a.dtype.kind not in "fiub":
            raise FileError(f"{npath}: {key} has dtype {a.dtype}, expected numbers")
        try:
            check_finite_rows(a.reshape(1, -1) if a.ndim == 0 else a, f"{key}")
        except ValueError as exc:
            raise FileError(f"{npath}: weight {exc}") from None
    try:
        load_state_dict(model, arrays)
    except ValueError as exc:
        raise FileError(f"{npath}: does not match {jpath.name} ({exc})") from None
    for key, a in arrays.items():
        if key.endswith("running_var") and (a < 0).any():
            raise FileError(f"{npath}: {key} has a negative variance ({a.min():g})")
    model.extra = arch.get("extra", {})
    return model
