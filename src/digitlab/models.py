"""The network structures, and a registry to build them by name.

Every model splits `forward_features` (the body) from `forward_head` (one Linear layer),
so regression (`num_outputs=1`, the chapter) and classification (`num_outputs=10`)
differ by one argument.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from digitlab.data import COLS, ROWS
from digitlab.errors import UserError

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


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that, in eval mode, skips the arg-max indices.

    In eval mode a 2x2/stride-2 pool is three elementwise maxima of strided views: the same
    values, bit for bit, about 15% faster evaluation of the chapter's cnn on a CPU. In
    training mode it is nn.MaxPool2d itself (whose gradient for tied values training relies
    on). The switch is the module's mode, never autograd's, so an exported graph is the
    same whether or not gradients were on. It keeps the name, so summary tables read as
    the chapter's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (self.kernel_size, self.stride, self.padding, self.dilation,
                             self.ceil_mode) not in (((2, 2), (2, 2), (0, 0), (1, 1), False), (2, 2, 0, 1, False)):
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode drops an odd last row/column
        x = x[..., :h, :w]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


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
        self.max_pool1 = MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c, c, k, stride=1, padding=pad)
        self.max_pool2 = MaxPool2d(kernel_size=2, stride=2)
        features = c * (ROWS // 4) * (COLS // 4)  # 20 channels x 7 x 7 = 980 after two pools
        self.fc = nn.Linear(features, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # The chapter applies ReLU, then pools. Pooling first is the same function with the
        # same gradients (ReLU is monotone, so relu(max(a, b)) = max(relu(a), relu(b)), and
        # the only ties are at zero, where ReLU passes no gradient), on 4x fewer values.
        x = F.relu(self.max_pool1(self.conv1(x)))  # (B, 20, 14, 14)
        x = F.relu(self.max_pool2(self.conv2(x)))  # (B, 20, 7, 7)
        return x.flatten(1)  # (B, 980)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998): tanh and average-pool "subsampling", 6 and 16 maps, then
    120-84 fully connected. The 28x28 input is padded by 2 to the paper's 32x32."""

    def __init__(self, num_outputs: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # (B, 6, 28, 28)
        self.pool1 = nn.AvgPool2d(2)  # (B, 6, 14, 14)
        self.conv2 = nn.Conv2d(6, 16, 5)  # (B, 16, 10, 10)
        self.pool2 = nn.AvgPool2d(2)  # (B, 16, 5, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.tanh(self.conv1(x)))
        x = self.pool2(torch.tanh(self.conv2(x)))
        x = torch.tanh(self.fc1(x.flatten(1)))  # (B, 120)
        return torch.tanh(self.fc2(x))  # (B, 84)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias: BatchNorm brings its own) -> 2x2 max-pool -> BatchNorm -> ReLU.

    Pooling before BatchNorm normalises 4x fewer values; on a CPU, BatchNorm at full
    resolution cost as much as the convolutions.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class ConvNet(nn.Module):
    """A modern small CNN: three conv/BatchNorm/pool blocks, then dropout and one Linear.

    Spatial size 28 -> 14 -> 7 -> 3; widths are a parameter, so one class serves both
    the accurate `convnet` and the quick `convnet_small`.
    """

    def __init__(self, num_outputs: int = 10, widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.25):
        super().__init__()
        c1, c2, c3 = widths
        self.blocks = nn.Sequential(ConvBlock(1, c1), ConvBlock(c1, c2), ConvBlock(c2, c3))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c3 * (ROWS // 8) * (COLS // 8), num_outputs)  # 3 x 3 maps after three pools

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.blocks(x).flatten(1))  # (B, c3 * 9)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    lr: float  # a good plain-SGD learning rate; the chapter's for mlp and cnn
    task: str  # the default task: regress for the chapter's two models, classify otherwise
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(lr: float, description: str, task: str = "classify"):
    """Decorator: add a factory `fn(num_outputs=..., **kw) -> nn.Module` under its own name."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn, lr, task, description)
        return fn

    return add


@register_model(lr=0.01, task="regress", description="the chapter's sigmoid MLP, 784-10-10-1")
def mlp(num_outputs: int = 1, init: str = "paddle") -> nn.Module:
    return _initialise(MLP(num_outputs), init)


@register_model(lr=0.001, task="regress", description="the chapter's CNN: two 5x5 conv + max-pool blocks, then 980-1")
def cnn(num_outputs: int = 1, init: str = "paddle") -> nn.Module:
    return _initialise(CNN(num_outputs), init)


@register_model(lr=0.05, description="LeNet-5 (LeCun et al., 1998), tanh and average pooling")
def lenet5(num_outputs: int = 10, init: str = "torch") -> nn.Module:
    return _initialise(LeNet5(num_outputs), init)


@register_model(lr=0.01, description="a modern small CNN: 3 conv/BatchNorm/pool blocks (32-64-128), dropout")
def convnet(num_outputs: int = 10, init: str = "torch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths=(32, 64, 128)), init)


@register_model(lr=0.01, description="convnet at half width (16-32-64), for speed")
def convnet_small(num_outputs: int = 10, init: str = "torch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths=(16, 32, 64), dropout=0.1), init)


@register_model(lr=0.02, description="convnet at a quarter width (8-16-32), no dropout: the sprint to 99%")
def convnet_tiny(num_outputs: int = 10, init: str = "torch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths=(8, 16, 32), dropout=0.0), init)


INITIALISERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "paddle": init_like_paddle,  # the chapter's code starts from these
    "torch": lambda model: model,  # PyTorch's defaults, as the layers made them
}


def _initialise(model: nn.Module, init: str) -> nn.Module:
    if init not in INITIALISERS:
        raise UserError(f"unknown init '{init}'; choose one of: {', '.join(INITIALISERS)}")
    return INITIALISERS[init](model)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device`. On a CPU, conv weights go channels-last (NHWC).

    oneDNN's NHWC convolutions run the chapter's cnn about 1.5x faster than NCHW here
    (benchmarks/cnn_variants.py). Activations follow the weights' layout, so inputs can
    stay NCHW; the function computed is the same, up to float rounding.
    """
    model = model.to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, **kw) -> nn.Module:
    """Build a registered model by name, e.g. `create_model('cnn', num_outputs=10)`.

    `init=None` means the model's own initial weights (and works for a factory without `init`).
    """
    if kw.get("init", "") is None:
        del kw["init"]
    return model_entry(name).factory(**kw)


def default_lr(name: str) -> float:
    return model_entry(name).lr


def default_task(name: str) -> str:
    return model_entry(name).task


def default_init(name: str) -> str | None:
    """The initial weights a model starts from unless told otherwise: its factory's `init` default,
    or None for a factory that takes no `init` (a model registered by a user, say)."""
    parameter = inspect.signature(model_entry(name).factory).parameters.get("init")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
