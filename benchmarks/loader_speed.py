"""Training speed: digitlab's in-memory batches against a per-sample Dataset + DataLoader.

Both loops train the same chapter model with the same settings (batch 64, SGD with the
chapter's learning rate, squared error, fp32) on the full training set; only the way
batches are made differs. The two contenders run interleaved in one process, several
times, and the script reports the median images/s of each and their ratio, because
timings on shared machines drift by 2x or more from one minute to the next.

    python benchmarks/loader_speed.py --data-dir ../shared/data/mnist [--repeats 3] [--batches N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from digitlab.data import PIXEL_CENTER, PIXEL_SCALE, InMemoryLoader, load_mnist
from digitlab.models import create_model, default_lr
from digitlab.train import compute_loss


class PerSampleMNIST(Dataset):
    """What a tutorial writes: one image at a time, normalised in __getitem__."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.numpy(), labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = (torch.from_numpy(self.images[i]).float() - PIXEL_CENTER) / PIXEL_SCALE
        return image.unsqueeze(0), int(self.labels[i])  # (1, 28, 28), label


def epoch_images_per_second(model_name: str, loader, batches: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=default_lr(model_name))
    model.train()
    seen = 0
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        if i == batches:
            break
        loss = compute_loss(model(images), labels, "regress")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: digitlab's usual search)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=None, help="batches per run (default: a full epoch)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], help="models (default: mlp cnn)")
    args = parser.parse_args()

    data = load_mnist(args.data_dir)
    in_memory = InMemoryLoader(data.train_images, data.train_labels, batch_size=64, seed=0)
    per_sample = DataLoader(PerSampleMNIST(data.train_images, data.train_labels), batch_size=64,
                            shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    batches = args.batches or len(in_memory)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"data: {data.source}; {batches} batches of 64 per run; median of {args.repeats} interleaved runs\n")
    print("| model | DataLoader img/s | digitlab img/s | speed-up |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        results = {"dataloader": [], "digitlab": []}
        for _ in range(args.repeats):
            results["dataloader"].append(epoch_images_per_second(name, per_sample, batches))
            results["digitlab"].append(epoch_images_per_second(name, in_memory, batches))
        base, ours = (statistics.median(results[k]) for k in ("dataloader", "digitlab"))
        print(f"| {name} | {base:,.0f} | {ours:,.0f} | {ours / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
