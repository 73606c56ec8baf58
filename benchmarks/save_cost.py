"""The cost of a run's per-epoch save (state, last weights, best weights, metrics.csv), as a
share of an epoch's training time, for the chapter's mlp and cnn.

The epoch is timed by a real one-epoch run (median of --repeats); the save is the very
function a run calls at each epoch's end, timed on the same model after ten epochs' worth
of history (9,370 batch losses), median of 20 calls.

    python benchmarks/save_cost.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name, quiet_run
from digitlab.config import TrainConfig
from digitlab.data import read_folder
from digitlab.models import create_model, place
from digitlab.training.loop import History, TrainState
from digitlab.training.optim import make_optimizer
from digitlab.training.run import save_progress, split_data


def save_seconds(config: TrainConfig, data, calls: int = 20) -> float:
    config = config.resolved()
    split, config = split_data(data, config)
    model = place(create_model(config.model, init=config.init), torch.device("cpu"))
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    history = History(batch_loss=[0.123456789] * 9370, loss_list=[1.0] * 50, log_points=[(0, 0)] * 50,
                      log_steps=[0] * 50, epochs=[{"epoch": e, "train_loss": 1.0, "val_loss": None,
                                                   "val_accuracy": None, "lr": 0.01, "seconds": 1.0,
                                                   "images_per_second": 1.0} for e in range(10)])
    state = TrainState(epoch=10, step=9370, shuffle=torch.Generator().get_state(), history=history)
    times = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(calls):
            start = time.perf_counter()
            save_progress(Path(out), config, state, model, optimizer, None, split.info)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--repeats", type=int, default=3, help="one-epoch runs per model")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | epoch (s) | per-epoch save (ms) | save / epoch |\n|---|---:|---:|---:|")
    for name in ("mlp", "cnn"):
        config = TrainConfig(model=name, epochs=1)
        epoch = statistics.median(quiet_run(config, data).history.seconds for _ in range(args.repeats))
        save = save_seconds(config, data)
        print(f"| {name} | {epoch:.2f} | {save * 1000:.1f} | {save / epoch:.2%} |", flush=True)


if __name__ == "__main__":
    main()
