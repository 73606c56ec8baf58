"""The training loop: the chapter's `train(model)` as one visible function, and its state.

The chapter (section 2.4) trains each structure with plain SGD on the squared error
against the digit value, for 10 epochs of 64-image batches, and records the batch loss
every 200 batches. `fit` is that loop. Everything a run needs to continue later is one
object, `TrainState`, which `fit` takes and gives back; output leaves the loop through
one `Reporter`, which records nothing, so silencing it changes no figure.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from digitlab.data import get_mnist_dataloader
from digitlab.errors import UserError
from digitlab.signals import SIGNALS, StopRequest
from digitlab.tasks import Task, get_task
from digitlab.training.augment import distort
from digitlab.training.custom_steps import choose_step
from digitlab.training.distributed import SINGLE, World, agree, shard
from digitlab.training.optim import lr_factor, set_lr
from digitlab.training.reporters import BAR_EVERY, ConsoleReporter, Reporter


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


@dataclass
class FitOptions:
    """How `fit` trains: everything but the model, its data, the optimiser and the hooks."""

    epochs: int = 10
    task: str | Task = "regress"
    log_every: int = 200  # record (and print) the batch loss every N batches, as the chapter does
    max_batches: int | None = None  # stop each epoch after N batches (a smoke run)
    schedule: str = "none"  # scales each parameter group's base lr per step (optim.lr_factor)
    augment: torch.Generator | None = None  # draws handwriting-like distortions (augment.distort)
    patience: int = 0  # epochs without a better validation accuracy before the run stops; 0: never
    precision: str = "fp32"  # bf16: the forward pass and the loss under torch.autocast in bfloat16
    smoothing: float = 0.0  # label smoothing of a classifier's targets (tasks.Task.loss)
    name: str = "training"  # what the progress bar says


@dataclass
class Hooks:
    """What `fit` calls at named moments; each does nothing by default."""

    validate: Callable[[nn.Module], tuple[float, float]] | None = None  # model -> (loss, accuracy), each epoch
    save: Callable[[TrainState], None] | None = None  # at every epoch's end, and when a signal stops the run
    reporter: Reporter = field(default_factory=Reporter)  # log lines, bars, TensorBoard
    stop: StopRequest = field(default_factory=StopRequest)  # Ctrl-C and SIGTERM: stop after this step
    world: World = SINGLE  # the processes training together: each its slice of every batch (distributed.py)


def fit(model: nn.Module, loader, optimizer: torch.optim.Optimizer, options: FitOptions | None = None, *,
        state: TrainState | None = None, step=None, hooks: Hooks | None = None, **settings) -> TrainState:
    """Train from `state` (a fresh one by default) to `options.epochs`; returns the state it reached.

    Each batch is one optimiser step, as in pytorch/examples' train(): the forward pass, the task's
    loss, zero_grad, backward, step. `step`, when given, takes that step instead, (images, labels) ->
    loss: a fast path or another objective (custom_steps.choose_step: the hand-written mlp step, or digits
    with non-digits for --reject). What surrounds the step (the schedule, the log lines, Ctrl-C,
    validation and saving at each epoch's end, other processes) is `_Plan`'s, called at named moments.
    settings: FitOptions' fields, for a call without an options object (`fit(model, loader, opt, epochs=1)`).
    Under several processes (`hooks.world`), `model` is wrapped in DistributedDataParallel and every
    process agrees on each step's loss and on when to stop.
    """
    options, hooks = options or FitOptions(**settings), hooks or Hooks()
    state, task = state or TrainState(), get_task(options.task)
    plan = _Plan(loader, optimizer, options, hooks, state)
    with plan.running():  # the progress bar; a signal stops the run after a whole step
        while plan.next_epoch():
            model.train()
            for images, labels in plan.batches():  # this epoch's, shuffled, from where the state stands
                plan.schedule()  # this step's learning rate (FitOptions.schedule)
                if step is not None:
                    loss = step(images, labels)
                else:
                    with plan.autocast():  # bfloat16 where asked; the chapter's float32 otherwise
                        loss = task.loss(model(images), labels, options.smoothing)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if plan.record(loss):  # the chapter's log line and the bar; True: a signal stops it here
                    break
            plan.end_epoch(model)  # validation, the epoch's row, the saved state
    return state


class _Plan:
    """What fit works out once and does around each step: batches per epoch, steps in all, each group's
    base lr, the epoch's loss buffer, the stop the processes agreed on; and the hooks' named moments."""

    def __init__(self, loader, optimizer: torch.optim.Optimizer, options: FitOptions, hooks: Hooks,
                 state: TrainState):
        self.loader, self.optimizer, self.options, self.hooks, self.state = loader, optimizer, options, hooks, state
        self.per_epoch = len(loader) if options.max_batches is None else min(len(loader), options.max_batches)
        self.total_steps = options.epochs * self.per_epoch
        self.base_lrs = [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base  # kept in the optimiser's state, so a resumed run scales the same base
        self.device = next(p.device for g in optimizer.param_groups for p in g["params"])
        self.losses = torch.empty(self.per_epoch, device=self.device)  # one epoch, filled without syncs
        self.agreed: str | None = None  # under several processes: the stop they all agreed on, after a step
        self.first = self.count = 0  # the epoch's first batch (a resumed epoch's is not 0); this batch's images
        self.started, self.images_before, self.cut = 0.0, 0, False
        # digitlab's InMemoryLoader can start an epoch's order part-way (resume); any other iterable of
        # (images, labels) batches with a len(), a torch DataLoader say, is read from its start each epoch
        self.resumable = hasattr(loader, "batches") and hasattr(loader, "generator")
        if self.resumable and state.shuffle is None:
            state.shuffle = loader.generator.get_state()

    def halted(self) -> str | None:
        return self.agreed if self.hooks.world.distributed else self.hooks.stop.requested

    @contextlib.contextmanager
    def running(self):
        self.hooks.reporter.start(self.options.name, self.total_steps, self.state.step)
        try:
            # several processes stop together after an agreed step: a second signal (torchrun sends SIGTERM
            # after forwarding Ctrl-C) must not unwind one of them in the middle of a collective
            with self.hooks.stop.graceful(escalate=not self.hooks.world.distributed):
                yield
                if self.halted() and not self.state.stopped:
                    self.state.stopped = self.halted()
                    self._save()
        finally:
            self.hooks.reporter.close()

    def next_epoch(self) -> bool:
        """Whether another epoch runs (none after a signal, patience, or the last); it starts the clock."""
        state = self.state
        if self.cut or state.epoch >= self.options.epochs or state.stopped or self.halted():
            return False
        self.started, self.images_before = time.perf_counter(), state.history.images
        return True

    def batches(self):
        """The epoch's (images, labels) from `state.batch` on: distorted (--augment) with the whole batch's
        draws on every process, then each process's slice of it."""
        state, options, world = self.state, self.options, self.hooks.world
        self.first = state.batch
        if self.resumable:
            self.loader.generator.set_state(state.shuffle)
            batches = self.loader.batches(start=state.batch, stop=self.per_epoch)
        else:
            batches = itertools.islice(self.loader, state.batch, self.per_epoch)
        for images, labels in batches:
            images, labels = images.to(self.device), labels.to(self.device)  # where they are already: no copy
            self.count = len(labels)
            if options.augment is not None:
                images = distort(images, options.augment)
            if world.distributed:
                images, labels = shard(world, images, labels)
            yield images, labels

    def schedule(self) -> None:
        if self.options.schedule != "none":
            set_lr(self.optimizer, self.base_lrs, lr_factor(self.options.schedule, self.state.step, self.total_steps))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16")

    def record(self, loss: torch.Tensor) -> bool:
        """One step's figures: the loss into the epoch's buffer (checked every BAR_EVERY steps, which costs
        the mlp less than a check per step would, and a GPU no sync), the chapter's log line, counters; under
        several processes, the loss and the stop they agree on. True when a signal asks the run to stop."""
        state, history, reporter = self.state, self.state.history, self.hooks.reporter
        if self.hooks.world.distributed:
            loss, self.agreed = agree(self.hooks.world, loss, self.hooks.stop.requested)
        self.losses[state.batch] = loss.detach()
        if (state.batch + 1) % BAR_EVERY == 0:
            _check_finite(self.losses, max(self.first, state.batch + 1 - BAR_EVERY), state, self.optimizer)
        if state.batch % self.options.log_every == 0:
            history.loss_list.append(loss.item())
            history.log_points.append((state.epoch, state.batch))
            history.log_steps.append(state.step)
            reporter.logged(state.epoch, state.batch, state.step, history.loss_list[-1])
        state.batch += 1
        state.step += 1
        history.images += self.count
        reporter.step(state.step, loss)
        return bool(self.halted())

    def end_epoch(self, model: nn.Module) -> None:
        """The batches' losses checked and kept; a whole epoch gets its row, validation and saved state."""
        state, history = self.state, self.state.history
        _check_finite(self.losses, self.first, state, self.optimizer, end=state.batch)
        history.batch_loss += self.losses[self.first:state.batch].tolist()
        seconds = time.perf_counter() - self.started
        history.seconds += seconds
        if state.batch < self.per_epoch:  # a signal stopped the epoch part-way
            self.cut = True
            return
        row = _end_epoch(state, model, self.optimizer, self.per_epoch, self.hooks.validate, self.options.patience)
        row.update(seconds=seconds, images_per_second=(history.images - self.images_before) / seconds)
        history.epochs.append(row)
        self.hooks.reporter.epoch_end(row)
        state.epoch, state.batch = state.epoch + 1, 0
        if self.resumable:
            state.shuffle = self.loader.generator.get_state()  # the next epoch's order starts here
        self._save()

    def _save(self) -> None:
        if self.hooks.save is not None:
            self.hooks.save(self.state)


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
    row: dict[str, Any] = dict.fromkeys(EPOCH_COLUMNS)
    row.update(epoch=state.epoch, train_loss=math.fsum(history.batch_loss[-per_epoch:]) / per_epoch,
               lr=optimizer.param_groups[0]["lr"])
    if validate is not None:
        row["val_loss"], row["val_accuracy"] = validate(model)
        if state.best_accuracy is None or state.best_epoch is None or row["val_accuracy"] > state.best_accuracy:
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
    options = FitOptions(epochs=epochs, task=task, log_every=log_every, name=type(model).__name__)
    state = fit(model, loader, optimizer, options, step=choose_step(model, optimizer, task),
                hooks=Hooks(reporter=ConsoleReporter()))
    return state.history.loss_list
