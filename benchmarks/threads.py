"""Threads on a busy machine: the fast recipe's steps on 1 thread and on one per core, with the
machine quiet and with other processes keeping cores busy, and what a run chooses by itself
(`training/threads.choose`). The README's "threads" table.

Each cell is the median of `--repeats` runs of `--batches` steps, interleaved (quiet, busy,
1 thread, all threads, in turn), so a slow minute of a shared machine falls on every cell alike.

    python benchmarks/threads.py --data-dir ../shared/data/mnist [--batches 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from common import cpu_name, quiet_run
from digitlab.config import preset_config
from digitlab.data import read_folder
from digitlab.training import threads


def burners(count: int) -> list[subprocess.Popen]:
    """`count` processes that keep a core busy each, as other work on a shared machine does."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--batches", type=int, default=60, help="steps per measurement (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (default: %(default)s)")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    cores = threads.usable_cores()
    config = preset_config("fast", epochs=1, max_batches=args.batches, val_split=0)
    counts = sorted({1, cores})
    busy_levels = {"quiet": 0, f"{max(1, cores - 1)} other busy process(es)": max(1, cores - 1),
                   f"{cores} other busy processes": cores}
    seconds: dict[tuple[str, int], list[float]] = {}
    chosen: dict[str, list[int]] = {}
    quiet_run(config, data)  # the first run pays for imports and allocations
    for _ in range(args.repeats):
        for level, busy in busy_levels.items():
            others = burners(busy)
            try:
                time.sleep(1.0 if busy else 0)  # the load average and the scheduler see them
                chosen.setdefault(level, []).append(threads.choose()[0])
                for count in counts:
                    torch.set_num_threads(count)
                    seconds.setdefault((level, count), []).append(quiet_run(config, data).history.seconds)
            finally:
                for process in others:
                    process.kill()
                    process.wait()
    images = args.batches * config.batch_size
    print(f"{cpu_name()}, {cores} cores, torch {torch.__version__}; the fast recipe, {args.batches} steps of "
          f"{config.batch_size}, median of {args.repeats}, interleaved\n")
    print("| machine | " + " | ".join(f"{c} thread{'s' * (c > 1)}: images/s" for c in counts)
          + " | a run chooses |\n|---|" + "---:|" * (len(counts) + 1))
    for level in busy_levels:
        cells = [f"{images / statistics.median(seconds[level, c]):,.0f}" for c in counts]
        print(f"| {level} | " + " | ".join(cells) + f" | {statistics.median(chosen[level])} |")


if __name__ == "__main__":
    main()
