"""Test accuracy of each structure and recipe on the full 10k MNIST test set.

Every row trains from scratch with digitlab's own `run()` (the same code as `digitlab
train`) and scores the model on all 10,000 test images; regression models (the chapter's)
predict the rounded output clipped to 0-9. Two figures per run: the last epoch's weights,
and the checkpoint `digitlab evaluate` and `predict` use (the epoch with the best validation
accuracy when the recipe holds images out; the test set never chooses it). Wall time is
training only. With several seeds, each seed is a line and the median closes the row.

    python benchmarks/accuracy.py --data-dir ../shared/data/mnist [--only cnn-adam best] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace

import torch

from common import cpu_name
from digitlab.checkpoint import WEIGHTS_FILE, load_checkpoint
from digitlab.config import TrainConfig, preset_config
from digitlab.data import read_folder
from digitlab.evaluate import evaluate
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
    "sprint": preset_config("sprint"),
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
    if c.label_smoothing:
        parts.append(f"label smoothing {c.label_smoothing:g}")
    if c.val_split:
        parts.append(f"{c.val_split:,} held out")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each row (default: 0)")
    parser.add_argument("--out", default=None, help="keep each run folder under this folder (default: discard)")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| row | model | task | recipe | epochs | seed | test accuracy, last epoch "
          "| test accuracy, scored checkpoint | training wall time (s) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.only:
        figures = []
        for seed in args.seeds:
            config = replace(ROWS[name], seed=seed).resolved()
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(args.out, f"{name}-{seed}") if args.out else tmp
                result = run(config, data, out, reporter=Reporter())
                last = result.test_accuracy if result.checkpoint.name == WEIGHTS_FILE else evaluate(
                    load_checkpoint(result.checkpoint.with_name(WEIGHTS_FILE))[0], data.test_images,
                    data.test_labels, task=config.task).accuracy  # the run scored its best epoch's weights
            figures.append((last, result.test_accuracy, result.history.seconds))
            print(f"| {name} | {config.model} | {config.task} | {describe(config)} | {config.epochs} | {seed} | "
                  f"{last:.2%} | {result.test_accuracy:.2%} | {result.history.seconds:.0f} |", flush=True)
        if len(args.seeds) > 1:
            last, scored, seconds = (statistics.median(column) for column in zip(*figures))
            print(f"| **{name}**, median of {len(figures)} | | | | | | **{last:.2%}** | **{scored:.2%}** | "
                  f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
