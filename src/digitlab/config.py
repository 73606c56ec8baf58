"""The training options: the config dataclass, its presets, and its files.

Every field of `TrainConfig` is declared with options.option(): its help text, its choices or bounds,
and its command-line flag. The CLI's options (`train`, `compare`), config files (`--config FILE.toml`,
a run's `config.toml`) and presets all read that one declaration, so a new option is one edit here.
This module imports nothing heavy: `digitlab --help` builds its options from it without loading torch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from digitlab.errors import UserError
from digitlab.files import one_line, regular_file
from digitlab.options import ModelNames, option, problem
from digitlab.structures import nearest

TASKS = ("regress", "classify")  # the names; what each task is lives in tasks.py (which needs torch)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
INITS = ("paddle", "torch")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)  # PyTorch's (and Kingma and Ba's) decay rates of Adam's two running means
SCHEDULES = ("none", "step", "cosine", "onecycle")
CONFIG_FILE = "config.toml"


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in its checkpoint and its config.toml.

    None means "the model's own": lr, task and init default per model (the chapter's
    settings for mlp and cnn).
    """

    model: str = option("cnn", "the network structure", choices=lambda: list(ModelNames()))
    structure: dict = option(
        {}, "change the model's structure: KEY=VALUE, repeatable, a list written with commas, e.g. --structure "
            "hidden=100,100 --structure activation=relu (a config file's [structure] table; `digitlab summary "
            "MODEL` lists a model's keys and defaults; default: the model's own, the chapter's for mlp and cnn)",
        flag="--structure", metavar="KEY=VALUE")
    task: str | None = option(
        None, "regress: one output, squared error against the digit value, as in the chapter; classify: 10 "
              "logits and cross-entropy (default: regress for mlp and cnn, classify for the others)",
        choices=TASKS, kind=str)
    epochs: int = option(10, "passes over the training set", minimum=1)
    lr: float | None = option(
        None, "learning rate (default: the model's SGD rate; the chapter's 0.01 for mlp, 0.001 for cnn)",
        above=0, maximum=100, kind=float)
    batch_size: int = option(64, "images per batch", minimum=1)
    optimizer: str = option("sgd", "sgd as in the chapter; momentum is SGD with Nesterov momentum 0.9",
                            choices=OPTIMIZERS)
    schedule: str = option(
        "none", "learning-rate schedule over the whole run: step divides by 10 at 50%% and 75%%; cosine "
                "anneals to 0; onecycle warms up for 25%% then anneals", choices=SCHEDULES)
    weight_decay: float = option(0.0, "L2 penalty", minimum=0, maximum=10)
    beta1: float = option(ADAM_BETAS[0], "adam and adamw: how slowly the running mean of the gradient forgets "
                                         "(a lower one, e.g. 0.7, follows a one-epoch run's changes sooner)",
                          minimum=0, maximum=0.9999)
    beta2: float = option(ADAM_BETAS[1], "adam and adamw: how slowly the running mean of the squared gradient "
                                         "forgets", minimum=0, maximum=0.9999)
    augment: bool = option(False, "train on digits distorted the way people's handwriting differs "
                                          "from MNIST: thicker and thinner strokes, slant, size, width, a "
                                          "wobbly hand, small turns and shifts")
    reject: bool = option(False, "also train on non-digits made from a quarter of each batch (digits mirrored, "
                                 "turned on their side, overlaid or cut up) to a flat answer, so that a letter or a "
                                 "scribble comes out 'not sure' (outlier exposure; classify only)")
    label_smoothing: float = option(
        0.0, "train towards 1 - S on the right digit and S/10 spread over all ten instead of a one-hot target "
             "(Szegedy et al., 2016; classify only); the validation and test losses stay plain cross-entropy",
        minimum=0, maximum=0.5, metavar="S")
    val_split: int = option(
        0, "hold out N training images (stratified by digit, seeded, at most a tenth of the set) to validate on "
           "after every epoch, and keep the best checkpoint by validation accuracy (default: 0; 5000 in the "
           "fast and best presets)",
        minimum=0, metavar="N")
    patience: int = option(0, "stop when validation accuracy has not improved for N epochs; 0: never",
                           minimum=0, metavar="N")
    seed: int = option(0, "seeds the weights, the shuffling, the validation split, the augmentation and the "
                          "non-digits; the same seed on a CPU gives the same losses, bit for bit",
                       minimum=0, maximum=2**32 - 1)
    device: str = option("auto", "auto uses CUDA when PyTorch sees a GPU", choices=DEVICES)
    precision: str = option("fp32", "fp32, the chapter's maths; bf16 runs the forward pass under torch.autocast "
                                    "in bfloat16 (for a GPU; the mlp then trains through autograd)",
                            choices=PRECISIONS)
    max_batches: int | None = option(
        None, "stop each epoch after N batches, for a quick smoke run (default: whole epochs)",
        minimum=1, kind=int, flag="--batches", metavar="N")
    log_every: int = option(200, "print and record the loss every N batches", minimum=1, metavar="N")
    init: str | None = option(
        None, "initial weights: paddle, as the chapter's code starts; torch, PyTorch's defaults (default: "
              "paddle for mlp and cnn, torch for the others)", choices=INITS, kind=str)
    fast_mlp: bool = option(
        True, "train the sigmoid mlp with plain SGD through its hand-written gradient (the same numbers as "
              "autograd, about 2.5x faster); --no-fast-mlp uses autograd")
    tensorboard: bool = option(False, "also write TensorBoard event files into RUN/tensorboard "
                                      "(needs the tensorboard extra)")

    def resolved(self) -> TrainConfig:
        """Check every field and fill in the model's defaults; raises UserError on a bad value."""
        for f in fields(self):
            check_value(f.name, getattr(self, f.name))
        if (self.beta1, self.beta2) != ADAM_BETAS and self.optimizer not in ("adam", "adamw"):
            raise UserError(f"beta1, beta2: only adam and adamw use them; give --optimizer adam (or leave them at "
                            f"{ADAM_BETAS[0]} and {ADAM_BETAS[1]})")
        if self.patience and not self.val_split:
            raise UserError("patience: early stopping needs validation; give --val-split N as well")
        # imported here, not at the top: both bring torch, and `digitlab --help` reads this module
        from digitlab.models import checked_structure, default_init, default_lr, default_task
        from digitlab.tasks import get_task

        task = self.task or default_task(self.model)
        structure = checked_structure(self.model, self.structure, get_task(task).outputs)
        if self.reject and not get_task(task).confident:
            raise UserError("reject: a regression model has no answer to flatten; use it with --task classify")
        if self.label_smoothing and not get_task(task).confident:
            raise UserError("label smoothing: a regression model has no labels to smooth; use it with --task "
                            "classify")
        return replace(self, task=task, structure=structure,
                       lr=default_lr(self.model) if self.lr is None else self.lr,
                       init=self.init or default_init(self.model))

    @property
    def label(self) -> str:
        """The model and what its structure changes, in a few words: 'mlp', 'mlp hidden=100 activation=relu'."""
        from digitlab.models import knobs
        from digitlab.structures import structure_label

        return structure_label(self.model, self.structure, knobs(self.model))

    def recipe(self) -> str:
        """The recipe in one line, as a run announces it: 'lenet5 (classify): 3 epochs, adam lr 0.01, ...'."""
        parts = [f"{self.epochs} epoch{'s' * (self.epochs != 1)}", f"{self.optimizer} lr {self.lr:g}",
                 f"batch {self.batch_size}"]
        parts += [f"betas {self.beta1:g}, {self.beta2:g}"] * ((self.beta1, self.beta2) != ADAM_BETAS)
        parts += [f"{self.schedule} schedule"] * (self.schedule != "none")
        parts += ["augmented"] * self.augment + ["with non-digits"] * self.reject
        parts += [f"label smoothing {self.label_smoothing:g}"] * bool(self.label_smoothing)
        parts += ["bf16 autocast"] * (self.precision == "bf16")
        parts += [f"validating on {self.val_split:,}"] * bool(self.val_split)
        parts += [f"{self.max_batches} batches an epoch"] * bool(self.max_batches)
        return f"{self.label} ({self.task}): {', '.join(parts)}, seed {self.seed}"


