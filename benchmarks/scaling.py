"""How cost grows: epoch time against training-set size, and against batch size.

The model is the chapter's cnn as a classifier (10 outputs, cross-entropy, Adam lr 0.001),
one epoch per measurement, on the first N training images (sizes) or the full set
(batch sizes). The batch-size table also gives the test accuracy after that one epoch.

    python benchmarks/scaling.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from common import quiet_run
from digitlab.config import TrainConfig
from digitlab.data import read_folder

SIZES = (5_000, 15_000, 30_000, 60_000)
BATCH_SIZES = (32, 64, 128, 256, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    args = parser.parse_args()
    full = read_folder(args.data_dir)
    config = TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.001, epochs=1)

    print("| training images | epoch (s) | s per 10k images | images/s |\n|---:|---:|---:|---:|")
    for n in SIZES:
        subset = replace(full, train_images=full.train_images[:n], train_labels=full.train_labels[:n])
        h = quiet_run(config, subset).history
        print(f"| {n:,} | {h.seconds:.1f} | {h.seconds / n * 10_000:.2f} | {h.images_per_second:,.0f} |", flush=True)

    print("\n| batch size | epoch (s) | images/s | test accuracy after 1 epoch |\n|---:|---:|---:|---:|")
    for batch_size in BATCH_SIZES:
        result = quiet_run(replace(config, batch_size=batch_size), full)
        h = result.history
        print(f"| {batch_size} | {h.seconds:.1f} | {h.images_per_second:,.0f} | {result.test_accuracy:.2%} |",
              flush=True)


if __name__ == "__main__":
    main()
