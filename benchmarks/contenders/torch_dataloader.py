"""Contender: the canonical PyTorch loop. A per-sample Dataset, a DataLoader, stock layers.

Written as a tutorial (pytorch/examples mnist) would write the chapter's two models:
NCHW tensors, ReLU then pool, one image normalised per __getitem__ call.
Prints one JSON line: train and eval images/s, peak RSS.
"""
from __future__ import annotations

import gzip
import time

import numpy as np
import torch
import torch.nn.functional as F
from contender import parse_args, report
from torch import nn
from torch.utils.data import DataLoader, Dataset


def read_idx(path: str) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


class MNISTFiles(Dataset):
    def __init__(self, folder: str, split: str):
        prefix = "train" if split == "train" else "t10k"
        self.images = read_idx(f"{folder}/{prefix}-images-idx3-ubyte.gz")
        self.labels = read_idx(f"{folder}/{prefix}-labels-idx1-ubyte.gz")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = (torch.from_numpy(self.images[i].astype(np.float32)) - 127.5) / 127.5
        return image.unsqueeze(0), torch.tensor([float(self.labels[i])])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 10), nn.Linear(10, 10), nn.Linear(10, 1)

    def forward(self, x):
        x = torch.sigmoid(self.fc1(x.reshape(x.shape[0], 784)))
        return self.fc3(torch.sigmoid(self.fc2(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1, 2)
        self.conv2 = nn.Conv2d(20, 20, 5, 1, 2)
        self.fc = nn.Linear(980, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc(x.reshape(x.shape[0], -1))


def main():
    args = parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = (MLP() if args.model == "mlp" else CNN()).to(device)
    train = DataLoader(MNISTFiles(args.data_dir, "train"), batch_size=64, shuffle=True, drop_last=True)
    test = DataLoader(MNISTFiles(args.data_dir, "test"), batch_size=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 if args.model == "mlp" else 0.001)
    batches = args.batches or len(train)
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (images, labels) in enumerate(train):
        if i == batches:
            break
        images, labels = images.to(device), labels.to(device)  # the tutorial's way: each batch to the device
        loss = F.mse_loss(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(images)
    last_loss = loss.item()  # waits for the device
    train_ips = seen / (time.perf_counter() - start)
    model.eval()
    seen, start = 0, time.perf_counter()
    with torch.no_grad():
        for images, _ in test:
            output = model(images.to(device))
            seen += len(images)
        output.sum().item()  # waits for the device
    eval_ips = seen / (time.perf_counter() - start)
    report(train_ips, eval_ips, last_loss)


if __name__ == "__main__":
    main()
