"""One process against two (DistributedDataParallel, gloo) on this machine: throughput and loss agreement.

Each row trains `--batches` batches of 64 (a classifier, the same seed; plain SGD at the model's
chapter learning rate unless the row says Adam) with `digitlab train` on one process (torch
threads: all cores) and with `--nproc 2` (threads: half the cores each), interleaved,
`--repeats` times. Throughput is training images per second as the run records it (start-up
and scoring excluded); the agreement is the largest relative difference between the two runs'
losses over the first 100 steps. convnet_small has BatchNorm, whose statistics are each
process's own half-batch: its losses are not expected to agree. Adam amplifies the rounding
of the half-batch kernels step by step; its row shows by how much.

    python benchmarks/ddp_scaling.py --data-dir ../shared/data/mnist [--batches 300] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_name

ROWS = {  # label: the model and its recipe
    "mlp": ("mlp",),
    "lenet5": ("lenet5",),
    "cnn": ("cnn",),
    "cnn, Adam lr 0.001": ("cnn", "--optimizer", "adam", "--lr", "0.001"),
    "convnet_small": ("convnet_small",),
}


def train(row: tuple[str, ...], out: Path, data_dir: str, batches: int, nproc: int) -> dict:
    cores = os.cpu_count() or 1
    command = [sys.executable, "-m", "digitlab", "train", *row, "--task", "classify", "--epochs", "1",
               "--batches", str(batches), "--data-dir", data_dir, "--out", str(out)]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads((out / "history.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--batches", type=int, default=300, help="training batches per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (default: %(default)s)")
    args = parser.parse_args()
    speed: dict[tuple[str, int], list[float]] = {}
    agreement: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for k, (model, row) in enumerate(ROWS.items()):
                losses = {}
                for nproc in (1, 2) if r % 2 == 0 else (2, 1):  # interleaved, the order alternating
                    h = train(row, Path(tmp) / f"{k}-{nproc}-{r}", args.data_dir, args.batches, nproc)
                    speed.setdefault((model, nproc), []).append(h["images"] / h["seconds"])
                    losses[nproc] = h["batch_loss"][:100]
                    print(f"  repeat {r}, {model}, {nproc} process(es): {h['images'] / h['seconds']:,.0f} images/s",
                          flush=True)
                agreement[model] = max(abs(a - b) / abs(b) for a, b in zip(losses[2], losses[1]))
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; {args.batches} batches of 64, median of {args.repeats}\n")
    print("| model | 1 process (images/s) | 2 processes (images/s) | 2 against 1 | loss agreement, first 100 steps |")
    print("|---|---:|---:|---:|---:|")
    for model in ROWS:
        one, two = (statistics.median(speed[(model, n)]) for n in (1, 2))
        print(f"| {model} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x | {agreement[model]:.1e} |")


if __name__ == "__main__":
    main()
