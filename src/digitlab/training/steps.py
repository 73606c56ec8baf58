"""A fast path for the chapter's sigmoid MLP: its SGD step with the gradient written out by hand.

For a 7,971-parameter model, autograd's bookkeeping costs more than the arithmetic. The
dozen matrix products below give the same loss and gradients (the tests check them
against autograd) in about a third of the time. `fit` takes this step only when it is
handed one: `HandWrittenMLPStep.for_model` offers it for an MLP with plain SGD, and
`--no-fast-mlp` (or any other model or optimiser) leaves autograd in charge.
"""
from __future__ import annotations

import torch

from digitlab.models import MLP
from digitlab.tasks import Task, get_task


def mlp_gradients(model: MLP, images: torch.Tensor, labels: torch.Tensor, task: str | Task):
    """The loss and every parameter's gradient, in model.parameters() order: (loss, [grads])."""
    x = images.flatten(1)  # (B, 784)
    w1, b1, w2, b2, w3, b3 = (p.detach() for p in model.parameters())
    a1 = torch.sigmoid(torch.addmm(b1, x, w1.t()))  # (B, 10)
    a2 = torch.sigmoid(torch.addmm(b2, a1, w2.t()))  # (B, 10)
    out = torch.addmm(b3, a2, w3.t())  # (B, 1) or (B, 10)
    loss, d_out = get_task(task).loss_and_gradient(out, labels)  # d loss / d out: (B, 1) or (B, 10)
    d_z2 = (d_out @ w3) * a2 * (1 - a2)  # sigmoid' = a (1 - a)
    d_z1 = (d_z2 @ w2) * a1 * (1 - a1)
    grads = [d_z1.t() @ x, d_z1.sum(0), d_z2.t() @ a1, d_z2.sum(0), d_out.t() @ a2, d_out.sum(0)]
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
        self.params = list(model.parameters())

    @classmethod
    def for_model(cls, model, optimizer: torch.optim.Optimizer, task: str | Task) -> HandWrittenMLPStep | None:
        """The step for this model and optimiser, or None where autograd must do the work."""
        return cls(model, optimizer, task) if isinstance(model, MLP) and _plain_sgd(optimizer) else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, grads = mlp_gradients(self.model, images, labels, self.task)
        with torch.no_grad():  # the same arithmetic as torch.optim.SGD
            if self.group["weight_decay"]:
                torch._foreach_add_(grads, self.params, alpha=self.group["weight_decay"])
            torch._foreach_add_(self.params, grads, alpha=-self.group["lr"])
        return loss
