"""Test accuracy of each structure and recipe on the full 10k MNIST test set.

Every row trains from scratch with digitlab's own `run()` (the same code as `digitlab
train`) and scores the final model on all 10,000 test images; regression models (the
chapter's) predict the rounded output clipped to 0-9. Wall time is training only.

    python benchmarks/accuracy.py --data-dir ../shared/data/mnist [--only cnn-adam best]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from digitlab.data import read_folder
from digitlab.config import TrainConfig, preset_config
from digitlab.training.reporters import Reporter
from digitlab.training.run import run

ROWS = {
    "mlp-chapter": TrainConfig(model="mlp"),
    "cnn-chapter": TrainConfig(model="cnn"),
    "mlp-sgd": TrainConfig(model="mlp", task="classify", optimizer="sgd", lr=0.01, epochs=20),
    "mlp-adam": TrainConfig(model="mlp", task="classify", optimizer="adam", lr=0.003, epochs=20, schedule="onecycle"),
    "cnn-sgd": TrainConfig(model="cnn", task="classify", optimizer="sgd", lr=0.01, epochs=10),
    "cnn-adam": TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.002, epochs=10, schedule="onecycle"),
    "lenet5": TrainConfig(model="lenet5", optimizer="adam", lr=0.002, epochs=10, schedule="onecycle"),
    "fast": preset_config("fast"),
    "best": preset_config("best"),
}


def describe(c: TrainConfig) -> str:
    parts = [f"{c.optimizer} lr {c.lr}", f"batch {c.batch_size}"]
    if c.schedule != "none":
        parts.append(c.schedule)
    if c.weight_decay:
        parts.append(f"wd {c.weight_decay}")
    if c.augment:
        parts.append("augment")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--out", default=None, help="keep each run folder under this folder (default: discard)")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| row | model | task | recipe | epochs | test accuracy | training wall time (s) |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in args.only:
        config = ROWS[name].resolved()
        with tempfile.TemporaryDirectory() as tmp:
            result = run(config, data, os.path.join(args.out, name) if args.out else tmp, reporter=Reporter())
        print(f"| {name} | {config.model} | {config.task} | {describe(config)} | {config.epochs} | "
              f"{result.test_accuracy:.2%} | {result.history.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
