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
from .data import MNIST, PIXEL_CENTER, PIXEL_SCALE, InMemoryLoader, random_affine
from .errors import UserError
from .files import atomic_path, prepare_out_dir
from .models import INITS, MLP, create_model, default_lr, default_task, place

TASKS = {"regress": 1, "classify": 10}  # task -> output width
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "onecycle")
HISTORY_FILE = "history.json"
BAR_EVERY = 16  # steps between progress-bar updates


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved inside its checkpoint."""

    model: str = "cnn"
    task: str | None = None  # None: the model's own (regress for the chapter's mlp and cnn)
    epochs: int = 10
    lr: float | None = None  # None: the model's SGD rate (the chapter's: 0.01 mlp, 0.001 cnn)
    batch_size: int = 64
    optimizer: str = "sgd"
    schedule: str = "none"
    weight_decay: float = 0.0
    augment: bool = False  # random +-10 degree rotations and +-2 px shifts
    eval_every: int = 0  # test accuracy every N epochs; 0: only at the end
    seed: int = 0
    device: str = "auto"
    max_batches: int | None = None  # stop each epoch after this many batches (smoke runs)
    log_every: int = 200
    init: str | None = None  # None: the model's own (paddle for the chapter's two, as the chapter)

    def resolved(self) -> TrainConfig:
        """Check every field and fill in defaults; raises UserError on a bad value."""
        task = self.task or default_task(self.model)  # raises for an unknown model
        lr = default_lr(self.model) if self.lr is None else self.lr
        for name, value, choices in (("task", task, TASKS), ("device", self.device, DEVICES),
                                     ("init", self.init or INITS[0], INITS),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES)):
            if value not in choices:
                raise UserError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("log_every", self.log_every), ("lr", lr)):
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a positive number, got {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.eval_every < 0:
            raise UserError(f"eval_every must be 0 or more, got {self.eval_every}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise UserError(f"max_batches must be a positive integer, got {self.max_batches}")
        return replace(self, task=task, lr=lr)


# Named recipes; explicit options override them. Accuracy and wall time of each are
# measured by benchmarks/accuracy.py and benchmarks/time_to_99.py (see the README).
PRESETS: dict[str, dict] = {
    "chapter": {},
    "fast": dict(model="convnet_small", task="classify", epochs=1, batch_size=128, optimizer="adam",
                 lr=0.01, schedule="onecycle"),
    "best": dict(model="convnet", task="classify", epochs=20, batch_size=128, optimizer="adamw",
                 lr=0.003, weight_decay=0.05, schedule="onecycle", augment=True),
}


def preset_config(name: str, model: str | None = None, **overrides) -> TrainConfig:
    """A preset's config, with `overrides` (only the options a user set) on top."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **({"model": model} if model else {}), **overrides}
    return TrainConfig(**fields).resolved()


@dataclass
class History:
    """What one training run measured."""

    loss_list: list[float] = field(default_factory=list)  # the chapter's: one loss every log_every batches
    log_points: list[tuple[int, int]] = field(default_factory=list)  # (epoch, batch) of each of those
    batch_loss: list[float] = field(default_factory=list)  # every batch
    epoch_mean_loss: list[float] = field(default_factory=list)  # complete epochs only
    test_accuracy: list[dict] = field(default_factory=list)  # {epoch, accuracy, seconds of training so far}
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


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


