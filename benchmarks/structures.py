"""The chapter's questions about network structure, answered on the full MNIST set.

Each row changes one thing about the chapter's mlp (784-10-10-1, sigmoid) or cnn (two 5x5
conv + max-pool blocks of 20 channels) and trains it with the chapter's recipe (the
regression to the digit's value, plain SGD at the chapter's learning rate, batch 64, seed 0;
`--task classify` for ten classes instead). Every row is what a learner gets from
`digitlab train MODEL --structure ...` (docs/structures.md), through the same `run()`.

    python benchmarks/structures.py --data-dir ../shared/data/mnist [--epochs 10] [--task classify]
                                    [--only hidden-100 relu]

Columns: test accuracy on the 10,000 test digits, parameters, training FLOPs (one step's
forward and backward counted by torch, times the steps), and training seconds.
"""
from __future__ import annotations

import argparse
import os

import torch

from common import cpu_name, quiet_run
from digitlab.config import TrainConfig
from digitlab.data import read_folder
from digitlab.models import model_for
from digitlab.studies.model_summary import training_flops
from digitlab.training.loop import Diverged

# (row, question, model, structure): the chapter's two first, then one change each
ROWS = [
    ("mlp", "the chapter's mlp: two hidden layers of 10, sigmoid", "mlp", {}),
    ("hidden-100", "hidden size 10 -> 100 (both layers)", "mlp", {"hidden": [100, 100]}),
    ("one-hidden", "two hidden layers -> one", "mlp", {"hidden": [10]}),
    ("relu", "sigmoid -> ReLU", "mlp", {"activation": "relu"}),
    ("mlp-11k", "fully connected at about the cnn's size: one hidden layer of 14", "mlp", {"hidden": [14]}),
    ("cnn", "the chapter's cnn: 2 blocks of 20 channels, 5x5, max-pool", "cnn", {}),
    ("kernel-3", "kernel 5x5 -> 3x3", "cnn", {"kernel": 3}),
    ("avg-pool", "max -> average pooling", "cnn", {"pool": "avg"}),
    ("one-block", "depth: 2 conv blocks -> 1", "cnn", {"channels": [20]}),
    ("three-blocks", "depth: 2 conv blocks -> 3", "cnn", {"channels": [20, 20, 20]}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLAB_DATA_DIR"), help="the four MNIST files")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set (the chapter's 10)")
    parser.add_argument("--task", choices=("regress", "classify"), default="regress",
                        help="regress, as the chapter; classify: ten classes and cross-entropy")
    parser.add_argument("--only", nargs="+", default=None, help="these rows only")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.task}, "
          f"{args.epochs} epochs, seed 0, {len(data.train_labels):,} training images\n")
    print("| question | structure | test accuracy | params | training FLOPs | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for name, question, model, structure in ROWS:
        if args.only and name not in args.only:
            continue
        config = TrainConfig(model=model, structure=structure, task=args.task, epochs=args.epochs).resolved()
        shown = " ".join(f"--structure {k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in structure.items())
        command = f"`{f'{model} {shown}'.strip()}`"
        try:
            result = quiet_run(config, data)
        except Diverged as e:  # an answer too: this structure cannot take the chapter's learning rate
            params = sum(p.numel() for p in model_for(config).parameters())
            print(f"| {question} | {command} | {str(e).split(':')[0]} | {params:,} | - | - |", flush=True)
            continue
        flops = training_flops(config) * len(result.history.batch_loss)
        print(f"| {question} | {command} | {result.test_accuracy:.2%} | {result.params:,} | {flops:.3g} | "
              f"{result.history.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
