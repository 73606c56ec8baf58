"""`digitlab sweep`.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.common import load_data, rich_console
from digitlab.errors import UserError
from digitlab.options import SweepOptions, add_options, options_from

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


def add_sweep_parser(commands) -> None:
    p = commands.add_parser("sweep",
                            help="many runs at once on Optuna: which structure and recipe is best for a budget")
    add_options(p, SweepOptions)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, stop: StopRequest) -> int:
    import importlib.util

    from digitlab.studies.spec import check_sampler, connect_timeout, read_spec
    from digitlab.studies.sweep import run_sweep, run_workers
    from digitlab.studies.sweep_report import report
    from digitlab.training.threads import usable_cores

    if importlib.util.find_spec("optuna") is None:
        raise UserError("sweep needs the sweep extra (optuna): pip install -e '.[sweep]' in digitlab's folder "
                        "(or make setup)")
    options = options_from(args, SweepOptions)
    connect_timeout()  # a wrong $DIGITLAB_CONNECT_TIMEOUT: one line before anything is loaded
    if args.report is not None:
        report(args.report, storage=options.storage, study=options.study, console=rich_console())
        return 0
    if args.spec is None:
        raise UserError("sweep needs a SPEC.toml to run trials (or --report OUT to report on a study)")
    spec = read_spec(args.spec)
    check_sampler(options.sampler, spec)  # a grid too big to build, say: before the data are loaded
    cores = usable_cores()
    if options.workers > cores:  # more processes than cores only share them, each with torch and the data
        print(f"digitlab: --workers {options.workers} is more than the {cores} cores here; using {cores}",
              file=sys.stderr)
        options = replace(options, workers=cores)
    if options.workers > 1:
        study = run_workers(spec, options)
    else:
        if options.threads:  # a worker's share of the cores
            import torch

            torch.set_num_threads(options.threads)
        study = run_sweep(spec, load_data(args.data_dir), options, bar=options.threads is None, stop=stop)
    trials = study.trials
    done = [t for t in trials if t.value is not None]
    ended = [t for t in trials if t.state.name in ("PRUNED", "FAIL")]
    if not done and ended and options.threads is None:  # (a worker leaves the verdict to its parent)
        why = next((f"; trial {t.number}: {t.user_attrs['error'][:200]}" for t in ended if "error" in t.user_attrs), "")
        raise UserError(f"no trial of the study finished: {len(ended)} of {len(trials)} pruned or failed{why}; "
                        f"their reasons are in the error column of {Path(options.out) / 'trials.csv'}")
    if done:
        best = max(done, key=lambda t: t.value)
        chosen = ", ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"best of {len(done)} finished trials: trial {best.number} ({chosen}), "
              f"validation {best.value:.2%}, test {best.user_attrs.get('test_accuracy', float('nan')):.2%}")
    print(f"wrote {Path(options.out) / 'trials.csv'}")
    return 0