ONECYCLE_WARMUP = 0.25  # fraction of the steps spent warming up
ONECYCLE_START = 0.04  # warm-up starts at lr / 25, as torch's OneCycleLR does


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier on the base learning rate at `step` of `total` (a pure function).

    step: x0.1 at 50% and again at 75% of training; cosine: half a cosine from 1 to 0;
    onecycle: linear warm-up from 0.04 to 1 over the first quarter, then cosine to 0.
    """
    t = min(step / max(total, 1), 1.0)
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        if t < ONECYCLE_WARMUP:
            return ONECYCLE_START + (1 - ONECYCLE_START) * t / ONECYCLE_WARMUP
        return 0.5 * (1 + math.cos(math.pi * (t - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)))
    raise UserError(f"unknown schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")


def mlp_gradients(model: MLP, images: torch.Tensor, labels: torch.Tensor, task: str):
    """The loss and every parameter's gradient for the sigmoid MLP, written out by hand.

    For a 7,971-parameter model, autograd's bookkeeping costs more than the arithmetic:
    these dozen matrix products give the same numbers (checked against autograd in the
    tests) in about a third of the time. Returns (loss, [grad for each parameter]), in
    model.parameters() order.
    """
    x = images.flatten(1)  # (B, 784)
    w1, b1, w2, b2, w3, b3 = (p.detach() for p in model.parameters())
    a1 = torch.sigmoid(torch.addmm(b1, x, w1.t()))  # (B, 10)
    a2 = torch.sigmoid(torch.addmm(b2, a1, w2.t()))  # (B, 10)
    out = torch.addmm(b3, a2, w3.t())  # (B, 1) or (B, 10)
    n = len(x)
    if task == "regress":
        diff = out.squeeze(1) - labels.to(out.dtype)
        loss = diff.square().mean()
        d_out = (2 / n) * diff.unsqueeze(1)  # d mean((out - y)^2) / d out
    else:
        log_p = torch.log_softmax(out, 1)
        loss = -log_p.gather(1, labels.unsqueeze(1)).mean()
        d_out = log_p.exp()
        d_out[torch.arange(n), labels] -= 1
        d_out /= n  # d cross_entropy / d logits = (softmax - onehot) / B
    d_z2 = (d_out @ w3) * a2 * (1 - a2)  # sigmoid' = a (1 - a)
    d_z1 = (d_z2 @ w2) * a1 * (1 - a1)
    grads = [d_z1.t() @ x, d_z1.sum(0), d_z2.t() @ a1, d_z2.sum(0), d_out.t() @ a2, d_out.sum(0)]
    return loss, grads


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD without momentum: the update the hand-written MLP step knows how to apply."""
    group = optimizer.param_groups[0]
    return (type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1 and not group["momentum"]
            and not group["maximize"] and not group.get("differentiable", False))


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
    schedule: str = "none",
    augment: torch.Generator | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 0,
) -> History:
    """The chapter's training loop, with a progress bar, timing and clean Ctrl-C.

    schedule: scales each parameter group's base lr per step (see lr_factor).
    augment: a generator to draw random affine distortions from; None trains on the images as they are.
    test: uint8 (images, labels) to score every `eval_every` epochs; scoring time is not training time.
    """
    from .evaluate import evaluate

    per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)
    total_steps = epochs * per_epoch
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    hand_written = isinstance(model, MLP) and _plain_sgd(optimizer)
    params = list(model.parameters())
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
                if schedule != "none":
                    factor = lr_factor(schedule, done, total_steps)
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
                if augment is not None:
                    images = random_affine(images, augment)
                if hand_written:  # the same SGD step as below, without autograd's overhead
                    loss, grads = mlp_gradients(model, images, labels, task)
                    group = optimizer.param_groups[0]
                    with torch.no_grad():
                        if group["weight_decay"]:
                            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
                        torch._foreach_add_(params, grads, alpha=-group["lr"])
                else:
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
                if done % BAR_EVERY == 0:  # a bar update per step would cost the mlp ~10% of its speed
                    bar.update(task_id, completed=done)
            bar.update(task_id, completed=done)
            if stop.requested:
                history.interrupted = True
                break
            epoch_losses = losses[done - per_epoch:done]
            history.epoch_mean_loss.append(epoch_losses.mean().item())
            if test is not None and eval_every and (epoch + 1) % eval_every == 0:
                paused = time.perf_counter()
                accuracy = evaluate(model, *test, task=task).accuracy
                history.test_accuracy.append({"epoch": epoch + 1, "accuracy": accuracy, "seconds": paused - start})
                start += time.perf_counter() - paused  # the clock measures training only
                bar.console.print(f"epoch: {epoch}, test accuracy: {accuracy:.4f}", highlight=False)
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
    test_accuracy: float
    out_dir: Path
    files: list[Path]


def run(config: TrainConfig, data: MNIST, out_dir: str | Path) -> RunResult:
    """Train one model from a config and write checkpoint, history and loss plot into `out_dir`."""
    from .evaluate import evaluate
    from .plots import plot_loss, save_figure

    cfg = config.resolved()
    if cfg.batch_size > len(data.train_labels):
        raise UserError(f"batch size {cfg.batch_size} is larger than the {len(data.train_labels):,} training images")
    device = resolve_device(cfg.device)
    out_dir = prepare_out_dir(out_dir)
    torch.manual_seed(cfg.seed)  # the weights; the loader shuffles with its own generator
    model = place(create_model(cfg.model, num_outputs=TASKS[cfg.task], **_init(cfg)), device)
    loader = InMemoryLoader(data.train_images, data.train_labels, cfg.batch_size, seed=cfg.seed, device=device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    augment = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment else None
    test = (data.test_images, data.test_labels)
    history = fit(model, loader, optimizer, epochs=cfg.epochs, task=cfg.task, log_every=cfg.log_every,
                  max_batches=cfg.max_batches, schedule=cfg.schedule, augment=augment, test=test,
                  eval_every=cfg.eval_every)
    params = sum(p.numel() for p in model.parameters())
    final = evaluate(model, *test, task=cfg.task)
    results = {
        "test_accuracy": final.accuracy,
        "test_loss": final.mean_loss,
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
    return RunResult(cfg, history, params, final.accuracy, out_dir, files)


def _init(cfg: TrainConfig) -> dict:
    return {"init": cfg.init} if cfg.init else {}  # else the model's own default


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
