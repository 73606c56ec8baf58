"""The training options, declared once: the config dataclass, its presets and its files.

Every field of `TrainConfig` carries its help text, its choices or bounds, and its
command-line flag. The CLI's options (`train`, `compare`), config files (`--config
FILE.toml`, a run's `config.toml`) and presets all read that one declaration, so a new
option is one edit here. This module imports nothing heavy: `digitlab --help` builds its
options from it without loading torch.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from digitlab.errors import UserError
from digitlab.files import one_line, regular_file

TASKS = ("regress", "classify")  # the names; what each task is lives in tasks.py (which needs torch)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
INITS = ("paddle", "torch")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "onecycle")
CONFIG_FILE = "config.toml"


def _model_names() -> list[str]:
    from digitlab.models import list_models  # imports torch: only when a model name is checked or shown

    return list_models()


def option(default: Any, help: str, *, choices: tuple | Callable[[], list] | None = None,
           minimum: float | None = None, above: float | None = None, maximum: float | None = None,
           kind: type | None = None, flag: str | None = None, metavar: str | None = None, hidden: bool = False):
    """A field of an options dataclass with what the CLI and the config-file reader need to know.

    minimum/above/maximum: the value must be >= minimum, > above, <= maximum (and finite).
    kind: the value's type when the annotation allows None (an int, a float or a str).
    flag: the command-line flag, when it is not the field name with dashes.
    hidden: set by digitlab itself (a worker's command line), not shown in --help.
    A list default makes a repeatable flag (each use adds a value); a dict default a repeatable
    KEY=VALUE flag (each use sets a key); every instance gets its own copy.
    """
    meta = dict(help=help, choices=choices, minimum=minimum, above=above, maximum=maximum, kind=kind, flag=flag,
                metavar=metavar, hidden=hidden)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={**meta, "kind": type(default)})
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in its checkpoint and its config.toml.

    None means "the model's own": lr, task and init default per model (the chapter's
    settings for mlp and cnn).
    """

    model: str = option("cnn", "the network structure", choices=_model_names)
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
        parts += [f"{self.schedule} schedule"] * (self.schedule != "none")
        parts += ["augmented"] * self.augment + ["with non-digits"] * self.reject
        parts += [f"label smoothing {self.label_smoothing:g}"] * bool(self.label_smoothing)
        parts += ["bf16 autocast"] * (self.precision == "bf16")
        parts += [f"validating on {self.val_split:,}"] * bool(self.val_split)
        parts += [f"{self.max_batches} batches an epoch"] * bool(self.max_batches)
        return f"{self.label} ({self.task}): {', '.join(parts)}, seed {self.seed}"


FIELDS = {f.name: f for f in fields(TrainConfig)}


def flag(f: Field) -> str:
    """The command-line flag of an options field: `--batch-size` for batch_size, unless it names its own."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def value_type(name: str, of: type = TrainConfig) -> type:
    """The Python type of a field's value: bool, int, float, str, or list (a repeatable flag)."""
    f = _field(of, name)
    return f.metadata["kind"] or type(f.default)


def _field(of: type, name: str) -> Field:
    return FIELDS[name] if of is TrainConfig else {f.name: f for f in fields(of)}[name]


def short_repr(value: Any, most: int = 60) -> str:
    """repr(value), cut to `most` characters (a value may be a 20 MB string); repr keeps it on one line."""
    text = repr(value[:most + 1] if isinstance(value, str) else value)
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:most]}... ({size:,} characters)" if len(text) > most else text


