"""`digitlab train` and `digitlab compare`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.options import (
    given_options,
    load_data,
    report_files,
    rich_console,
    train_config,
)
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.stop import SIGNALS

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def cmd_train(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.reading.evaluate import SAMPLE_WORDS
    from digitlab.training import distributed, launch
    from digitlab.training.folder import fresh_run_dir
    from digitlab.training.resume import resume_config
    from digitlab.training.run import run

    if args.nproc is not None and not distributed.launched():
        if args.device == "cuda":  # here, once, rather than in every process
            distributed.check_gpus(args.nproc, f"--nproc {args.nproc}")
        return launch.launch(launch.worker_argv(args.argv), args.nproc, args.nnodes, args.rdzv_endpoint,
                                  args.rdzv_timeout)
    if args.nnodes > 1 or args.rdzv_endpoint:
        raise UserError("--nnodes and --rdzv-endpoint go with --nproc N (or use torchrun's own options)")
    if distributed.launched():
        distributed.quiet()  # rank 0 alone prints: its log lines, and the errors every rank meets alike
    if args.resume is not None:
        if args.preset or args.config or args.out or args.overwrite:
            raise UserError("--resume continues a run as it was configured; drop --preset, --config, --out "
                            "and --overwrite")
        out = args.resume
        # the run folder is rank 0's (the other machines need no copy): it sends the others the config
        config = resume_config(out, given_options(args, args.model)) if distributed.launched_rank() == 0 else None
    else:
        config = train_config(args.model, args)
        out = args.out or fresh_run_dir(Path("runs") / config.model)
    world = distributed.SINGLE
    try:
        if distributed.launched():
            world = distributed.start(config.device if config else args.device or "auto")
            config = distributed.from_main(world, config)
        data = distributed.everywhere(world, lambda: load_data(args.data_dir))
        result = run(config, data, out, resume=args.resume is not None, overwrite=args.overwrite, stop=stop)
    except Exception as e:
        # a collective that fails, or fails once the launcher has signalled this process to stop (a peer
        # died: the failure can read "Interrupted system call"), means the others are gone
        if not (world.distributed and (distributed.lost(e) or stop.requested)):
            raise
        if os.environ.get(launch.LAUNCHER):  # `--nproc` tells which process died, once
            return ExitCode.LOST
        raise UserError(f"lost contact with the other training processes ({one_line(str(e))[:120]}); the last "
                        f"saved state in '{out}' is resumable with --resume") from None
    finally:
        distributed.stop()
    if not world.main:
        return stopped_exit(result.state.stopped)
    h = result.history
    if data.is_sample:
        print(f"note: figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures")
    print(f"{config.model}: {h.images:,} images in {h.seconds:.1f} s ({h.images_per_second:,.0f} images/s), "
          f"final loss {h.final_loss if h.final_loss is None else round(h.final_loss, 4)}, test accuracy {result.test_accuracy:.2%} ({result.checkpoint.name})")
    c = result.calibration
    if "temperature" in c:
        print(f"confidence: temperature {c['temperature']:.3f} fitted on the validation split; expected calibration "
              f"error on the test set {c['test_ece_uncalibrated']:.2%} before, {c['test_ece']:.2%} after")
    elif c:
        why = ("the validation split is too small or all right to fit a temperature (give --val-split 200 or more)"
               if c.get("calibration") == "skipped" else "calibration needs --val-split")
        print(f"confidence: not calibrated ({why}); expected calibration error on the test set {c['test_ece']:.2%}")
    if result.state.stopped == "patience":
        print(f"stopped early: no better validation accuracy for {config.patience} epochs after epoch "
              f"{result.state.best_epoch}")
    report_files(result.files)
    return stopped_exit(result.state.stopped)


def stopped_exit(stopped: str | None) -> int:
    if stopped in SIGNALS:
        print(f"digitlab: interrupted ({stopped}): saved the state after the last complete batch; "
              "continue with --resume", file=sys.stderr)
        return ExitCode[stopped]
    return 0


def cmd_compare(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.studies.experiment import compare
    from digitlab.training.folder import fresh_run_dir

    if args.models[0] == args.models[1]:
        raise UserError(f"compare needs two different models, got '{args.models[0]}' twice")
    configs = [train_config(name, args) for name in args.models]
    data = load_data(args.data_dir)
    result = compare(configs, data, args.out or fresh_run_dir(Path("runs/compare")), console=rich_console(),
                     overwrite=args.overwrite, stop=stop)
    report_files(result.files)
    stopped = [r.state.stopped for r in result.runs if r.state.interrupted]
    return stopped_exit(stopped[0] if stopped else None)
