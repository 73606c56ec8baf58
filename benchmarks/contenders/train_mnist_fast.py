"""Contender: the fastest published MNIST recipe we know of, tuomaso/train_mnist_fast (99% in 0.76 s on
a laptop GTX 1660 Ti), written here from its published final recipe:

- conv 1->24 5x5, max-pool 2, ReLU, conv 24->32 3x3, max-pool 2, ReLU, linear 800->256, ReLU,
  linear 256->10, log-softmax;
- Adam at lr 0.01 with betas (0.7, 0.9), one-cycle over the steps (max_lr 0.01, no momentum cycling);
- batch 256, one epoch over all 60,000 images, normalised by MNIST's mean and std and held as one
  tensor, in an order shuffled once; NLL loss; the test set scored in batches of 2,000.

It runs as a user would run it: PyTorch's own thread count, NCHW, float32. Prints one JSON line:
{"seconds": training wall time, "accuracy": test accuracy, "images": images trained on}.

    python benchmarks/contenders/train_mnist_fast.py --data-dir ../shared/data/mnist --seed 0
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081  # MNIST's training pixels, as fractions of 255


def read_idx(folder: str, name: str) -> np.ndarray:
    """An IDX file of the folder, gzipped (NAME.gz) or not."""
    path = Path(folder) / name
    raw = path.read_bytes() if path.exists() else gzip.open(f"{path}.gz").read()
    dims = np.frombuffer(raw[4:4 + 4 * raw[3]], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * raw[3]:], dtype=np.uint8).reshape(dims)


def tensors(folder: str, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(read_idx(folder, f"{prefix}-images-idx3-ubyte").copy()).float().div(255)
    labels = torch.from_numpy(read_idx(folder, f"{prefix}-labels-idx1-ubyte").astype(np.int64))
    return ((images - MEAN) / STD).unsqueeze(1), labels  # (N, 1, 28, 28)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5)  # (B, 24, 24, 24), pooled to 12x12
        self.conv2 = nn.Conv2d(24, 32, 3)  # (B, 32, 10, 10), pooled to 5x5: 800 features
        self.fc1 = nn.Linear(800, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the whole set is held on it, as the peer does)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    (train_x, train_y), (test_x, test_y) = [(x.to(device), y.to(device)) for x, y in
                                            (tensors(args.data_dir, "train"), tensors(args.data_dir, "t10k"))]
    model = Net().to(device)
    steps = -(-len(train_y) // args.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.7, 0.9))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=steps, cycle_momentum=False)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    order = torch.randperm(len(train_y), device=device)  # shuffled once
    train_x, train_y = train_x[order], train_y[order]
    model.train()
    for i in range(0, len(train_y), args.batch_size):
        loss = F.nll_loss(model(train_x[i:i + args.batch_size]), train_y[i:i + args.batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    sync()
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        right = sum(int((model(test_x[i:i + 2000]).argmax(1) == test_y[i:i + 2000]).sum())
                    for i in range(0, len(test_y), 2000))
    print(json.dumps({"seconds": seconds, "accuracy": right / len(test_y), "images": len(train_y),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
