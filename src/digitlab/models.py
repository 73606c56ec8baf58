"""The network structures, and a registry to build them by name.

Every model splits `forward_features` (the body) from `forward_head` (one Linear layer),
so regression (`num_outputs=1`, the chapter) and classification (`num_outputs=10`)
differ by one argument. Each factory's other keyword arguments are its structure's knobs
(sizes, activation, pooling): `create_model('mlp', hidden=[100], activation='relu')`, or
`--structure hidden=100` on the command line. Their defaults are the chapter's structures.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from digitlab.data import COLS, ROWS
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.structures import INPUT_SHAPE, PlannedLayer, check_structure, check_weights, plan_layers


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


ACTIVATION: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "leaky_relu": F.leaky_relu, "gelu": F.gelu}
ACTIVATION_LAYER: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
NON_DECREASING = {"sigmoid", "tanh", "relu", "leaky_relu"}  # max-pooling commutes with these (not with gelu)
POOL: dict[str, type[nn.Module]] = {"max": MaxPool2d, "avg": nn.AvgPool2d}


class MLP(nn.Module):
    """The chapter's first `MNIST` class: 784 -> 10 -> 10 -> num_outputs, sigmoid hidden layers.

    `hidden` lists the hidden layers' sizes, input side first: (10, 10) is the chapter's, (100,) one
    layer of 100, () none at all (a linear model). The layers are fc1, fc2, ...; the last is the head.
    """

    def __init__(self, num_outputs: int = 1, hidden: Sequence[int] = (10, 10), activation: str = "sigmoid"):
        super().__init__()
        inputs = [ROWS * COLS, *hidden]  # 784 inputs, then each hidden layer's units
        for i, (n_in, n_out) in enumerate(zip(inputs, [*hidden, num_outputs]), 1):  # the head last, no activation
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
        self.activation = activation
        self.act = ACTIVATION[activation]

    @property
    def layers(self) -> list[nn.Linear]:
        return [m for m in self.children() if isinstance(m, nn.Linear)]  # fc1, fc2, ..., the head last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))  # (B, hidden[i])
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def conv_side(side: int, kernel: int, padding: int) -> int:
    """The side of a stride-1 convolution's output."""
    return side + 2 * padding - kernel + 1


class CNN(nn.Module):
    """The chapter's second `MNIST` class: two 5x5 conv + 2x2 max-pool blocks, then Linear.

    `channels` gives each block's channels ((20, 20) is the chapter's, and a third number adds a block);
    `kernel`, `pool` and `activation` apply to every block.
    """

    def __init__(self, num_outputs: int = 1, channels: Sequence[int] = (20, 20), kernel: int = 5, pool: str = "max",
                 activation: str = "relu"):
        super().__init__()
        side, c_in, pad = ROWS, 1, kernel // 2  # an odd kernel keeps the picture's size: 28x28 stays 28x28
        for i, c in enumerate(channels, 1):
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c, kernel, stride=1, padding=pad))
            self.add_module(f"{pool}_pool{i}", POOL[pool](kernel_size=2, stride=2))
            side, c_in = conv_side(side, kernel, pad) // 2, c
        self.fc = nn.Linear(c_in * side * side, num_outputs)  # 20 channels x 7 x 7 = 980 for the chapter's
        self.act = ACTIVATION[activation]
        # The chapter activates, then pools. Max-pooling first is the same function with the same gradients
        # for an activation that never decreases (f(max(a, b)) = max(f(a), f(b)); where ReLU ties at zero it
        # passes no gradient), on 4x fewer values. Average pooling does not commute with any of them.
        self.pool_first = pool == "max" and activation in NON_DECREASING

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip(_children(self, nn.Conv2d), _children(self, *POOL.values())):
            x = conv(x)  # (B, 20, 28, 28) in the chapter's first block
            x = self.act(pool(x)) if self.pool_first else pool(self.act(x))  # (B, 20, 14, 14)
        return x.flatten(1)  # (B, 980)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998): tanh and average-pool "subsampling", 6 and 16 maps, then
    120-84 fully connected. The 28x28 input is padded by 2 to the paper's 32x32; later 5x5
    convolutions are unpadded, as in the paper."""

    def __init__(self, num_outputs: int = 10, channels: Sequence[int] = (6, 16), hidden: Sequence[int] = (120, 84),
                 activation: str = "tanh", pool: str = "avg"):
        super().__init__()
        side, c_in = ROWS, 1
        for i, c in enumerate(channels, 1):
            pad = 2 if i == 1 else 0
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c, 5, padding=pad))  # (B, 6, 28, 28), then (B, 16, 10, 10)
            self.add_module(f"pool{i}", POOL[pool](2))  # (B, 6, 14, 14), then (B, 16, 5, 5)
            side, c_in = conv_side(side, 5, pad) // 2, c
        inputs = [c_in * side * side, *hidden]  # 16 x 5 x 5 = 400, 120, 84
        for i, (n_in, n_out) in enumerate(zip(inputs, [*hidden, num_outputs]), 1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
        self.act = ACTIVATION[activation]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip(_children(self, nn.Conv2d), _children(self, *POOL.values())):
            x = pool(self.act(conv(x)))  # (B, 6, 14, 14), then (B, 16, 5, 5)
        x = x.flatten(1)  # (B, 400)
        for fc in _children(self, nn.Linear)[:-1]:
            x = self.act(fc(x))  # (B, 120), then (B, 84)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return _children(self, nn.Linear)[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _children(module: nn.Module, *kinds: type[nn.Module]) -> list[nn.Module]:
    """A module's layers of these kinds, in the order they were made (conv1, conv2, ...)."""
    return [m for m in module.children() if isinstance(m, kinds)]


