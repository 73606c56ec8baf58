"""Time to 99% test accuracy on a CPU: `--preset fast` against the course's cnn as a classifier.

Trains the fast preset with several seeds and reports, for each, the training wall time
(evaluation excluded) and the test accuracy on the full 10k test set. The anchor is the
chapter's cnn turned classifier (10 outputs, cross-entropy, Adam lr 0.001, batch 64),
trained one epoch at a time (each `--resume` extends the run by one epoch and scores the
test set once at its end), so the table shows when, if ever, it reaches 99%.

    python benchmarks/time_to_99.py --data-dir ../shared/data/mnist [--seeds 0 1 2] [--anchor-epochs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace

import torch

from common import quiet_run
from digitlab.data import read_folder
from digitlab.config import PRESETS, TrainConfig, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for the fast preset")
    parser.add_argument("--anchor-epochs", type=int, default=3, help="epochs of the chapter's cnn classifier")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"fast preset: {PRESETS['fast']}\n")
    print("| run | epochs | test accuracy | training wall time (s) |\n|---|---:|---:|---:|")
    seconds, accuracies = [], []
    for seed in args.seeds:
        result = quiet_run(preset_config("fast", seed=seed), data)
        seconds.append(result.history.seconds)
        accuracies.append(result.test_accuracy)
        print(f"| digitlab --preset fast, seed {seed} | {result.config.epochs} | {result.test_accuracy:.2%} | "
              f"{result.history.seconds:.1f} |", flush=True)
    print(f"| median of {len(args.seeds)} | | {statistics.median(accuracies):.2%} | {statistics.median(seconds):.1f} |")

    anchor = TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.001, epochs=1)
    with tempfile.TemporaryDirectory() as out:
        for epochs in range(1, args.anchor_epochs + 1):
            result = quiet_run(replace(anchor, epochs=epochs), data, out, resume=epochs > 1)
            print(f"| chapter cnn as a classifier (Adam 0.001, batch 64) | {epochs} | {result.test_accuracy:.2%} | "
                  f"{result.history.seconds:.1f} |", flush=True)
    print("| tuomaso/train_mnist_fast, published (laptop GTX 1660 Ti GPU) | - | 99% | 0.76 |")


if __name__ == "__main__":
    main()