def problem(name: str, value: Any, of: type = TrainConfig) -> str | None:
    """What is wrong with `value` for field `name` (of TrainConfig, or another options dataclass), in
    a few words, or None if it is fine."""
    f = _field(of, name)
    meta = f.metadata
    if value is None:
        return None if f.default is None else "needs a value"
    kind = value_type(name, of)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (float, int) if kind is float else kind):
        return f"must be {_kind_name(kind)}, got {short_repr(value)}"
    choices = meta["choices"]
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            return f"invalid choice: {short_repr(value)} (choose from {', '.join(allowed)})"
    if isinstance(value, (int, float)):  # kind is int or float (a bool was refused above)
        number = "a number " if kind is float else ""
        finite = isinstance(value, int) or math.isfinite(value)  # isfinite() overflows on a huge int
        shown = value if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        if not finite:  # first: no bound tells what is wrong with nan, and inf passes a lower one
            return f"must be a finite number, got {value}"
        if meta["above"] is not None and not value > meta["above"]:
            return f"must be {number}above {meta['above']:g}, got {shown}"
        if meta["minimum"] is not None and not value >= meta["minimum"]:
            return f"must be {meta['minimum']:g} or more, got {shown}"
        if meta["maximum"] is not None and not value <= meta["maximum"]:
            return f"must be {meta['maximum']:,} or less, got {shown}"
        if kind is int and meta["maximum"] is None and value > 2**63 - 1:
            return f"must be {2**63 - 1:,} or less, got {shown}"
    return None


def check_value(name: str, value: Any) -> Any:
    """Raise UserError ('epochs: must be 1 or more, got 0') unless `value` suits field `name`; returns it."""
    wrong = problem(name, value)
    if wrong:
        raise UserError(f"{name}: {wrong}")
    return value


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a table",
            list: "a list"}[kind]


# ---------------------------------------------------------------------------- sweeps, many processes, serving

SAMPLERS = ("grid", "random", "tpe")


STORAGE_ENV = "DIGITLAB_STORAGE"  # a sweep's database URL, when --storage does not give one


@dataclass
class SweepOptions:
    """How `digitlab sweep` runs its study; the trials' own options are TrainConfig's, from the spec."""

    trials: int = option(10, "trials this command runs", minimum=1, maximum=100_000)
    workers: int = option(1, "processes on this machine, each running its share of the trials with the cores "
                             "divided among them", minimum=1, maximum=256)
    storage: str | None = option(None, "the study's database, shared by every command that joins it, e.g. "
                                       "postgresql://user:password@host/db (default: $DIGITLAB_STORAGE, which keeps "
                                       "a password out of the process list, else sqlite:///OUT/study.db)",
                                 kind=str, metavar="URL")
    study: str = option("digitlab", "the study's name in the storage")
    grace: int = option(60, "a running trial not heard from for this long (its process killed, its machine lost) "
                            "is failed, and a copy of it queued for the next command", minimum=2, maximum=86_400,
                        metavar="SECONDS")
    sampler: str | None = option(None, "grid takes the whole product of the lists; random and tpe draw (default: "
                                       "grid when every searched option is a list, else tpe)",
                                 choices=SAMPLERS, kind=str)
    seed: int = option(0, "random and tpe: the sampler's seed, mixed with the trials the study already holds and "
                          "the worker's index, so that a continued study or a second worker draws new points; give "
                          "each machine its own (a grid runs in one fixed order)", minimum=0)
    out: str = option("runs/sweep", "OUT: trials/ (one run folder per trial), trials.csv, study.db")
    threads: int | None = option(None, "a worker's torch threads", minimum=1, maximum=256, kind=int, hidden=True)
    worker: int = option(0, "which worker this is, for its sampler's seed", minimum=0, maximum=255, hidden=True)

    def storage_url(self) -> str:
        """The study's database: --storage, else $DIGITLAB_STORAGE, else a SQLite file in OUT."""
        return self.storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"


@dataclass
class LaunchOptions:
    """`digitlab train --nproc N`: how many training processes, on how many machines, meeting where."""

    nproc: int | None = option(None, "train on N processes on this machine (DistributedDataParallel, gloo on the CPU, "
                                     "nccl on CUDA), started as torchrun does; --batch-size is the global batch "
                                     "(default: one process)", minimum=1, maximum=256, kind=int, metavar="N")
    nnodes: int = option(1, "with --nproc: M machines train together, each running this same command",
                         minimum=1, maximum=256, metavar="M")
    rdzv_endpoint: str | None = option(None, "with --nnodes: where the machines meet (torchrun's c10d rendezvous), "
                                             "the same on all", kind=str, metavar="HOST:PORT")
    rdzv_timeout: int = option(300, "with --nnodes: how long to wait for the other machines", minimum=2,
                               maximum=86_400, metavar="SECONDS")


