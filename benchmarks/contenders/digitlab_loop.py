"""Contender: digitlab itself, through its library: in-memory batches, fit(), evaluate().

The chapter's maths (batch 64, plain SGD, squared error, fp32). Prints one JSON line.
"""
from __future__ import annotations

import torch
from contender import parse_args, report

from digitlab.data import InMemoryLoader, read_folder
from digitlab.evaluate import evaluate
from digitlab.models import create_model, default_lr, place
from digitlab.training.custom_steps import choose_step
from digitlab.training.loop import fit


def main():
    args = parse_args()
    data = read_folder(args.data_dir)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = place(create_model(args.model), device)
    loader = InMemoryLoader(data.train_images, data.train_labels, batch_size=64, seed=0, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=default_lr(args.model))
    step = choose_step(model, opt, "regress")  # the mlp's hand-written SGD step, autograd's for the others
    history = fit(model, loader, opt, epochs=1, max_batches=args.batches, step=step).history
    result = evaluate(model, data.test_images, data.test_labels, task="regress")
    report(history.images_per_second, result.images_per_second, history.final_loss)


if __name__ == "__main__":
    main()