class ConvBlock(nn.Sequential):
    """3x3 conv -> 2x2 max-pool -> BatchNorm -> ReLU (norm="none": the conv keeps its bias instead).

    Pooling before BatchNorm normalises 4x fewer values; on a CPU, BatchNorm at full
    resolution cost as much as the convolutions.
    """

    def __init__(self, c_in: int, c_out: int, norm: str = "batch"):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), MaxPool2d(2)]
        layers += [nn.BatchNorm2d(c_out)] if norm == "batch" else []  # BatchNorm brings its own bias
        super().__init__(*layers, nn.ReLU())


class ConvNet(nn.Module):
    """A modern small CNN: conv/BatchNorm/pool blocks (three by default), then dropout and one Linear.

    Spatial size 28 -> 14 -> 7 -> 3; widths are a parameter, so one class serves both
    the accurate `convnet` and the quick `convnet_small`.
    """

    def __init__(self, num_outputs: int = 10, widths: Sequence[int] = (32, 64, 128), dropout: float = 0.25,
                 norm: str = "batch"):
        super().__init__()
        channels = [1, *widths]
        self.blocks = nn.Sequential(*(ConvBlock(c_in, c_out, norm) for c_in, c_out in zip(channels, channels[1:])))
        self.dropout = nn.Dropout(dropout)
        side = ROWS // 2 ** len(widths)  # each block halves the side: 3 x 3 maps after three
        self.fc = nn.Linear(channels[-1] * side * side, num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.blocks(x).flatten(1))  # (B, c3 * 9)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LayerList(nn.Module):
    """A network written as a list of layers (docs/structures.md), then a Linear head.

    `structures.plan_layers` has worked out each layer's input before this builds it, so the file
    names only what a person chooses: channels, kernel sizes, widths.
    """

    def __init__(self, num_outputs: int = 10, layers: Sequence[dict] = ()):
        super().__init__()
        planned = plan_layers(list(layers))
        self.body = nn.Sequential(*(_layer(p) for p in planned))
        self.head = nn.Linear(math.prod(planned[-1].output_shape), num_outputs)  # the last layer's output, flat

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _layer(p: PlannedLayer) -> nn.Module:
    """The module for one planned layer, its input size taken from the plan."""
    size, a = p.input_shape[0], p.args
    make = {
        "conv": lambda: nn.Conv2d(size, a["channels"], a["kernel"], stride=a["stride"], padding=a["padding"]),
        "maxpool": lambda: MaxPool2d(a["size"]),
        "avgpool": lambda: nn.AvgPool2d(a["size"]),
        "batchnorm": lambda: nn.BatchNorm2d(size) if len(p.input_shape) == 3 else nn.BatchNorm1d(size),
        "dropout": lambda: nn.Dropout(a["p"]),
        "flatten": nn.Flatten,
        "linear": lambda: nn.Linear(size, a["size"]),
    }
    return make[p.kind]() if p.kind in make else ACTIVATION_LAYER[p.kind]()


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    lr: float  # a good plain-SGD learning rate; the chapter's for mlp and cnn
    task: str  # the default task: regress for the chapter's two models, classify otherwise
    description: str


