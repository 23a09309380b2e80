"""The pipeline's default architectures for (N, D) inputs such as MNIST-1D (D = 40).

teacher_cnn: a 1-D CNN (about 25k parameters at D = 40):
    Reshape(1, D) -> [Conv1d k5 -> BatchNorm -> ReLU] x 2 (32 ch) -> MaxPool 2
    -> Conv1d k3 (64) -> BatchNorm -> ReLU -> MaxPool 2 -> Conv1d k3 (64) -> ReLU
    -> GlobalAvgPool -> Linear(64, C)
student_mlp: D -> hidden -> ReLU -> C (hidden 50: 2.6k parameters, about 1/10 of the teacher).
Taps (for feature / relational distillation): the teacher's "embed" (the pooled 64 features)
and the student's "hidden" (after its ReLU).
"""
from __future__ import annotations

from .activations import ReLU, Reshape
from .conv import Conv1d
from .init import make_rng
from .linear import Linear
from .module import Sequential, check_int
from .norm import BatchNorm1d
from .pool import GlobalAvgPool, MaxPool1d

__all__ = ["teacher_cnn", "student_mlp", "ARCHITECTURES"]


def teacher_cnn(features: int, classes: int, width: int = 32, seed=None) -> Sequential:
    if check_int(features, "features", "teacher_cnn") < 4:
        raise ValueError(f"teacher_cnn: features: expected at least 4 (two max-pools of 2 halve the "
                         f"length twice), got {features}")
    check_int(classes, "classes", "teacher_cnn")
    w = check_int(width, "width", "teacher_cnn")
    r = make_rng(seed)
    w2 = 2 * w
    layers = [
        ("reshape", Reshape([1, features])),
        ("conv1", Conv1d(1, w, 5, padding=2, seed=r)), ("bn1", BatchNorm1d(w)), ("relu1", ReLU()),
        ("conv2", Conv1d(w, w, 5, padding=2, seed=r)), ("bn2", BatchNorm1d(w)), ("relu2", ReLU()),
        ("pool2", MaxPool1d(2)),
        ("conv3", Conv1d(w, w2, 3, padding=1, seed=r)), ("bn3", BatchNorm1d(w2)), ("relu3", ReLU()),
        ("pool3", MaxPool1d(2)),
        ("conv4", Conv1d(w2, w2, 3, padding=1, seed=r)), ("relu4", ReLU()),
        ("embed", GlobalAvgPool()),
        ("fc", Linear(w2, classes, seed=r)),
    ]
    return Sequential([l for _, l in layers], [n for n, _ in layers])


def student_mlp(features: int, classes: int, hidden: int = 50, seed=None) -> Sequential:
    for name, value in (("features", features), ("classes", classes), ("hidden", hidden)):
        check_int(value, name, "student_mlp")
    r = make_rng(seed)
    return Sequential([Linear(features, hidden, seed=r), ReLU(), Linear(hidden, classes, seed=r)],
                      ["fc1", "hidden", "fc2"])


ARCHITECTURES = {"cnn": teacher_cnn, "mlp": student_mlp}
