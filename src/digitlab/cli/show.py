"""`digitlab summary` and `digitlab plot`: a model's layer table, and figures of runs."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from digitlab.cli.options import rich_console, save_plot

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


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
    from digitlab.plots import plot_two_losses
    from digitlab.training.state import history_from, read_history

    first, second = (read_history(run) for run in args.runs)
    losses = [history_from(h, run).loss_list for h, run in zip((first, second), args.runs)]
    labels = (f"Train loss1 ({first.get('model')})", f"Train loss2 ({second.get('model')})")
    save_plot(plot_two_losses(*losses, labels=labels), args.out)
    return 0


def cmd_plot_sigmoid(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.plots import plot_sigmoid

    save_plot(plot_sigmoid(), args.out)
    return 0