FIELDS = {f.name: f for f in fields(TrainConfig)}


def unknown_option(key: str) -> str:
    """'unknown option 'lrr'; did you mean 'lr'?', or the options listed where no name is close."""
    shown = one_line(str(key))
    shown = shown if len(shown) <= 40 else f"{shown[:40]}..."
    return f"unknown option '{shown}'" + (nearest(key, FIELDS) or f"; the options are: {', '.join(FIELDS)}")


def check_value(name: str, value: Any) -> Any:
    """Raise UserError ('epochs: must be 1 or more, got 0') unless `value` suits field `name`; returns it."""
    wrong = problem(name, value, TrainConfig)
    if wrong:
        raise UserError(f"{name}: {wrong}")
    return value


# ---------------------------------------------------------------------------- presets

# Named recipes; explicit options override them. Accuracy and wall time of each are
# measured by benchmarks/accuracy.py and benchmarks/time_to_99.py (see the README).
VAL_SPLIT = 5_000  # the classification presets validate on 5,000 of the 60,000 training images
PRESETS: dict[str, dict] = {
    "chapter": {},
    # 99% as soon as possible: tuomaso/train_mnist_fast's recipe (the fastest published one) with its
    # convolutions narrowed to 12 and 24 channels and label smoothing, one epoch of every training image, no
    # augmentation (so it reads handwriting less well than fast). benchmarks/time_to_99.py runs it beside
    # the peer itself; docs/speed.md has the figures.
    "sprint": dict(model="layers", task="classify", epochs=1, batch_size=256, optimizer="adam", lr=0.01,
                   beta1=0.7, beta2=0.9, schedule="onecycle", label_smoothing=0.1, val_split=0, init="torch",
                   structure={"layers": [
                       {"type": "conv", "channels": 12, "kernel": 5, "padding": 0}, "maxpool", "relu",
                       {"type": "conv", "channels": 24, "kernel": 3, "padding": 0}, "maxpool", "relu",
                       "flatten", {"type": "linear", "size": 256}, "relu"]}),
    "fast": dict(model="convnet_small", task="classify", epochs=2, batch_size=128, optimizer="adam",
                 lr=0.01, schedule="onecycle", augment=True, val_split=VAL_SPLIT),
    "best": dict(model="convnet", task="classify", epochs=20, batch_size=128, optimizer="adamw",
                 lr=0.003, weight_decay=0.05, schedule="onecycle", augment=True, val_split=VAL_SPLIT),
}


