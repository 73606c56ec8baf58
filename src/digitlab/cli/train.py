"""`digitlab train` and `digitlab compare`.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.common import given_options, load_data, read_model, report_files, rich_console, train_config
from digitlab.config import PRESETS, TrainConfig
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.options import (
    MAX_THREADS,
    LaunchOptions,
    ModelNames,
    add_options,
    data_dir_option,
    option,
    options_from,
    out_option,
    overwrite_option,
    threads_option,
)
from digitlab.signals import SIGNALS, Interrupted, cause, stopped_by
from digitlab.structures import folder_name

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


@dataclass
class _RunOptions:
    """How `train` and `compare` get their TrainConfig, and where their runs go."""

    preset: str | None = option(
        None, "a named recipe: chapter (the course's settings), sprint (99%% in the fewest seconds), fast (99%% in "
              "about 10 seconds on a CPU, and reads handwriting), best (the most accurate single model, and the one "
              "to use for your own handwriting); other options override it (default: chapter)",
        choices=tuple(PRESETS), kind=str)
    config: Path | None = option(None, "read training options from a TOML file (the names below with underscores, "
                                       "as in a run's config.toml); options given here override it",
                                 kind=Path, metavar="FILE.toml")
    data_dir: Path | None = data_dir_option()
    overwrite: bool = overwrite_option("the run that --out holds already")
    threads: int | None = threads_option("compute on N threads (default: one per core that other work leaves free; "
                                         "a resumed run keeps its own)")


@dataclass
class TrainOptions(_RunOptions):
    model: str | None = option(None, "one of: %(choices)s; with a structure, mlp:hidden=100:activation=relu; or a "
                                     "TOML file with model and [structure] (default: the preset's, cnn for the "
                                     "chapter)", choices=ModelNames(), kind=str, flag="", nargs="?", metavar="MODEL")
    resume: Path | None = option(None, "continue the run in this folder exactly where it stopped; --epochs N "
                                       "extends a finished run (default: start a new run)", kind=Path, metavar="RUN")
    out: Path | None = out_option("folder for the checkpoint, loss history and plots (default: runs/MODEL, or "
                                  "runs/MODEL-2, -3, ... when that holds a run already)")


@dataclass
class CompareOptions(_RunOptions):
    models: list = option(None, "two or more of: %(choices)s; a variant of one is NAME:KEY=VALUE[:KEY=VALUE...] "
                                "(e.g. mlp:hidden=100 mlp:activation=relu), and a layer list a TOML file (net.toml)",
                          choices=ModelNames(), kind=str, flag="", nargs="+", metavar="MODEL")
    out: Path | None = out_option("folder for the runs, the table and the plot (default: runs/compare, or "
                                  "runs/compare-2, -3, ... when that holds a comparison already)")


def add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train one model with the chapter's loop and save it")
    add_options(p, TrainOptions)
    add_options(p, TrainConfig, unset=True, skip=("model",))  # unset: the preset and --config fill them in
    add_options(p, LaunchOptions)
    p.set_defaults(func=cmd_train)


def add_compare_parser(commands) -> None:
    p = commands.add_parser("compare", help="the chapter's experiment: summarise, train and plot two models or more")
    add_options(p, CompareOptions)
    add_options(p, TrainConfig, unset=True, skip=("model",))
    p.set_defaults(func=cmd_compare)


def cmd_train(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.training import distributed, launch

    if args.nproc is not None and not distributed.launched():
        if args.device == "cuda":  # here, once, rather than in every process
            distributed.check_gpus(args.nproc, f"--nproc {args.nproc}")
        options = options_from(args, LaunchOptions)
        return launch.launch(launch.worker_argv(args.argv), options)
    if args.nnodes > 1 or args.rdzv_endpoint:
        raise UserError("--nnodes and --rdzv-endpoint go with --nproc N (or use torchrun's own options)")
    if distributed.launched_rank() == 0:
        try:
            return _train(args, stop, speaks=True)
        except KeyboardInterrupt as e:  # the launcher's SIGTERM after a death, wherever it lands (in a handler,
            if _stopped_for_a_death(e):  # or while the process group is torn down): the launcher says which
                return ExitCode.LOST
            raise
    # rank 0 alone speaks: its log lines, and the errors every rank meets alike; the others stay quiet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _train(args, stop, speaks=False)
        except UserError:
            _let_rank_0_speak()
            return ExitCode.USAGE
        except (KeyboardInterrupt, Exception) as e:
            signal_name = stopped_by(e)
            if signal_name is None:
                raise
            return ExitCode[signal_name]


SPEAK_WAIT = 5.0  # seconds that a silent process waits, after an error every process meets, for rank 0 to say it


def _let_rank_0_speak(most: float = SPEAK_WAIT) -> None:
    """A process other than rank 0 met an error that rank 0 meets too and says (a --batch-size that does
    not split, data that `everywhere` found missing): it waits until the launcher stops it, once rank 0
    has exited, or `most` seconds. Exiting at once, on a busy machine, had the launcher stop rank 0
    before rank 0 reached the error: the user read "interrupted (SIGTERM)" instead of what was wrong."""
    try:
        time.sleep(most)
    except KeyboardInterrupt:  # the launcher's stop (SIGTERM): rank 0 has had its say
        pass


def _train(args: argparse.Namespace, stop: StopRequest, speaks: bool) -> int:
    """One training process: alone, or one of several that torchrun (or --nproc) started."""
    from digitlab.training import distributed, launch
    from digitlab.training.run import run

    say = print if speaks else _silent
    config, out = _config_and_folder(args)
    _threads(args, out, say)
    world = distributed.SINGLE
    try:
        if distributed.launched():
            world = distributed.start(config.device if config else args.device or "auto")
            config = distributed.from_main(world, config)
        data = distributed.everywhere(world, lambda: load_data(args.data_dir, say=say, quiet=not speaks))
        result = run(config, data, out, resume=args.resume is not None, overwrite=args.overwrite, stop=stop,
                     world=world)
        distributed.together(world)  # none tears its connections down while another still uses them
    except Exception as e:
        # a collective that fails, or fails once the launcher has signalled this process to stop (a peer
        # died: the failure can read "Interrupted system call"), means the others are gone
        if not (world.distributed and (distributed.lost(e) or stop.requested)):
            raise
        if os.environ.get(launch.LAUNCHER):  # `--nproc` tells which process died, once
            return ExitCode.LOST
        raise UserError(f"lost contact with the other training processes ({one_line(str(e))[:120]}); the last "
                        f"saved state in '{out}' is resumable with --resume") from None
    except KeyboardInterrupt as e:  # a signal outside a step: from the user, or from `--nproc` after a death
        if world.distributed and _stopped_for_a_death(e):
            return ExitCode.LOST  # the launcher stopped us because another process died: it says which, once
        finished = getattr(cause(e), "finished_in", None)
        if finished is not None:
            saved = f"digitlab train --resume {one_line(str(finished))}"
            raise Interrupted(stopped_by(e) or "SIGINT",
                              f"the training had finished and is saved; {saved} writes its results") from None
        raise
    finally:
        distributed.stop()
    if world.main and not result.state.interrupted:
        _report(result, data, say)
    return stopped_exit(result.state.stopped, say, result.state, out)


def _stopped_for_a_death(e: BaseException) -> bool:
    """Whether `--nproc`'s launcher sent this SIGTERM because another of its processes died."""
    from digitlab.training import distributed, launch

    return bool(os.environ.get(launch.LAUNCHER)) and stopped_by(e) == "SIGTERM" and distributed.sibling_gone()


