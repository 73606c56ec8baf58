"""Time to 99% test accuracy on a CPU, against the fastest published MNIST recipe, run beside us.

The peer is tuomaso/train_mnist_fast (benchmarks/contenders/train_mnist_fast.py, written from its
published recipe), run as its own process with PyTorch's own thread count, as a user would run
it. Beside it, in the same rounds: digitlab's presets, and the peer's recipe as a digitlab config
(benchmarks/configs/train_mnist_fast.toml: the same network and recipe on digitlab's loop, data
path and layout), each on the threads `digitlab train` would choose now (training/threads.py).
Runs are interleaved: each round runs every contender once with one seed, in turn, so a host
that slows down mid-way slows every contender alike.

For each run: the test accuracy on the full 10k test set, the training wall time (data loading and
evaluation excluded, for every contender alike), its ratio to the peer's median time, and with
`--hwset DIR` (benchmarks/handwriting_set.py) the share of the handwriting measuring set's single
digits it misreads (digitlab's runs; the peer saves no model).

    python benchmarks/time_to_99.py --data-dir ../shared/data/mnist [--hwset /tmp/hwset] [--seeds 0 1 2 3 4]
    python benchmarks/time_to_99.py --data-dir ../shared/data/mnist --busy 1    # one core kept busy meanwhile
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import cpu_name, quiet_run
from digitlab.config import PRESETS, TrainConfig, preset_config, read_config_file
from digitlab.data import read_folder
from digitlab.training import threads

HERE = Path(__file__).resolve().parent
PEER = "tuomaso/train_mnist_fast"
PEER_CONFIG = HERE / "configs" / "train_mnist_fast.toml"


def misread(run: Path, hwset: Path) -> float:
    """The share of the measuring set's single digits read wrong (benchmarks/handwriting.py's measure)."""
    from handwriting import rows

    from digitlab.checkpoint import load_checkpoint
    from digitlab.reading.predict import predict_files

    model, meta = load_checkpoint(run)
    digits = rows(hwset / "digits")
    said = predict_files(model, meta, [hwset / "digits" / r["file"] for r in digits])
    return sum(p.error is not None or p.text != r["label"] for p, r in zip(said, digits)) / len(digits)


def run_peer(data_dir: str, seed: int) -> dict:
    """The peer's own script, in its own process: {"seconds", "accuracy", "threads"}."""
    out = subprocess.run([sys.executable, str(HERE / "contenders" / "train_mnist_fast.py"), "--data-dir", data_dir,
                          "--seed", str(seed)], capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_digitlab(config: TrainConfig, data, hwset: Path | None) -> dict:
    """One digitlab run on the threads a `digitlab train` would choose now."""
    count, _ = threads.choose()
    threads.apply(count)
    with tempfile.TemporaryDirectory() as out:
        result = quiet_run(config, data, Path(out) / "run")
        error = misread(Path(out) / "run", hwset) if hwset else None
    return {"seconds": result.history.seconds, "accuracy": result.test_accuracy, "threads": count,
            "misread": error, "epochs": config.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--presets", nargs="+", default=["sprint", "fast"],
                        choices=[p for p in PRESETS if p != "chapter"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one round per seed")
    parser.add_argument("--hwset", type=Path, help="the handwriting measuring set (benchmarks/handwriting_set.py)")
    parser.add_argument("--no-peer-config", action="store_true", help="leave out the peer's recipe on digitlab")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="keep N cores busy with other processes the whole time (a machine in use)")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        measure(args, data)
    finally:
        for spinner in spinners:
            spinner.kill()


def measure(args, data) -> None:
    busy = f", {args.busy} of them kept busy by other processes" if args.busy else ""
    print(f"{cpu_name()}, {threads.usable_cores()} cores{busy}, torch {torch.__version__}; peer: {PEER}, PyTorch's "
          "own thread count; digitlab: the threads `digitlab train` chooses\n")
    contenders: dict[str, object] = {PEER: None}
    contenders.update({f"digitlab --preset {name}": name for name in args.presets})
    if not args.no_peer_config:
        contenders[f"{PEER}'s recipe on digitlab"] = read_config_file(PEER_CONFIG)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    print("| run | seed | threads | epochs | test accuracy | training wall time (s) | x the peer's time "
          "(this round) | handwriting digits misread |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        for name, what in contenders.items():
            if what is None:
                run = {**run_peer(args.data_dir, seed), "misread": None, "epochs": 1}
            elif isinstance(what, str):
                run = run_digitlab(preset_config(what, seed=seed), data, args.hwset)
            else:
                run = run_digitlab(preset_config("chapter", **{**what, "seed": seed}), data, args.hwset)
            runs[name].append(run)
            ratio = run["seconds"] / runs[PEER][-1]["seconds"]
            shown = "-" if run["misread"] is None else f"{run['misread']:.1%}"
            print(f"| {name} | {seed} | {run['threads']} | {run['epochs']} | {run['accuracy']:.2%} | "
                  f"{run['seconds']:.2f} | {ratio:.2f}x | {shown} |", flush=True)
    peer = statistics.median(r["seconds"] for r in runs[PEER])
    print("\nMedians over the seeds (every seed counted; the ratio is of the median times):\n\n"
          "| run | lowest accuracy | median accuracy | median training time (s) | x the peer's | "
          "median handwriting misread |\n|---|---:|---:|---:|---:|---:|")
    for name, done in runs.items():
        seconds = statistics.median(r["seconds"] for r in done)
        errors = [r["misread"] for r in done if r["misread"] is not None]
        shown = f"{statistics.median(errors):.1%}" if errors else "-"
        print(f"| {name} | {min(r['accuracy'] for r in done):.2%} | "
              f"{statistics.median(r['accuracy'] for r in done):.2%} | {seconds:.2f} | {seconds / peer:.2f}x | "
              f"{shown} |")


if __name__ == "__main__":
    main()
