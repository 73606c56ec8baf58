"""`digitlab sweep`."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from digitlab.cli.options import load_data, rich_console
from digitlab.errors import UserError

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def cmd_sweep(args: argparse.Namespace, stop: StopRequest) -> int:
    import importlib.util

    from digitlab.studies.sweep import read_spec, report, run_sweep, run_workers

    if importlib.util.find_spec("optuna") is None:
        raise UserError("sweep needs the sweep extra (optuna): pip install 'digitlab[sweep]'")
    if args.report is not None:
        report(args.report, storage=args.storage, study=args.study, console=rich_console())
        return 0
    if args.spec is None:
        raise UserError("sweep needs a SPEC.toml to run trials (or --report OUT to report on a study)")
    spec = read_spec(args.spec)
    if args.workers > 1:
        study = run_workers(args, spec)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        data = load_data(args.data_dir)
        study = run_sweep(spec, data, args.out, trials=args.trials, storage=args.storage, study=args.study,
                          sampler=args.sampler, seed=args.seed, grace=args.grace, worker=args.worker, stop=stop,
                          bar=args.threads is None)
    done = [t for t in study.trials if t.value is not None]
    if done:
        best = max(done, key=lambda t: t.value)
        print(f"best of {len(done)} finished trials: trial {best.number} ({', '.join(f'{k}={v}' for k, v in best.params.items())}), "
              f"validation {best.value:.2%}, test {best.user_attrs.get('test_accuracy', float('nan')):.2%}")
    print(f"wrote {args.out / 'trials.csv'}")
    return 0
