"""`digitlab summary` and `digitlab plot`: a model's layer table, and figures of runs.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.options import ModelNames, rich_console, save_plot
from digitlab.config import TASKS

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def add_summary_parser(commands) -> None:
    p = commands.add_parser("summary", help="print a model's layer table, as the chapter's paddle.summary")
    p.add_argument("model", choices=ModelNames(), metavar="MODEL", help="one of: %(choices)s")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="regress: 1 output; classify: 10 outputs (default: the model's, regress for mlp and cnn)")
    p.set_defaults(func=cmd_summary)


def add_plot_parser(commands) -> None:
    p = commands.add_parser("plot", help="draw a loss curve, a two-run comparison, or the sigmoid")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    k = kinds.add_parser("loss", help="one run's loss curve")
    k.add_argument("run", type=Path, metavar="RUN", help="a run folder (or its history.json)")
    k.add_argument("--out", type=Path, default=None,
                   help="file name without extension; writes .png and .svg (default: RUN/loss)")
    k.set_defaults(func=cmd_plot_loss)
    k = kinds.add_parser("compare", help="two runs' losses in the chapter's style")
    k.add_argument("runs", type=Path, nargs=2, metavar="RUN", help="two run folders (or history.json files)")
    k.add_argument("--out", type=Path, default=Path("runs/plots/compare"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_compare)
    k = kinds.add_parser("sigmoid", help="the chapter's sigmoid curve")
    k.add_argument("--out", type=Path, default=Path("runs/plots/sigmoid"),
                   help="file name without extension; writes .png and .svg (default: %(default)s)")
    k.set_defaults(func=cmd_plot_sigmoid)


def cmd_summary(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.models import create_model, default_task
    from digitlab.studies.model_summary import summary
    from digitlab.tasks import get_task

    task = get_task(args.task or default_task(args.model))
    summary(create_model(args.model, num_outputs=task.outputs), console=rich_console())
    return 0


def cmd_plot_loss(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_run_loss
    from digitlab.training.state import history_from, read_history

    history = read_history(args.run)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    save_plot(plot_run_loss(history_from(history, args.run), title=str(history.get("model"))),
          args.out or run_dir / "loss")
    return 0


def cmd_plot_compare(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_compare
    from digitlab.training.state import history_from, read_history

    histories = [read_history(run) for run in args.runs]
    losses = tuple(history_from(h, run).loss_list for h, run in zip(histories, args.runs))
    every = tuple(h["config"].get("log_every") if isinstance(h.get("config"), dict) else None for h in histories)
    save_plot(plot_compare(tuple(str(h.get("model")) for h in histories), losses, every), args.out)
    return 0


def cmd_plot_sigmoid(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_sigmoid

    save_plot(plot_sigmoid(), args.out)
    return 0