THRESHOLD = 0.8  # `predict` and `serve` call an answer below this calibrated confidence "not sure"


@dataclass
class ReadOptions:
    """How `digitlab predict` and `serve` put a model's reading into words."""

    threshold: float = option(THRESHOLD, "a digit read with a (calibrated) confidence below P is 'not sure'",
                              minimum=0, maximum=1, metavar="P")


@dataclass
class ServeOptions(ReadOptions):
    """How `digitlab serve` reads (as predict does), listens, and whom it answers."""

    host: str = option("127.0.0.1", "address to listen on (default: 127.0.0.1, this machine only)")
    port: int = option(8000, "port to listen on", minimum=1, maximum=65_535)
    allow_hosts: list[str] = option([], "also answer requests addressed to NAME (the Host header; repeatable): the "
                                        "server answers only to its --host, localhost and 127.0.0.1, so that no "
                                        "other site's page can reach it", flag="--allow-host", metavar="NAME")
    cors: list[str] = option([], "let pages of ORIGIN (e.g. https://example.org; repeatable) call the API; by "
                                 "default only the server's own page may", metavar="ORIGIN")


def as_argv(options) -> list[str]:
    """The command line that gives an options dataclass these values (fields set to None left out).
    `--flag=value`, so that a value starting with '-' is not taken for a flag."""
    argv = []
    for f in fields(options):
        value = getattr(options, f.name)
        if isinstance(value, bool):
            argv.append(flag(f) if value else "--no-" + flag(f)[2:])
        elif value is not None:
            argv += [f"{flag(f)}={item}" for item in (value if isinstance(value, list) else [value])]
    return argv


# ---------------------------------------------------------------------------- presets

# Named recipes; explicit options override them. Accuracy and wall time of each are
# measured by benchmarks/accuracy.py and benchmarks/time_to_99.py (see the README).
VAL_SPLIT = 5_000  # the classification presets validate on 5,000 of the 60,000 training images
PRESETS: dict[str, dict] = {
    "chapter": {},
    # 99% as soon as possible: a quarter of convnet's FLOPs, large batches, every training image, no
    # augmentation (so it reads handwriting less well than fast: benchmarks/time_to_99.py --hwset)
    "sprint": dict(model="convnet_tiny", task="classify", epochs=2, batch_size=256, optimizer="adam", lr=0.02,
                   schedule="onecycle", val_split=0),
    "fast": dict(model="convnet_small", task="classify", epochs=2, batch_size=128, optimizer="adam",
                 lr=0.01, schedule="onecycle", augment=True, val_split=VAL_SPLIT),
    "best": dict(model="convnet", task="classify", epochs=20, batch_size=128, optimizer="adamw",
                 lr=0.003, weight_decay=0.05, schedule="onecycle", augment=True, val_split=VAL_SPLIT),
}


def preset_config(name: str, model: str | None = None, **overrides) -> TrainConfig:
    """A preset's config, with `overrides` (only the options a user set) on top."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **({"model": model} if model else {}), **overrides}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}'; the options are: {', '.join(FIELDS)}")
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
            raise UserError(f"{one_line(str(path))}: unknown option '{one_line(key)[:60]}'; the options are: "
                            f"{', '.join(FIELDS)}")
        wrong = problem(key, value)
        if wrong:
            raise UserError(f"{one_line(str(path))}: {key}: {wrong}")
    return table


def config_toml(config: TrainConfig) -> str:
    """The config as TOML, one `name = value` line per field; None (TOML has no null) is left out."""
    import tomli_w

    values = {k: v for k, v in asdict(config).items() if v is not None}
    return "# digitlab training options; `digitlab train --config THIS_FILE` runs them again\n" + tomli_w.dumps(values)