_REGISTRY: dict[str, ModelEntry] = {}
NOT_KNOBS = ("num_outputs", "init")  # a factory's other keyword arguments are its structure's knobs


def register_model(lr: float, description: str, task: str = "classify"):
    """Decorator: add a factory `fn(num_outputs=..., **knobs) -> nn.Module` under its own name. Its
    keyword arguments other than num_outputs and init are its structure's knobs, with their defaults."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn, lr, task, description)
        return fn

    return add


@register_model(lr=0.01, task="regress", description="the chapter's sigmoid MLP, 784-10-10-1")
def mlp(num_outputs: int = 1, init: str = "paddle", hidden: Sequence[int] = (10, 10),
        activation: str = "sigmoid") -> nn.Module:
    return _initialise(MLP(num_outputs, hidden, activation), init)


@register_model(lr=0.001, task="regress", description="the chapter's CNN: two 5x5 conv + max-pool blocks, then 980-1")
def cnn(num_outputs: int = 1, init: str = "paddle", channels: Sequence[int] = (20, 20), kernel: int = 5,
        pool: str = "max", activation: str = "relu") -> nn.Module:
    return _initialise(CNN(num_outputs, channels, kernel, pool, activation), init)


@register_model(lr=0.05, description="LeNet-5 (LeCun et al., 1998), tanh and average pooling")
def lenet5(num_outputs: int = 10, init: str = "torch", channels: Sequence[int] = (6, 16),
           hidden: Sequence[int] = (120, 84), activation: str = "tanh", pool: str = "avg") -> nn.Module:
    return _initialise(LeNet5(num_outputs, channels, hidden, activation, pool), init)


@register_model(lr=0.01, description="a modern small CNN: 3 conv/BatchNorm/pool blocks (32-64-128), dropout")
def convnet(num_outputs: int = 10, init: str = "torch", widths: Sequence[int] = (32, 64, 128), dropout: float = 0.25,
            norm: str = "batch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths, dropout, norm), init)


@register_model(lr=0.01, description="convnet at half width (16-32-64), for speed")
def convnet_small(num_outputs: int = 10, init: str = "torch", widths: Sequence[int] = (16, 32, 64),
                  dropout: float = 0.1, norm: str = "batch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths, dropout, norm), init)


@register_model(lr=0.02, description="convnet at a quarter width (8-16-32), no dropout: the sprint to 99%")
def convnet_tiny(num_outputs: int = 10, init: str = "torch", widths: Sequence[int] = (8, 16, 32),
                 dropout: float = 0.0, norm: str = "batch") -> nn.Module:
    return _initialise(ConvNet(num_outputs, widths, dropout, norm), init)


# The chapter's cnn written as a layer list: where a list of your own starts (docs/structures.md)
CHAPTER_CNN_LAYERS = (
    {"type": "conv", "channels": 20, "kernel": 5}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv", "channels": 20, "kernel": 5}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "flatten"},
)


@register_model(lr=0.01, description="a network written as a list of layers in a TOML file (docs/structures.md); "
                                     "by default the chapter's cnn")
def layers(num_outputs: int = 10, init: str = "torch", layers: Sequence[dict] = CHAPTER_CNN_LAYERS) -> nn.Module:
    return _initialise(LayerList(num_outputs, layers), init)


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
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    return model


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, **kw) -> nn.Module:
    """Build a registered model by name, e.g. `create_model('cnn', num_outputs=10)`, or a variant of
    its structure: `create_model('mlp', hidden=[100, 100], activation='relu')`.

    `init=None` means the model's own initial weights (and works for a factory without `init`).
    The structure is checked first (`checked_structure`), so a bad one costs no memory.
    """
    if kw.get("init", "") is None:
        del kw["init"]
    given = {k: kw.pop(k) for k in list(kw) if k not in NOT_KNOBS}
    return model_entry(name).factory(**kw, **checked_structure(name, given, kw.get("num_outputs", 10)))


def model_for(config, init: str | None = None) -> nn.Module:
    """The network a training config describes: its model and structure, with its task's outputs.
    `init` None: the model's own initial weights (for weights about to be loaded over them)."""
    from digitlab.tasks import get_task

    return create_model(config.model, num_outputs=get_task(config.task).outputs, init=init, **config.structure)


