"""Where the training loop's output goes: nothing (the base class), the console's log lines and
progress bar, TensorBoard event files, or several at once. A reporter records nothing."""
from __future__ import annotations

import importlib
import sys

import torch

from digitlab.errors import UserError

BAR_EVERY = 16  # steps between progress-bar updates: one per step would cost the mlp ~10% of its speed


class Reporter:
    """Where the loop's output goes. This base class shows nothing; the figures are recorded anyway."""

    def start(self, name: str, total_steps: int, done_steps: int) -> None: ...

    def step(self, done_steps: int, loss: torch.Tensor) -> None: ...

    def logged(self, epoch: int, batch: int, step: int, loss: float) -> None: ...

    def epoch_end(self, row: dict) -> None: ...

    def close(self) -> None: ...

    def notice(self, text: str) -> None:
        """Something the user should know about the run that is not a figure (a shrunk validation split)."""

    def begin(self, text: str) -> None:
        """What a new run is about to do, in a line: its recipe and its folder, once the folder is its own."""


class ConsoleReporter(Reporter):
    """The chapter's log lines, a progress bar with the current loss, and a line per epoch."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"))
        self.task, self.done, self.loss = None, 0, None

    def start(self, name, total_steps, done_steps):
        if done_steps:  # a resumed run: where it picks up
            print(f"{name}: resuming after step {done_steps:,} of {total_steps:,}")
        self.bar.start()
        self.task = self.bar.add_task(name, total=total_steps, completed=done_steps, loss="-")

    def step(self, done_steps, loss):
        self.done, self.loss = done_steps, loss
        if done_steps % BAR_EVERY == 0:
            self._catch_up()

    def logged(self, epoch, batch, step, loss):
        self.bar.console.print(f"epoch: {epoch}, batch: {batch}, loss is: {loss:.7g}", highlight=False)

    def epoch_end(self, row):
        self._catch_up()
        line = f"epoch {row['epoch']} done: mean loss {row['train_loss']:.4f}"
        if row.get("val_accuracy") is not None:
            line += f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.2%}"
        self.bar.console.print(line, highlight=False)

    def close(self):
        self._catch_up()
        self.bar.stop()

    def notice(self, text):
        print(f"digitlab: {text}", file=sys.stderr)

    def begin(self, text):
        print(text, flush=True)

    def _catch_up(self):
        if self.loss is not None:
            self.bar.update(self.task, completed=self.done, loss=f"{self.loss.item():.4f}")


class Reporters(Reporter):
    """Several reporters as one (the console and TensorBoard, say)."""

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def start(self, name, total_steps, done_steps):
        for r in self.reporters:
            r.start(name, total_steps, done_steps)

    def step(self, done_steps, loss):
        for r in self.reporters:
            r.step(done_steps, loss)

    def logged(self, epoch, batch, step, loss):
        for r in self.reporters:
            r.logged(epoch, batch, step, loss)

    def epoch_end(self, row):
        for r in self.reporters:
            r.epoch_end(row)

    def close(self):
        for r in self.reporters:
            r.close()

    def notice(self, text):
        for r in self.reporters:
            r.notice(text)

    def begin(self, text):
        for r in self.reporters:
            r.begin(text)


class TensorBoardReporter(Reporter):
    """TensorBoard event files: the logged batch losses, and each epoch's losses, accuracy and lr."""

    def __init__(self, log_dir):
        self.check_installed()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    @staticmethod
    def check_installed() -> None:
        try:
            importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' in "
                            "digitlab's folder (or make setup)") from None

    def logged(self, epoch, batch, step, loss):
        self.writer.add_scalar("train/batch_loss", loss, step)

    def epoch_end(self, row):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr", "images_per_second"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])

    def close(self):
        self.writer.close()
