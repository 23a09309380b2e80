"""Save and load models: weights as ``.npz``, the architecture as ``.json``; no pickle.

``save(model, "dir/student")`` writes ``dir/student.npz`` (parameters and buffers under
state_dict keys such as ``"0.weight"``) and ``dir/student.json`` (layer types and constructor
arguments). Each file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written file. ``load`` builds the layers from the JSON by class name (a fixed
registry: nothing from the file is executed) and reads arrays with ``allow_pickle=False``.
A round trip reproduces outputs bit for bit.

``load_state_dict(model, arrays)`` copies arrays (e.g. a PyTorch ``state_dict`` saved with
``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``) into a model of the same layout,
checking every key and shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from .module import Sequential

__all__ = ["save", "load", "load_state_dict", "state_dict", "atomic_write"]

FORMAT = "minikd.Sequential/1"


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **state_dict(model))

    def write_json(tmp):
        tmp.write_text(json.dumps(arch, indent=1))

    atomic_write(stem.with_suffix(".npz"), write_npz)
    atomic_write(stem.with_suffix(".json"), write_json)


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


def load(path) -> Sequential:
    """Rebuild a model saved by ``save``; raises ValueError on a missing or malformed file."""
    stem = _stem(path)
    jpath, npath = stem.with_suffix(".json"), stem.with_suffix(".npz")
    for p in (jpath, npath):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file (a saved model is a .json and a .npz pair)")
    try:
        arch = json.loads(jpath.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{jpath}: not valid JSON ({exc})") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise ValueError(f"{jpath}: not a minikd model (expected format {FORMAT!r})")
    model = Sequential.from_config(arch)
    with np.load(npath, allow_pickle=False) as data:
        load_state_dict(model, {k: data[k] for k in data.files})
    model.extra = arch.get("extra", {})
    return model
