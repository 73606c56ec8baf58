"""`digitlab summary` and `digitlab plot`: a model's layer table, and figures of runs.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.common import read_model, rich_console, save_plot
from digitlab.config import TrainConfig
from digitlab.errors import UserError
from digitlab.options import ModelNames, add_options, option, out_option

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


@dataclass
class SummaryOptions:
    model: str = option(None, "one of: %(choices)s; with a structure, mlp:hidden=100:activation=relu; or a TOML "
                              "file with model and [structure]", choices=ModelNames(), kind=str, flag="",
                        metavar="MODEL")


@dataclass
class PlotLossOptions:
    run: Path = option(None, "a run folder (or its history.json)", kind=Path, flag="", metavar="RUN")
    out: Path | None = out_option("file name without extension; writes .png and .svg (default: RUN/loss)")


@dataclass
class PlotCompareOptions:
    runs: list = option(None, "two run folders or more (or history.json files)", kind=Path, flag="", nargs="+",
                        metavar="RUN")
    out: Path = out_option("file name without extension; writes .png and .svg", Path("runs/plots/compare"))


@dataclass
class PlotSigmoidOptions:
    out: Path = out_option("file name without extension; writes .png and .svg", Path("runs/plots/sigmoid"))


def add_summary_parser(commands) -> None:
    p = commands.add_parser("summary", help="print a model's layer table, as the chapter's paddle.summary, and "
                                            "its structure's keys")
    add_options(p, SummaryOptions)
    add_options(p, TrainConfig, unset=True, only=("task", "structure"))
    p.set_defaults(func=cmd_summary)


def add_plot_parser(commands) -> None:
    p = commands.add_parser("plot", help="draw a loss curve, a two-run comparison, or the sigmoid")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, help, options, command in (
            ("loss", "one run's loss curve", PlotLossOptions, cmd_plot_loss),
            ("compare", "two runs' losses (or more) in the chapter's style", PlotCompareOptions, cmd_plot_compare),
            ("sigmoid", "the chapter's sigmoid curve", PlotSigmoidOptions, cmd_plot_sigmoid)):
        k = kinds.add_parser(name, help=help)
        add_options(k, options)
        k.set_defaults(func=command)


def cmd_summary(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.models import knobs, model_for
    from digitlab.structures import KNOBS, format_value
    from digitlab.studies.model_summary import summary, training_flops

    name, structure, label = read_model(args.model)
    config = TrainConfig(model=name, task=args.task, structure={**structure, **dict(args.structure or [])}).resolved()
    model = model_for(config)
    console = rich_console()
    summary(model, console=console, title=f"{type(model).__name__}: {label or config.label}")
    console.print(f"Training FLOPs per image (forward and backward): {training_flops(config) / config.batch_size:,.0f}")
    defaults = knobs(name)
    if defaults:
        from rich.table import Table

        table = Table("key", "value", "default", "what it is", title=f"{name}'s structure: change a key with "
                      "--structure KEY=VALUE", title_justify="left")
        for key, value in config.structure.items():
            table.add_row(key, format_value(value), format_value(defaults[key]) if defaults[key] is not None else "-",
                          KNOBS[key].help if key in KNOBS else "")
        console.print(table)
    return 0


def cmd_plot_loss(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_run_loss
    from digitlab.training.run_folder import history_from, history_label, read_history

    history = read_history(args.run)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    save_plot(plot_run_loss(history_from(history, args.run), title=history_label(history)),
          args.out or run_dir / "loss")
    return 0


def cmd_plot_compare(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_compare
    from digitlab.training.run_folder import history_from, history_label, read_history

    if len(args.runs) < 2:
        raise UserError("plot compare needs two runs or more; plot loss RUN draws one")
    histories = [read_history(run) for run in args.runs]
    losses = tuple(history_from(h, run).loss_list for h, run in zip(histories, args.runs))
    every = tuple(h["config"].get("log_every") if isinstance(h.get("config"), dict) else None for h in histories)
    save_plot(plot_compare([history_label(h) for h in histories], losses, every), args.out)
    return 0


def cmd_plot_sigmoid(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_sigmoid

    save_plot(plot_sigmoid(), args.out)
    return 0
