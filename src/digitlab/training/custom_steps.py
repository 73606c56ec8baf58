"""Steps that the loop takes in place of its own (loop.fit shows the chapter's forward, loss,
zero_grad, backward, step), each an object it is handed: the loop never asks which.

- `OutlierExposureStep` (`--reject`): the loop's step, plus non-digits made from a quarter of the
  batch, which the model learns to answer with a flat distribution (Hendrycks et al., 2019).
- `HandWrittenMLPStep`: the chapter's sigmoid MLP (any hidden sizes; sigmoid, tanh or ReLU) with
  plain SGD, its gradient written out by hand. For a 7,971-parameter model, autograd's bookkeeping
  costs more than the arithmetic; the dozen matrix products below give the same loss and gradients
  (the tests check them against autograd through `fit`) in about a third of the time. `--no-fast-mlp`
  leaves autograd in charge.

`choose_step` picks one (or none) before training starts. Each step returns the batch's loss.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from digitlab.models import MLP
from digitlab.tasks import Task, get_task
from digitlab.training.augment import non_digits

# weight of the non-digits' flat-target loss (0.5 in Hendrycks et al., 2019; 0.1 measured better here)
OUTLIER_WEIGHT = 0.1


class OutlierExposureStep:
    """Digits plus non-digits made from a quarter of them, which the model learns to answer with a flat
    distribution; the loss returned is the digits' alone, comparable with a run without outliers."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: str | Task,
                 generator: torch.Generator, precision: str = "fp32", smoothing: float = 0.0):
        self.model, self.optimizer, self.task, self.smoothing = model, optimizer, get_task(task), smoothing
        self.generator = generator  # the run's augmentation generator: its draws follow the distortions'
        device = next(model.parameters()).device
        self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                          enabled=precision == "bf16")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = max(1, len(images) // 4)
        unsure = non_digits(images[:k], labels[:k], self.generator)
        with self.autocast():
            output = self.model(torch.cat([images, unsure]))
            loss = self.task.loss(output[:len(images)], labels, self.smoothing)
            flat = -F.log_softmax(output[len(images):], 1).mean()  # cross-entropy against a flat target
        self.optimizer.zero_grad()
        (loss + OUTLIER_WEIGHT * flat).backward()
        self.optimizer.step()
        return loss


# Each activation's derivative, from its output a, times the gradient g that reaches it:
# sigmoid' = a (1 - a), tanh' = 1 - a^2, relu' = 1 where a > 0. (g * a * (1 - a) multiplies in
# that order, as the step always has: the chapter's numbers stay the same to the bit.)
DERIVATIVES = {
    "sigmoid": lambda g, a: g * a * (1 - a),
    "tanh": lambda g, a: g * (1 - a * a),
    "relu": lambda g, a: g * (a > 0),
}


def mlp_gradients(model: MLP, images: torch.Tensor, labels: torch.Tensor, task: str | Task):
    """The loss and every parameter's gradient, in model.parameters() order: (loss, [grads])."""
    weights = [(layer.weight.detach(), layer.bias.detach()) for layer in model.layers]
    outputs = [images.flatten(1)]  # (B, 784), then each hidden layer's (B, 10)
    for w, b in weights[:-1]:
        outputs.append(model.act(torch.addmm(b, outputs[-1], w.t())))
    w, b = weights[-1]
    out = torch.addmm(b, outputs[-1], w.t())  # (B, 1) or (B, 10)
    loss, d_out = get_task(task).loss_and_gradient(out, labels)  # d loss / d out: (B, 1) or (B, 10)
    grads: list[torch.Tensor] = []
    derivative = DERIVATIVES[model.activation]
    for (w, _), a in zip(reversed(weights), reversed(outputs)):  # from the head back to the first layer
        grads[:0] = [d_out.t() @ a, d_out.sum(0)]  # this layer's weight and bias
        if a is not outputs[0]:
            d_out = derivative(d_out @ w, a)  # d loss / d (the layer below's pre-activation)
    return loss, grads


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD without momentum: the only update this step knows how to apply."""
    group = optimizer.param_groups[0]
    return (type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1 and not group["momentum"]
            and not group["maximize"] and not group.get("differentiable", False))


class HandWrittenMLPStep:
    """One SGD step (weight decay included) on hand-written gradients; returns the batch loss."""

    def __init__(self, model: MLP, optimizer: torch.optim.Optimizer, task: str | Task):
        self.model, self.group, self.task = model, optimizer.param_groups[0], task
        self.params: list[torch.Tensor] = list(model.parameters())

    @classmethod
    def for_model(cls, model, optimizer: torch.optim.Optimizer, task: str | Task) -> HandWrittenMLPStep | None:
        """The step for this model and optimiser, or None where autograd must do the work."""
        fits = isinstance(model, MLP) and model.activation in DERIVATIVES and _plain_sgd(optimizer)
        return cls(model, optimizer, task) if fits else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, grads = mlp_gradients(self.model, images, labels, self.task)
        with torch.no_grad():  # the same arithmetic as torch.optim.SGD
            if self.group["weight_decay"]:
                torch._foreach_add_(grads, self.params, alpha=self.group["weight_decay"])
            torch._foreach_add_(self.params, grads, alpha=-self.group["lr"])
        return loss


def choose_step(model: nn.Module, optimizer: torch.optim.Optimizer, task: str | Task, *, fast_mlp: bool = True,
                outliers: torch.Generator | None = None, distributed: bool = False, precision: str = "fp32",
                smoothing: float = 0.0):
    """The step a run trains with in place of the loop's own (loop.fit), or None for the loop's own: the
    non-digits' objective with --reject, else the hand-written mlp step where it applies. That one knows
    nothing of non-digits, of other processes (under DistributedDataParallel the gradients are
    autograd's, all-reduced), of bf16 or of smoothed labels; `--no-fast-mlp` turns it off."""
    if outliers is not None:
        return OutlierExposureStep(model, optimizer, task, outliers, precision, smoothing)
    if fast_mlp and not distributed and precision == "fp32" and not smoothing:
        return HandWrittenMLPStep.for_model(model, optimizer, task)
    return None