def _threads(args: argparse.Namespace, out, say) -> None:
    """Compute on --threads, a resumed run's own count, or one thread per core that is not busy."""
    from digitlab.training import distributed, threads
    from digitlab.training.run_folder import read_state

    if distributed.launched():  # torchrun and --nproc share the cores out (OMP_NUM_THREADS)
        return
    saved = read_state(out, tensors=False)[0].get("threads") if getattr(args, "resume", None) is not None else None
    valid = type(saved) is int and 1 <= saved <= MAX_THREADS  # else run() refuses the state in one line
    count, note = threads.choose(args.threads, saved if valid else None)
    threads.apply(count)
    if note:
        say(f"digitlab: {note}", file=sys.stderr)


def _config_and_folder(args: argparse.Namespace):
    """The run's config and folder: a new run's from the preset, file and options, or the saved run's."""
    from digitlab.training import distributed
    from digitlab.training.run_folder import fresh_run_dir, resume_config

    if args.resume is None:
        config, label = train_config(args.model, args)
        return config, args.out or fresh_run_dir(Path("runs") / folder_name(label))
    if args.preset or args.config or args.out or args.overwrite:
        raise UserError("--resume continues a run as it was configured; drop --preset, --config, --out "
                        "and --overwrite")
    # the run folder is rank 0's (the other machines need no copy): it sends the others the config
    model = read_model(args.model)[0] if args.model else None
    config = resume_config(args.resume, given_options(args, model)) if distributed.launched_rank() == 0 else None
    return config, args.resume


