"""Contender: digitlab itself, through its library: in-memory batches, fit(), evaluate().

The chapter's maths (batch 64, plain SGD, squared error, fp32). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch

from digitlab.data import InMemoryLoader, read_folder
from digitlab.evaluate import evaluate
from digitlab.models import create_model, default_lr, place
from digitlab.train import fit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("mlp", "cnn"), required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batches", type=int, default=None)
    args = p.parse_args()
    data = read_folder(args.data_dir)
    torch.manual_seed(0)
    model = place(create_model(args.model), torch.device("cpu"))
    loader = InMemoryLoader(data.train_images, data.train_labels, batch_size=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=default_lr(args.model))
    history = fit(model, loader, opt, epochs=1, max_batches=args.batches, progress=False, log_every=10**9)
    result = evaluate(model, data.test_images, data.test_labels, task="regress")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_ips": history.images_per_second, "eval_ips": result.images_per_second,
                      "peak_rss_mb": rss_mb, "last_loss": history.final_loss}))


if __name__ == "__main__":
    main()
