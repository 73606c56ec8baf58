"""What the commands share: loading the data and the training config a command line asks for,
reading a MODEL argument, and reporting the files written. Each command's options are declared in
options.py (config.py for training's) and made into arguments by options.add_options."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from digitlab.config import FIELDS, preset_config, read_config_file
from digitlab.errors import UserError
from digitlab.files import one_line, prepare_out_dir


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