def knobs(name: str) -> dict[str, Any]:
    """A registered model's structure keys with their defaults (None: one that must be given), from its
    factory's keyword arguments: knobs('mlp') == {'hidden': [10, 10], 'activation': 'sigmoid'}."""
    parameters = inspect.signature(model_entry(name).factory).parameters.values()
    return {p.name: None if p.default is inspect.Parameter.empty else
            list(p.default) if isinstance(p.default, tuple) else p.default
            for p in parameters if p.name not in NOT_KNOBS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def checked_structure(name: str, structure: dict | None = None, num_outputs: int = 10) -> dict[str, Any]:
    """The model's whole structure, its defaults with `structure`'s values, once it is known to build.

    Each value is checked (structures.check_structure); then the network is built on PyTorch's meta
    device, which has shapes but no memory, to count its weights and to pass one 1x28x28 picture
    through it. A bad structure is one UserError naming the key or the layer, before any weights exist.
    """
    full = check_structure(name, {} if structure is None else structure, knobs(name))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 0-wide layer of a network too deep: dry_run names it
            model = model_entry(name).factory(num_outputs=num_outputs, **full)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a Python-registered factory's own refusal, in one line
        raise UserError(f"{name} cannot be built with {full}: {one_line(str(e))[:200]}") from None
    check_weights(name, sum(p.numel() for p in model.parameters()))
    dry_run(name, model)
    return full


def dry_run(name: str, model: nn.Module) -> None:
    """Pass one picture through a model on the meta device (shapes only); a layer that cannot take its
    input is a UserError naming it: a kernel larger than its input, a pool over a 1x1 map."""
    names = {module: path for path, module in model.named_modules()}
    entered: list[tuple[nn.Module, tuple]] = []

    def enter(module: nn.Module, args: tuple) -> None:
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        entered.append((module, shape))
        if isinstance(module, nn.Conv2d) and len(shape) == 4 and (
                module.kernel_size[0] > shape[2] or module.kernel_size[1] > shape[3]):
            raise UserError(f"{name}: {names[module]} ({type(module).__name__}): its kernel "
                            f"({'x'.join(map(str, module.kernel_size))}) is larger than its {shape[2]}x{shape[3]} "
                            "input: the network is too deep for 28x28, or its kernel too large")

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules() if not any(m.children())]
    try:
        model(torch.zeros(2, *INPUT_SHAPE, device="meta"))  # two: BatchNorm refuses one while training
    except (RuntimeError, ValueError) as e:
        module, shape = entered[-1] if entered else (model, ())
        raise UserError(f"{name}: {names[module] or name} ({type(module).__name__}) cannot take its "
                        f"{'x'.join(map(str, shape[1:]))} input ({one_line(str(e).splitlines()[0])[:120]}): the "
                        "network is too deep for 28x28, or its layers' sizes do not fit") from None
    finally:
        for hook in hooks:
            hook.remove()


def default_lr(name: str) -> float:
    return model_entry(name).lr


def default_task(name: str) -> str:
    return model_entry(name).task


def default_init(name: str) -> str | None:
    """The initial weights a model starts from unless told otherwise: its factory's `init` default,
    or None for a factory that takes no `init` (a model registered by a user, say)."""
    parameter = inspect.signature(model_entry(name).factory).parameters.get("init")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