def preset_config(name: str, model: str | None = None, **overrides) -> TrainConfig:
    """A preset's config, with `overrides` (only the options a user set) on top."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if model and model != preset.get("model"):  # a preset's structure belongs to its own model
        preset = {k: v for k, v in preset.items() if k != "structure"}
    values = {**preset, **({"model": model} if model else {}), **overrides}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(unknown_option(unknown[0]))
    return TrainConfig(**values).resolved()


# ---------------------------------------------------------------------------- files

MAX_TOML = 1_000_000  # bytes: the largest config file or sweep spec read


def read_toml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A TOML file's table; a missing, unreadable or malformed file is one UserError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    name = one_line(str(path))
    try:
        size = regular_file(path, what).stat().st_size
        if size > MAX_TOML:  # a config or a spec is a few lines: a huge one is a mistake, or a bomb
            raise UserError(f"{name}: the {what} is {size / 1e6:,.1f} MB; one is at most {MAX_TOML // 1_000_000} MB")
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is fine
        return tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: cannot read the {what} ({one_line(str(e))[:200]})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{name}: not valid TOML ({one_line(str(e))[:200]})") from None
    except RecursionError:
        raise UserError(f"{name}: the {what} nests tables or lists too deeply to be a {what}") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in a TOML file, checked key by key (an unknown key or a bad value names the key)."""
    path = Path(path)
    table = read_toml(path)
    for key, value in table.items():
        if key not in FIELDS:
            raise UserError(f"{one_line(str(path))}: {unknown_option(key)}")
        wrong = problem(key, value, TrainConfig)
        if wrong:
            raise UserError(f"{one_line(str(path))}: {key}: {wrong}")
    return table


def config_toml(config: TrainConfig) -> str:
    """The config as TOML, one `name = value` line per field; None (TOML has no null) is left out."""
    import tomli_w

    values = {k: v for k, v in asdict(config).items() if v is not None}
    return "# digitlab training options; `digitlab train --config THIS_FILE` runs them again\n" + tomli_w.dumps(values)

