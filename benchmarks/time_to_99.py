"""Time to 99% test accuracy on a CPU: `--preset sprint` and `--preset fast` against the course's
cnn as a classifier. The README's time-to-99 table.

Trains each preset with several seeds (every seed counted) and reports, for each, the test
accuracy on the full 10k test set, the training wall time (evaluation excluded), and with
`--hwset DIR` (benchmarks/handwriting_set.py) the share of the handwriting measuring set's
single digits it misreads. The anchor is the chapter's cnn turned classifier (10 outputs,
cross-entropy, Adam lr 0.001, batch 64), trained one epoch at a time (each `--resume`
extends the run by one epoch and scores the test set once at its end), so the table shows
when, if ever, it reaches 99%. Runs compute on as many threads as a `digitlab train` would
choose now (training/threads.py); the header says how many.

    python benchmarks/time_to_99.py --data-dir ../shared/data/mnist [--hwset /tmp/hwset] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from common import cpu_name, quiet_run
from digitlab.config import PRESETS, TrainConfig, preset_config
from digitlab.data import read_folder
from digitlab.training import threads


def misread(run: Path, hwset: Path) -> float:
    """The share of the measuring set's single digits read wrong (benchmarks/handwriting.py's measure)."""
    from handwriting import rows

    from digitlab.checkpoint import load_checkpoint
    from digitlab.reading.predict import predict_files

    model, meta = load_checkpoint(run)
    digits = rows(hwset / "digits")
    said = predict_files(model, meta, [hwset / "digits" / r["file"] for r in digits])
    return sum(p.error is not None or p.text != r["label"] for p, r in zip(said, digits)) / len(digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--presets", nargs="+", default=["sprint", "fast"],
                        choices=[p for p in PRESETS if p != "chapter"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for each preset")
    parser.add_argument("--hwset", type=Path, help="the handwriting measuring set (benchmarks/handwriting_set.py)")
    parser.add_argument("--anchor-epochs", type=int, default=3, help="epochs of the chapter's cnn classifier")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    count, _ = threads.choose()
    threads.apply(count)
    print(f"{cpu_name()}, {threads.usable_cores()} cores, {count} torch threads, torch {torch.__version__}\n")
    for name in args.presets:
        print(f"- {name}: {PRESETS[name]}")
    print("\n| run | epochs | test accuracy | training wall time (s) | handwriting digits misread |\n"
          "|---|---:|---:|---:|---:|")
    for name in args.presets:
        seconds, accuracies, errors = [], [], []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as out:
                result = quiet_run(preset_config(name, seed=seed), data, Path(out) / "run")
                error = misread(Path(out) / "run", args.hwset) if args.hwset else None
            seconds.append(result.history.seconds)
            accuracies.append(result.test_accuracy)
            errors += [error] if error is not None else []
            shown = f"{error:.1%}" if error is not None else "-"
            print(f"| digitlab --preset {name}, seed {seed} | {result.config.epochs} | {result.test_accuracy:.2%} | "
                  f"{result.history.seconds:.1f} | {shown} |", flush=True)
        median_error = f"{statistics.median(errors):.1%}" if errors else "-"
        print(f"| {name}: median of {len(args.seeds)} (lowest accuracy {min(accuracies):.2%}) | | "
              f"{statistics.median(accuracies):.2%} | {statistics.median(seconds):.1f} | {median_error} |", flush=True)

    anchor = TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.001, epochs=1)
    with tempfile.TemporaryDirectory() as out:
        for epochs in range(1, args.anchor_epochs + 1):
            result = quiet_run(replace(anchor, epochs=epochs), data, out, resume=epochs > 1)
            print(f"| chapter cnn as a classifier (Adam 0.001, batch 64) | {epochs} | {result.test_accuracy:.2%} | "
                  f"{result.history.seconds:.1f} | - |", flush=True)
    print("| tuomaso/train_mnist_fast, published (laptop GTX 1660 Ti GPU) | 1 | 99% | 0.76 | - |")


if __name__ == "__main__":
    main()
