"""Small MLP/CNN stack with hand-derived backward passes (floor 2).

    layer.forward(x, train) -> (y, cache);  layer.backward(dy, cache) -> dx (adds into grads)
"""
from .activations import GELU, Dropout, Flatten, LeakyReLU, ReLU, Reshape, Tanh
from .conv import Conv1d, Conv2d
from .linear import Linear
from .module import LAYER_TYPES, Layer, Sequential, convert
from .norm import BatchNorm1d, BatchNorm2d
from .optim import SGD, Adam, AdamW, cosine_schedule, step_schedule
from .pool import AvgPool1d, AvgPool2d, GlobalAvgPool, MaxPool1d, MaxPool2d
from .serialize import load, load_state_dict, save, state_dict

__all__ = ["Layer", "Sequential", "LAYER_TYPES", "convert", "Linear", "Conv1d", "Conv2d",
           "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "GlobalAvgPool", "BatchNorm1d",
           "BatchNorm2d", "ReLU", "LeakyReLU", "Tanh", "GELU", "Dropout", "Flatten", "Reshape",
           "SGD", "Adam", "AdamW", "step_schedule", "cosine_schedule", "save", "load",
           "load_state_dict", "state_dict"]
