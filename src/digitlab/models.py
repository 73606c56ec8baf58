"""The network structures, and a registry to build them by name.

Every model splits `forward_features` (the body) from `forward_head` (one Linear layer),
so regression (`num_outputs=1`, the chapter) and classification (`num_outputs=10`)
differ by one argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import COLS, ROWS
from .errors import UserError

INPUT_SIZE = (1, 1, ROWS, COLS)  # (B, C, H, W) of one image, as paddle.summary is called


def init_like_paddle(model: nn.Module) -> nn.Module:
    """Re-initialise parameters the way the chapter's PaddlePaddle layers start.

    Paddle's defaults differ from PyTorch's: Linear weights are Xavier-uniform, conv
    weights are normal with std sqrt(2 / fan_in), and every bias starts at zero. Using
    them keeps the first logged losses near the chapter's (26.4 for mlp, 33.8 for cnn).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * math.prod(module.kernel_size)
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


class MLP(nn.Module):
    """The chapter's first `MNIST` class: 784 -> 10 -> 10 -> num_outputs, sigmoid hidden layers."""

    def __init__(self, num_outputs: int = 1, hidden: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(ROWS * COLS, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_outputs)  # no activation: a regression output or logits

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        x = torch.sigmoid(self.fc1(x))
        return torch.sigmoid(self.fc2(x))  # (B, hidden)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CNN(nn.Module):
    """The chapter's second `MNIST` class: two 5x5 conv + 2x2 max-pool blocks, then Linear."""

    channels = 20
    kernel = 5

    def __init__(self, num_outputs: int = 1):
        super().__init__()
        c, k = self.channels, self.kernel
        pad = k // 2  # "same" padding keeps 28x28 through conv1 and 14x14 through conv2
        self.conv1 = nn.Conv2d(1, c, k, stride=1, padding=pad)
        self.max_pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c, c, k, stride=1, padding=pad)
        self.max_pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        features = c * (ROWS // 4) * (COLS // 4)  # 20 channels x 7 x 7 = 980 after two pools
        self.fc = nn.Linear(features, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool1(F.relu(self.conv1(x)))  # (B, 20, 14, 14)
        x = self.max_pool2(F.relu(self.conv2(x)))  # (B, 20, 7, 7)
        return x.flatten(1)  # (B, 980)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    lr: float  # the learning rate the course uses with plain SGD
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(lr: float, description: str):
    """Decorator: add a factory `fn(num_outputs=..., **kw) -> nn.Module` under its own name."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn, lr, description)
        return fn

    return add


@register_model(lr=0.01, description="the chapter's sigmoid MLP, 784-10-10-1")
def mlp(num_outputs: int = 1, init: str = "paddle") -> nn.Module:
    return _initialise(MLP(num_outputs), init)


@register_model(lr=0.001, description="the chapter's CNN, two 5x5 conv + max-pool blocks, then 980-1")
def cnn(num_outputs: int = 1, init: str = "paddle") -> nn.Module:
    return _initialise(CNN(num_outputs), init)


INITS = ("paddle", "torch")


def _initialise(model: nn.Module, init: str) -> nn.Module:
    if init not in INITS:
        raise UserError(f"unknown init '{init}'; choose one of: {', '.join(INITS)}")
    return init_like_paddle(model) if init == "paddle" else model


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, **kw) -> nn.Module:
    """Build a registered model by name, e.g. `create_model('cnn', num_outputs=10)`."""
    return model_entry(name).factory(**kw)


def default_lr(name: str) -> float:
    return model_entry(name).lr
