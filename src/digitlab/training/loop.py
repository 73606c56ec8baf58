"""The training loop: the chapter's `train(model)` as one visible function, and its state.

The chapter (section 2.4) trains each structure with plain SGD on the squared error
against the digit value, for 10 epochs of 64-image batches, and records the batch loss
every 200 batches. `fit` is that loop. Everything a run needs to continue later is one
object, `TrainState`, which `fit` takes and gives back; output leaves the loop through
one `Reporter`, which records nothing, so silencing it changes no figure.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from digitlab.data import get_mnist_dataloader
from digitlab.errors import UserError
from digitlab.stop import SIGNALS, StopRequest
from digitlab.tasks import Task, get_task
from digitlab.training.augment import distort, non_digits
from digitlab.training.distributed import SINGLE, World, agree, shard
from digitlab.training.optim import lr_factor, set_lr
from digitlab.training.reporters import BAR_EVERY, ConsoleReporter, Reporter
from digitlab.training.steps import HandWrittenMLPStep

OUTLIER_WEIGHT = 0.1  # weight of the non-digits' flat-target loss (0.5 in Hendrycks et al., 2019; 0.1 measured better here)


@dataclass
class History:
    """What one training run measured. Epochs count from 0, as the chapter's log lines do."""

    loss_list: list[float] = field(default_factory=list)  # the chapter's: one loss every log_every batches
    log_points: list[tuple[int, int]] = field(default_factory=list)  # (epoch, batch) of each of those
    log_steps: list[int] = field(default_factory=list)  # and its index in batch_loss
    batch_loss: list[float] = field(default_factory=list)  # every batch
    epochs: list[dict] = field(default_factory=list)  # one row per complete epoch (see EPOCH_COLUMNS)
    images: int = 0
    seconds: float = 0.0  # training only: validation is not counted

    @property
    def epoch_mean_loss(self) -> list[float]:
        return [row["train_loss"] for row in self.epochs]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def final_loss(self) -> float | None:
        return self.batch_loss[-1] if self.batch_loss else None


EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "images_per_second")


@dataclass
class TrainState:
    """Where a run is: enough, with the weights and the optimiser's state, to continue it exactly."""

    epoch: int = 0  # the epoch in progress (from 0); equals the number of epochs when the run is done
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps so far: the schedule's position
    shuffle: torch.Tensor | None = None  # the shuffle generator's state at the start of `epoch`
    best_accuracy: float | None = None  # best validation accuracy so far, and its epoch
    best_epoch: int | None = None
    stopped: str | None = None  # why the run ended early: "SIGINT", "SIGTERM" or "patience"
    history: History = field(default_factory=History)

    @property
    def interrupted(self) -> bool:
        return self.stopped in SIGNALS


class Diverged(UserError):
    """The loss became NaN or infinite: training cannot go on from here."""


