"""Layer contract and the Sequential model with feature taps.

A layer holds parameters and their gradients, never activations:

    y, cache = layer.forward(x, train=True)
    dx = layer.backward(dy, cache)        # adds d loss / d params into layer.grads

``params`` and ``grads`` are dicts with the same keys (PyTorch's names: ``weight``, ``bias``);
``buffers`` holds non-trainable state (BatchNorm's running statistics). ``config()`` returns the
constructor arguments, so that an architecture is plain JSON and loading runs no code.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import checks
from ..backend import get_namespace

__all__ = ["Layer", "Sequential", "SequentialCache", "LAYER_TYPES", "register", "convert", "check_int",
           "check_ints", "check_float"]


def check_int(value, name: str, owner: str, minimum: int = 1) -> int:
    """A layer's integer argument (``minikd.checks.integer``; the error names ``owner`` and ``name``)."""
    return checks.integer(f"{owner}: {name}", value, minimum)


def check_ints(value, d: int, name: str, owner: str, minimum: int = 1) -> tuple:
    """``check_int`` for a per-axis argument: one integer for all ``d`` axes, or a tuple / list of ``d``."""
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"{owner}: {name}: expected one integer or a list of {d}, got {list(value)}")
        return tuple(check_int(v, name, owner, minimum) for v in value)
    return (check_int(value, name, owner, minimum),) * d


def check_float(value, name: str, owner: str, low=None, high=None, low_open: bool = False) -> float:
    """A layer's real argument (``minikd.checks.number``; the error names ``owner`` and ``name``)."""
    return checks.number(f"{owner}: {name}", value, low, high, exclusive_minimum=low_open)


LAYER_TYPES: dict[str, type] = {}


def register(cls):
    """Make a layer class constructible from its JSON config (by class name; no code runs)."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


class Layer:
    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}

    def config(self) -> dict:
        return {}

    def forward(self, x, train: bool = True):
        raise NotImplementedError

    def backward(self, dy, cache):
        raise NotImplementedError

    def zero_grad(self):
        for k, p in self.params.items():
            self.grads[k] = get_namespace(p).zeros_like(p)

    def _init_grads(self):
        self.zero_grad()

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class SequentialCache(NamedTuple):
    caches: list        # one per layer
    features: dict      # tap name -> that layer's output


class Sequential(Layer):
    """Layers applied in order. Layer ``i`` is named ``names[i]`` (default ``str(i)``, as in
    ``torch.nn.Sequential``), so parameter keys are ``"<name>.<param>"`` like a state_dict.

    ``forward(x, train, taps=("name", ...))`` records those layers' outputs in
    ``cache.features``; ``backward(dy, cache, tap_grads={"name": g})`` adds g to the upstream
    gradient arriving at that layer's output (feature and relational distillation losses).
    """

    def __init__(self, layers, names=None):
        super().__init__()
        self.layers = list(layers)
        self.names = [str(i) for i in range(len(self.layers))] if names is None else list(names)
        if len(self.names) != len(self.layers) or len(set(self.names)) != len(self.names):
            raise ValueError("names: expected one distinct name per layer")

    def named_layers(self):
        return zip(self.names, self.layers)

    def forward(self, x, train: bool = True, taps=()):
        unknown = set(taps) - set(self.names)
        if unknown:
            raise ValueError(f"taps: no layer named {sorted(unknown)}; layers are {self.names}")
        caches, features = [], {}
        for name, layer in self.named_layers():
            x, c = layer.forward(x, train)
            caches.append(c)
            if name in taps:
                features[name] = x
        return x, SequentialCache(caches, features)

    def backward(self, dy, cache: SequentialCache, tap_grads=None):
        tap_grads = tap_grads or {}
        unknown = set(tap_grads) - set(cache.features)
        if unknown:
            raise ValueError(f"tap_grads: {sorted(unknown)} were not tapped in forward "
                             f"(tapped: {sorted(cache.features)})")
        for name, layer, c in reversed(list(zip(self.names, self.layers, cache.caches))):
            if name in tap_grads:
                dy = dy + tap_grads[name]
            dy = layer.backward(dy, c)
        return dy

    def predict(self, x, batch_size: int = 1024):
        """Eval-mode outputs in batches (no caches kept)."""
        xp = get_namespace(x)
        outs = [self.forward(x[i:i + batch_size], train=False)[0] for i in range(0, len(x), batch_size)]
        return xp.concatenate(outs) if outs else xp.zeros((0,))

    # ---- parameters as a flat, state_dict-like view
    def state(self, kind: str = "params") -> dict:
        out = {}
        for name, layer in self.named_layers():
            for k, v in getattr(layer, kind).items():
                out[f"{name}.{k}"] = v
        return out

    def parameters(self):
        """(key, param, grad) triples; optimizers update ``param`` in place."""
        for name, layer in self.named_layers():
            for k in layer.params:
                yield f"{name}.{k}", layer.params[k], layer.grads[k]

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p, _ in self.parameters()))

    def config(self) -> dict:
        return {"layers": [{"type": type(l).__name__, "name": n, "args": l.config()}
                           for n, l in self.named_layers()]}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        layers, names = [], []
        for spec in config["layers"]:
            if spec["type"] not in LAYER_TYPES:
                raise ValueError(f"architecture: unknown layer type {spec['type']!r}; known: "
                                 f"{sorted(LAYER_TYPES)}")
            layers.append(LAYER_TYPES[spec["type"]](**spec["args"]))
            names.append(spec["name"])
        return cls(layers, names)

    def __repr__(self):
        inner = "\n".join(f"  ({n}): {l!r}" for n, l in self.named_layers())
        return f"Sequential(\n{inner}\n)"


def convert(model: Sequential, device: str | None = None, dtype=None) -> Sequential:
    """Move a model's params, grads and buffers to ``device`` ("numpy" or "cupy") and/or cast
    floating arrays to ``dtype``, in place; returns the model."""
    from ..backend import to_numpy  # noqa: PLC0415
    if device not in (None, "numpy", "cupy"):
        raise ValueError(f"device: expected 'numpy' or 'cupy', got {device!r}")
    if device == "cupy":
        import cupy  # noqa: PLC0415
        move = cupy.asarray
    else:
        move = to_numpy if device == "numpy" else (lambda a: a)
    for layer in model.layers:
        for store in (layer.params, layer.grads, layer.buffers):
            for k, v in store.items():
                v = move(v)
                if dtype is not None and v.dtype.kind == "f":
                    v = v.astype(dtype)
                store[k] = v
    return model
