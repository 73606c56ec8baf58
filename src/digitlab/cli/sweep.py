"""`digitlab sweep`.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.options import add_data_dir, add_options, load_data, rich_console
from digitlab.config import SweepOptions
from digitlab.errors import UserError

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def add_sweep_parser(commands) -> None:
    p = commands.add_parser("sweep", help="many runs at once on Optuna: which structure and recipe is best for a budget")
    p.add_argument("spec", type=Path, metavar="SPEC.toml", nargs="?",
                   help="[fixed] options every trial shares and [search] options to choose: a list of choices or "
                        "a range { low = ..., high = ..., log = true }, under the names of a run's config.toml")
    p.add_argument("--report", type=Path, default=None, metavar="OUT",
                   help="instead of running trials, report on the study in OUT (or --storage): the best trial, the "
                        "Pareto front and how much each searched option mattered")
    add_options(p, SweepOptions)
    add_data_dir(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, stop: StopRequest) -> int:
    import importlib.util

    from digitlab.studies.spec import read_spec
    from digitlab.studies.sweep import run_sweep, run_workers
    from digitlab.studies.sweep_report import report

    if importlib.util.find_spec("optuna") is None:
        raise UserError("sweep needs the sweep extra (optuna): pip install -e '.[sweep]' in digitlab's folder (or make setup)")
    options = SweepOptions(**{f.name: getattr(args, f.name) for f in fields(SweepOptions)})
    if args.report is not None:
        report(args.report, storage=options.storage, study=options.study, console=rich_console())
        return 0
    if args.spec is None:
        raise UserError("sweep needs a SPEC.toml to run trials (or --report OUT to report on a study)")
    spec = read_spec(args.spec)
    if options.workers > 1:
        study = run_workers(args.spec, spec, options, args.data_dir)
    else:
        if options.threads:  # a worker's share of the cores
            import torch

            torch.set_num_threads(options.threads)
        study = run_sweep(spec, load_data(args.data_dir), options, bar=options.threads is None, stop=stop)
    done = [t for t in study.trials if t.value is not None]
    if done:
        best = max(done, key=lambda t: t.value)
        print(f"best of {len(done)} finished trials: trial {best.number} ({', '.join(f'{k}={v}' for k, v in best.params.items())}), "
              f"validation {best.value:.2%}, test {best.user_attrs.get('test_accuracy', float('nan')):.2%}")
    print(f"wrote {Path(options.out) / 'trials.csv'}")
    return 0