def fit(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    epochs: int = 10,
    task: str | Task = "regress",
    *,
    state: TrainState | None = None,
    log_every: int = 200,
    max_batches: int | None = None,
    schedule: str = "none",
    augment: torch.Generator | None = None,
    outliers: torch.Generator | None = None,
    validate: Callable[[nn.Module], tuple[float, float]] | None = None,
    patience: int = 0,
    fast_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    reporter: Reporter | None = None,
    save: Callable[[TrainState], None] | None = None,
    name: str = "training",
    world: World = SINGLE,
    precision: str = "fp32",
    stop: StopRequest | None = None,
) -> TrainState:
    """Train from `state` (a fresh one by default) to `epochs`; returns the state it reached.

    schedule: scales each parameter group's base lr per step (see optim.lr_factor).
    augment: a generator to draw handwriting-like distortions from (augment.distort); None trains on the images as they are.
    outliers: a generator to make non-digits from a quarter of each batch (augment.non_digits), which the
        model learns to answer with a flat distribution (outlier exposure, classification only).
    validate: model -> (loss, accuracy) on held-out images, after every epoch; keeps the best epoch,
        and `patience` epochs without a better accuracy stop the run.
    fast_step: (images, labels) -> loss, a whole optimiser step that replaces autograd's (fast_mlp.py).
    save: called with the state at the end of every epoch and when a signal stops the run.
    world: the processes training together (distributed.py): each takes its slice of every batch, and
        they agree on each step's loss and on stopping; `model` is then wrapped in DistributedDataParallel.
    precision: "bf16" runs the forward pass and the loss under torch.autocast in bfloat16.
    stop: the command's Ctrl-C and SIGTERM (stop.py): the run stops after the step it is in, saved;
        by default one for this call, so that a notebook's Ctrl-C does the same.
    """
    state, task, stop = state or TrainState(), get_task(task), stop or StopRequest()
    history = state.history
    reporter = reporter or Reporter()
    per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)
    total_steps = epochs * per_epoch
    base_lrs = [group["initial_lr"] if "initial_lr" in group else group["lr"] for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = base  # kept in the optimiser's state, so a resumed run scales the same base
    if state.shuffle is None:
        state.shuffle = loader.generator.get_state()
    device = next(model.parameters()).device
    losses = torch.empty(per_epoch, device=device)  # one epoch, filled without syncs
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    check_every = BAR_EVERY  # a check per step would cost the mlp 6% of its speed (and a GPU a sync)
    reporter.start(name, total_steps, state.step)
    halted = None  # the stop every process agreed on, after a step (distributed); else the signal itself

    def asked() -> str | None:
        return halted if world.distributed else stop.requested

    try:
        # several processes stop together after an agreed step: a second signal (torchrun sends SIGTERM
        # after forwarding Ctrl-C) must not unwind one of them in the middle of a collective
        with stop.graceful(escalate=not world.distributed):
            while state.epoch < epochs and not state.stopped and not asked():
                start, first, images_before = time.perf_counter(), state.batch, history.images
                model.train()
                loader.generator.set_state(state.shuffle)
                for images, labels in loader.batches(start=state.batch, stop=per_epoch):
                    count = len(labels)
                    if schedule != "none":
                        set_lr(optimizer, base_lrs, lr_factor(schedule, state.step, total_steps))
                    if augment is not None:  # the whole batch on every process: the draws of a single one
                        images = distort(images, augment)
                    if world.distributed:
                        images, labels = shard(world, images, labels)
                    if fast_step is not None:
                        loss = fast_step(images, labels)
                    else:
                        if outliers is None:
                            with autocast():
                                loss = objective = task.loss(model(images), labels)
                        else:  # the loss logged is the digits' alone, comparable with a run without outliers
                            k = max(1, len(images) // 4)
                            unsure = non_digits(images[:k], labels[:k], outliers)
                            with autocast():
                                output = model(torch.cat([images, unsure]))
                                loss = task.loss(output[:len(images)], labels)
                                flat = -F.log_softmax(output[len(images):], 1).mean()  # cross-entropy, flat target
                                objective = loss + OUTLIER_WEIGHT * flat
                        optimizer.zero_grad()
                        objective.backward()
                        optimizer.step()
                    if world.distributed:
                        loss, halted = agree(world, loss, stop.requested)
                    losses[state.batch] = loss.detach()
                    if (state.batch + 1) % check_every == 0:
                        _check_finite(losses, max(first, state.batch + 1 - check_every), state, optimizer)
                    if state.batch % log_every == 0:
                        history.loss_list.append(loss.item())
                        history.log_points.append((state.epoch, state.batch))
                        history.log_steps.append(state.step)
                        reporter.logged(state.epoch, state.batch, state.step, history.loss_list[-1])
                    state.batch += 1
                    state.step += 1
                    history.images += count
                    reporter.step(state.step, loss)
                    if asked():
                        break
                _check_finite(losses, first, state, optimizer, end=state.batch)
                history.batch_loss += losses[first:state.batch].tolist()
                seconds = time.perf_counter() - start
                history.seconds += seconds
                if state.batch < per_epoch:  # a signal stopped the epoch part-way
                    break
                row = _end_epoch(state, model, optimizer, per_epoch, validate, patience)
                row.update(seconds=seconds, images_per_second=(history.images - images_before) / seconds)
                history.epochs.append(row)
                reporter.epoch_end(row)
                state.epoch += 1
                state.batch = 0
                state.shuffle = loader.generator.get_state()  # the next epoch's order starts here
                if save is not None:
                    save(state)
                if state.stopped:  # patience ran out
                    break
            if asked() and not state.stopped:
                state.stopped = asked()
                if save is not None:
                    save(state)
    finally:
        reporter.close()
    return state


def _check_finite(losses: torch.Tensor, start: int, state: TrainState, optimizer, end: int | None = None) -> None:
    """Raise Diverged if any of this epoch's losses from `start` on is NaN or infinite."""
    window = losses[start:state.batch + 1 if end is None else end]
    if not bool(torch.isfinite(window).all()):
        batch = start + int((~torch.isfinite(window)).nonzero()[0])
        raise Diverged(f"diverged at epoch {state.epoch}, batch {batch}: the loss became {float(losses[batch])}; "
                       f"try a lower --lr (this run's: {optimizer.param_groups[0].get('initial_lr', 0):g})")


def _end_epoch(state: TrainState, model, optimizer, per_epoch: int, validate, patience: int) -> dict:
    """The figures of the epoch just completed; validation, the best epoch so far, and patience."""
    history = state.history
    row = dict.fromkeys(EPOCH_COLUMNS)
    row.update(epoch=state.epoch, train_loss=math.fsum(history.batch_loss[-per_epoch:]) / per_epoch,
               lr=optimizer.param_groups[0]["lr"])
    if validate is not None:
        row["val_loss"], row["val_accuracy"] = validate(model)
        if state.best_accuracy is None or row["val_accuracy"] > state.best_accuracy:
            state.best_accuracy, state.best_epoch = row["val_accuracy"], state.epoch
        elif patience and state.epoch - state.best_epoch >= patience:
            state.stopped = "patience"
    return row


def train(
    model: nn.Module,
    loader=None,
    epochs: int = 10,
    lr: float = 0.01,
    task: str = "regress",
    log_every: int = 200,
) -> list[float]:
    """The chapter's `train(model)`: SGD on the squared error; returns the loss list.

    With no loader, the full training set is loaded as `get_mnist_dataloader()` does.
    """
    if loader is None:
        loader, _ = get_mnist_dataloader(device=next(model.parameters()).device)

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    state = fit(model, loader, optimizer, epochs=epochs, task=task, log_every=log_every,
                fast_step=HandWrittenMLPStep.for_model(model, optimizer, task), reporter=ConsoleReporter(),
                name=type(model).__name__)
    return state.history.loss_list
