"""Which structure is best for a budget: a real sweep, and sweep throughput with 1 and 2 workers.

1. Throughput (`--speed`): the same small grid (3 models x 2 learning rates, one epoch each)
   run by `digitlab sweep --workers 1` and `--workers 2`, interleaved, each `--repeats` times;
   trials per hour is the trials over the command's whole wall time (start-up, data loading
   and scoring included), as a user sees it.
2. The map (`--map`): `digitlab sweep benchmarks/sweep_models.toml` (40 trials, every
   registered model) with one worker, then its Pareto front and the best trial of each model
   as Markdown tables, and its pareto.png copied to docs/sweep-pareto.png.

    python benchmarks/sweep_models.py --data-dir ../shared/data/mnist [--speed] [--map] [--out runs/bench-sweep]

Both parts run when neither flag is given. Run nothing else meanwhile: timings are shared cores.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name

HERE = Path(__file__).resolve().parent
SPEED_SPEC = """
[fixed]
task = "classify"
optimizer = "adam"
epochs = 1
[search]
model = ["mlp", "lenet5", "convnet_small"]
lr = [0.001, 0.002]
"""
SPEED_TRIALS = 6


def sweep(*args: str) -> float:
    """Run `digitlab sweep ARGS` to the end; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "digitlab", "sweep", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def speed(data_dir: str, repeats: int) -> None:
    print(f"\n## Trials per hour ({SPEED_TRIALS} one-epoch trials: mlp, lenet5, convnet_small x 2 learning rates)\n")
    seconds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "speed.toml"
        spec.write_text(SPEED_SPEC)
        for r in range(repeats):
            for workers in (1, 2):  # interleaved, so that a slow minute hits both
                out = Path(tmp) / f"w{workers}-{r}"
                took = sweep(str(spec), "--trials", str(SPEED_TRIALS), "--workers", str(workers), "--out", str(out),
                             "--data-dir", data_dir)
                seconds[workers].append(took)
                print(f"  workers {workers}, repeat {r}: {took:.1f} s", flush=True)
    print("\n| workers | torch threads each | wall time per sweep (s), median | trials per hour |\n"
          "|---:|---:|---:|---:|")
    for workers, times in seconds.items():
        median = statistics.median(times)
        print(f"| {workers} | {max(1, (os.cpu_count() or 1) // workers)} | {median:.1f} | "
              f"{SPEED_TRIALS * 3600 / median:.0f} |")
    ratio = statistics.median(seconds[1]) / statistics.median(seconds[2])
    print(f"\nW=2 against W=1: {ratio:.2f}x the trials per hour")


def the_map(data_dir: str, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    took = sweep(str(HERE / "sweep_models.toml"), "--trials", "40", "--out", str(out), "--data-dir", data_dir)
    with open(out / "trials.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE"]
    print(f"\n## The map: {len(rows)} trials in {took / 60:.1f} min (one worker)\n")
    from digitlab.plots import pareto_front

    def line(r: dict) -> str:
        return (f"| {r['trial']} | {r['model']} | {r['optimizer']} | {r['lr']} | {r['epochs']} | "
                f"{float(r['test_accuracy']):.2%} | {float(r['train_flops']):.2e} | {float(r['train_seconds']):.1f} | "
                f"{int(r['params']):,} |")

    header = ("| trial | model | optimizer | lr | epochs | test accuracy | training FLOPs | seconds | params |\n"
              "|---:|---|---|---:|---:|---:|---:|---:|---:|")
    front = pareto_front([(float(r["train_flops"]), 1 - float(r["test_accuracy"])) for r in rows])
    print("Pareto front (test error against training FLOPs): no other trial is both cheaper and more accurate\n")
    print(header)
    for i in front:
        print(line(rows[i]))
    print("\nThe best trial of each model (by validation accuracy, as the study ranks them)\n")
    print(header)
    for model in dict.fromkeys(r["model"] for r in rows):
        print(line(max((r for r in rows if r["model"] == model), key=lambda r: float(r["val_accuracy"]))))
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    print(f"\nbest trial: {best['trial']} ({best['model']}, {best['optimizer']} lr {best['lr']}, {best['epochs']} "
          f"epochs): validation {float(best['val_accuracy']):.2%}, test {float(best['test_accuracy']):.2%}")
    docs = HERE.parent / "docs" / "sweep-pareto.png"
    shutil.copyfile(out / "pareto.png", docs)
    print(f"copied {out / 'pareto.png'} to {docs}")
    subprocess.run([sys.executable, "-m", "digitlab", "sweep", "--report", str(out)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--speed", action="store_true", help="only the throughput part")
    parser.add_argument("--map", action="store_true", help="only the 40-trial sweep")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each worker count (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sweep"), help="the map's sweep folder")
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    both = not (args.speed or args.map)
    if args.speed or both:
        speed(args.data_dir, args.repeats)
    if args.map or both:
        the_map(args.data_dir, args.out)


if __name__ == "__main__":
    main()
