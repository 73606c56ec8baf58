"""Training: the chapter's loop as one visible function, and a run that saves its results.

The chapter (section 2.4) trains each structure with plain SGD on the squared error
against the digit value, for 10 epochs of 64-image batches, and records the batch
loss every 200 batches. `fit` is that loop; `run` adds the checkpoint, the loss
history and the loss plot in one output folder.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import WEIGHTS_FILE, save_checkpoint
from .data import MNIST, PIXEL_CENTER, PIXEL_SCALE, InMemoryLoader
from .errors import UserError
from .files import atomic_path, prepare_out_dir
from .models import INITS, create_model, default_lr

TASKS = {"regress": 1, "classify": 10}  # task -> output width
DEVICES = ("auto", "cpu", "cuda")
HISTORY_FILE = "history.json"


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved inside its checkpoint."""

    model: str = "cnn"
    task: str = "regress"  # regress: the chapter's 1 output and squared error
    epochs: int = 10
    lr: float | None = None  # None: the chapter's rate for this model (0.01 mlp, 0.001 cnn)
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    max_batches: int | None = None  # stop each epoch after this many batches (smoke runs)
    log_every: int = 200
    init: str = "paddle"  # paddle: the chapter's initial weights; torch: PyTorch's defaults

    def resolved(self) -> TrainConfig:
        """Check every field and fill in defaults; raises UserError on a bad value."""
        default_lr(self.model)  # raises for an unknown model
        if self.task not in TASKS:
            raise UserError(f"unknown task '{self.task}'; choose one of: {', '.join(TASKS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device '{self.device}'; choose one of: {', '.join(DEVICES)}")
        if self.init not in INITS:
            raise UserError(f"unknown init '{self.init}'; choose one of: {', '.join(INITS)}")
        lr = default_lr(self.model) if self.lr is None else self.lr
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("log_every", self.log_every), ("lr", lr)):
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a positive number, got {value}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise UserError(f"max_batches must be a positive integer, got {self.max_batches}")
        return replace(self, lr=lr)


@dataclass
class History:
    """What one training run measured."""

    loss_list: list[float] = field(default_factory=list)  # the chapter's: one loss every log_every batches
    log_points: list[tuple[int, int]] = field(default_factory=list)  # (epoch, batch) of each of those
    batch_loss: list[float] = field(default_factory=list)  # every batch
    epoch_mean_loss: list[float] = field(default_factory=list)  # complete epochs only
    images: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def final_loss(self) -> float:
        return self.batch_loss[-1] if self.batch_loss else math.nan


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    return torch.device(device)


def compute_loss(output: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regress":
        # The chapter's F.square_error_cost then mean: the digit value is the target.
        return F.mse_loss(output.squeeze(1), labels.to(output.dtype))  # (B, 1) -> (B,)
    return F.cross_entropy(output, labels)  # (B, 10) logits against class indices


class _StopFlag:
    requested = False


@contextlib.contextmanager
def stop_on_sigint():
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts at once.

    Stopping between steps, never inside optimizer.step(), is what makes the state that
    gets saved a complete one.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
        disable=not enabled,
    )


def fit(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    epochs: int = 10,
    task: str = "regress",
    log_every: int = 200,
    max_batches: int | None = None,
    progress: bool = True,
) -> History:
    """The chapter's training loop, with a progress bar, timing and clean Ctrl-C."""
    per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)
    history = History()
    device = next(model.parameters()).device
    losses = torch.empty(epochs * per_epoch, device=device)  # filled without a device sync per batch
    done = 0
    with stop_on_sigint() as stop, _progress(progress) as bar:
        task_id = bar.add_task(type(model).__name__, total=epochs * per_epoch, loss="-")
        start = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            for batch, (images, labels) in enumerate(loader):
                if batch == per_epoch or stop.requested:
                    break
                loss = compute_loss(model(images), labels, task)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses[done] = loss.detach()
                done += 1
                history.images += len(labels)
                if batch % log_every == 0:
                    value = loss.item()
                    history.loss_list.append(value)
                    history.log_points.append((epoch, batch))
                    bar.console.print(f"epoch: {epoch}, batch: {batch}, loss is: {value:.7g}", highlight=False)
                    bar.update(task_id, loss=f"{value:.4f}")
                bar.advance(task_id)
            if stop.requested:
                history.interrupted = True
                break
            epoch_losses = losses[done - per_epoch:done]
            history.epoch_mean_loss.append(epoch_losses.mean().item())
        history.seconds = time.perf_counter() - start
    history.batch_loss = losses[:done].tolist()
    return history


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
        from .data import get_mnist_dataloader

        loader, _ = get_mnist_dataloader(device=next(model.parameters()).device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return fit(model, loader, optimizer, epochs=epochs, task=task, log_every=log_every).loss_list


@dataclass
class RunResult:
    config: TrainConfig
    history: History
    params: int
    out_dir: Path
    files: list[Path]


def run(config: TrainConfig, data: MNIST, out_dir: str | Path) -> RunResult:
    """Train one model from a config and write checkpoint, history and loss plot into `out_dir`."""
    from .plots import plot_loss, save_figure

    cfg = config.resolved()
    if cfg.batch_size > len(data.train_labels):
        raise UserError(f"batch size {cfg.batch_size} is larger than the {len(data.train_labels):,} training images")
    device = resolve_device(cfg.device)
    out_dir = prepare_out_dir(out_dir)
    torch.manual_seed(cfg.seed)  # the weights; the loader shuffles with its own generator
    model = create_model(cfg.model, num_outputs=TASKS[cfg.task], init=cfg.init).to(device)
    loader = InMemoryLoader(data.train_images, data.train_labels, cfg.batch_size, seed=cfg.seed, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    history = fit(model, loader, optimizer, epochs=cfg.epochs, task=cfg.task,
                  log_every=cfg.log_every, max_batches=cfg.max_batches)
    params = sum(p.numel() for p in model.parameters())
    results = {
        "epochs_completed": len(history.epoch_mean_loss),
        "interrupted": history.interrupted,
        "final_loss": history.final_loss,
        "last_epoch_mean_loss": history.epoch_mean_loss[-1] if history.epoch_mean_loss else None,
        "seconds": history.seconds,
        "images_per_second": history.images_per_second,
        "params": params,
        "data": data.source,
    }
    meta = {
        "model": cfg.model,
        "task": cfg.task,
        "num_outputs": TASKS[cfg.task],
        "normalization": {"center": PIXEL_CENTER, "scale": PIXEL_SCALE},
        "epochs": len(history.epoch_mean_loss),
        "seed": cfg.seed,
        "final_loss": history.final_loss,
        "config": asdict(cfg),
        "results": results,
    }
    files = [save_checkpoint(out_dir / WEIGHTS_FILE, model, meta)]
    record = {**meta, **asdict(history), "images_per_second": history.images_per_second}
    with atomic_path(out_dir / HISTORY_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    files.append(out_dir / HISTORY_FILE)
    files += save_figure(plot_loss(history.loss_list, title=f"{cfg.model} ({cfg.task})"), out_dir / "loss")
    return RunResult(cfg, history, params, out_dir, files)


def read_history(path: str | Path) -> dict:
    """A run's history.json, from the file or its run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no training history at '{path}'; pass a run folder made by `digitlab train`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable history file ({e})") from None