def _report(result, data, say) -> None:
    """What a finished (or stopped) run tells its user: speed, loss, accuracy, calibration, files."""
    from digitlab.evaluate import SAMPLE_WORDS, ece_change

    h, config = result.history, result.config
    if data.is_sample:
        say(f"note: figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures")
    say(f"{config.label}: {h.images:,} images in {h.seconds:.1f} s ({h.images_per_second:,.0f} images/s), "
        f"final loss {h.final_loss if h.final_loss is None else round(h.final_loss, 4)}, test accuracy "
        f"{result.test_accuracy:.2%} ({result.checkpoint.name})")
    c = result.calibration
    if "temperature" in c:
        say(f"confidence: temperature {c['temperature']:.3f} fitted on the validation split; expected calibration "
            f"error on the test set {ece_change(c['test_ece_uncalibrated'], c['test_ece'])}")
    elif c:
        why = ("the validation split is too small or all right to fit a temperature (give --val-split 200 or more)"
               if c.get("calibration") == "skipped" else "calibration needs --val-split")
        say(f"confidence: not calibrated ({why}); expected calibration error on the test set {c['test_ece']:.2%}")
    if result.state.stopped == "patience":
        say(f"stopped early: no better validation accuracy for {config.patience} epochs after epoch "
            f"{result.state.best_epoch}")
    report_files(result.files, say)


def _silent(*_, **__) -> None:
    pass


def stopped_exit(stopped: str | None, say=print, state=None, out=None) -> int:
    """The exit code of a run that ended (or was stopped by a signal: one line saying where, and how to go on)."""
    if stopped in SIGNALS:
        where = f" (epoch {state.epoch}, batch {state.batch})" if state is not None else ""
        again = f" {one_line(str(out))}" if out is not None else ""
        say(f"digitlab: interrupted ({stopped}): stopped after the last complete batch{where}, nothing scored; "
            f"continue with --resume{again}", file=sys.stderr)
        return ExitCode[stopped]
    return 0


def cmd_compare(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.studies.experiment import check_labels, compare
    from digitlab.training.run_folder import fresh_run_dir

    if len(args.models) < 2:
        raise UserError(f"compare needs two models or more, got '{args.models[0]}' alone (digitlab train trains one)")
    configs, labels = zip(*(train_config(name, args) for name in args.models))
    check_labels(list(labels))  # before the data are read
    _threads(args, None, print)
    data = load_data(args.data_dir)
    result = compare(list(configs), data, args.out or fresh_run_dir(Path("runs/compare")), console=rich_console(),
                     overwrite=args.overwrite, stop=stop, labels=list(labels))
    report_files(result.files)
    stopped = [r for r in result.runs if r.state.interrupted]
    return stopped_exit(stopped[0].state.stopped, print, stopped[0].state, stopped[0].out_dir) if stopped else 0
