"""The chapter's `paddle.summary` table, for PyTorch models.

torchinfo walks the layers; the figures are computed the way paddle.summary (and
torchsummary before it) computes them, so they match the chapter to the digit:
every size assumes 4-byte floats, and the forward/backward pass size is twice the sum
of every listed layer's output, one copy for activations and one for their gradients.
Activations applied as functions (F.relu, torch.sigmoid) are not layers, so, as in the
chapter, they get no row.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from torch import nn

BYTES_PER_FLOAT = 4
MB = 1024**2


@dataclass(frozen=True)
class LayerRow:
    name: str  # type with a per-type index, e.g. "Conv2d-1"
    input_shape: list[list[int]]
    output_shape: list[int]
    params: int


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    total_params: int
    trainable_params: int
    input_mb: float
    forward_backward_mb: float
    params_mb: float

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def total_mb(self) -> float:
        return self.input_mb + self.forward_backward_mb + self.params_mb

    def as_dict(self) -> dict[str, int]:
        """What paddle.summary returns."""
        return {"total_params": self.total_params, "trainable_params": self.trainable_params}


def describe(model: nn.Module, input_size: tuple[int, ...]) -> Summary:
    """Run one forward pass on zeros of `input_size` and collect the table's figures."""
    import torchinfo

    device = next(model.parameters()).device
    stats = torchinfo.summary(model, input_size=input_size, verbose=0, device=device)
    seen: Counter[str] = Counter()
    rows = []
    for layer in stats.summary_list:
        if not layer.is_leaf_layer or layer.depth == 0:
            continue
        seen[layer.class_name] += 1
        rows.append(LayerRow(
            name=f"{layer.class_name}-{seen[layer.class_name]}",
            input_shape=[list(layer.input_size)],
            output_shape=list(layer.output_size),
            params=layer.num_params,
        ))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    outputs = sum(math.prod(row.output_shape) for row in rows)
    return Summary(
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        input_mb=math.prod(input_size) * BYTES_PER_FLOAT / MB,
        forward_backward_mb=2 * outputs * BYTES_PER_FLOAT / MB,
        params_mb=total * BYTES_PER_FLOAT / MB,
    )


def render(s: Summary, title: str | None = None):
    """A rich renderable laid out like the chapter's table."""
    from rich import box
    from rich.console import Group
    from rich.table import Column, Table
    from rich.text import Text

    table = Table("Layer (type)", "Input Shape", "Output Shape", Column("Param #", justify="right"), title=title,
                  box=box.SIMPLE_HEAVY)
    for row in s.rows:
        table.add_row(row.name, str(row.input_shape), str(row.output_shape), f"{row.params:,}")
    footer = Text(
        f"Total params: {s.total_params:,}\n"
        f"Trainable params: {s.trainable_params:,}\n"
        f"Non-trainable params: {s.non_trainable_params:,}\n"
        f"Input size (MB): {s.input_mb:.2f}\n"
        f"Forward/backward pass size (MB): {s.forward_backward_mb:.2f}\n"
        f"Params size (MB): {s.params_mb:.2f}\n"
        f"Estimated Total Size (MB): {s.total_mb:.2f}"
    )
    return Group(table, footer)


def summary(model: nn.Module, input_size: tuple[int, ...] = (1, 1, 28, 28), console=None,
            title: str | None = None) -> dict[str, int]:
    """Print the chapter's summary table and return {'total_params', 'trainable_params'}.

    The same call as the chapter's `paddle.summary(model, (1, 1, 28, 28))`; the table's title is the
    model's class unless `title` names it.
    """
    from rich.console import Console

    s = describe(model, tuple(input_size))
    (console or Console()).print(render(s, title=title or type(model).__name__))
    return s.as_dict()


def training_flops(config) -> int:
    """FLOPs of one training step (forward and backward) at a TrainConfig's batch size, counted by
    torch.utils.flop_counter on the model built on the meta device (shapes only: no memory, no data;
    the data do not change the count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from digitlab.models import model_for
    from digitlab.tasks import get_task

    task = get_task(config.task)
    with torch.device("meta"):
        model = model_for(config)
        batch = config.batch_size + (max(1, config.batch_size // 4) if config.reject else 0)
        images = torch.zeros(batch, 1, 28, 28)
        labels = torch.zeros(config.batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        output = model(images)
        task.loss(output[:config.batch_size], labels).backward()
    return int(counter.get_total_flops())
