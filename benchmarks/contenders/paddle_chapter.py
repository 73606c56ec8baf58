"""Contender: the course chapter's own code on PaddlePaddle, written fresh from its text.

paddle.vision.datasets.MNIST on the local IDX files, paddle.io.DataLoader (batch 64,
shuffled, last partial batch dropped), the chapter's two `MNIST` Layer classes, and its
training loop: SGD, square_error_cost, the loss sampled every 200 batches.
Needs the `bench` extra (pip install -e '.[bench]'). Prints one JSON line.
"""
from __future__ import annotations

import time

import numpy as np
import paddle
import paddle.nn.functional as F
from contender import parse_args, report
from paddle.nn import Conv2D, Linear, MaxPool2D


class MLPChapter(paddle.nn.Layer):  # the chapter's first MNIST class
    def __init__(self):
        super().__init__()
        self.fc1 = Linear(in_features=784, out_features=10)
        self.fc2 = Linear(in_features=10, out_features=10)
        self.fc3 = Linear(in_features=10, out_features=1)

    def forward(self, inputs):
        inputs = paddle.reshape(inputs, [inputs.shape[0], 784])
        outputs1 = F.sigmoid(self.fc1(inputs))
        outputs2 = F.sigmoid(self.fc2(outputs1))
        return self.fc3(outputs2)


class CNNChapter(paddle.nn.Layer):  # the chapter's second MNIST class
    def __init__(self):
        super().__init__()
        self.conv1 = Conv2D(in_channels=1, out_channels=20, kernel_size=5, stride=1, padding=2)
        self.max_pool1 = MaxPool2D(kernel_size=2, stride=2)
        self.conv2 = Conv2D(in_channels=20, out_channels=20, kernel_size=5, stride=1, padding=2)
        self.max_pool2 = MaxPool2D(kernel_size=2, stride=2)
        self.fc = Linear(in_features=980, out_features=1)

    def forward(self, inputs):
        x = self.max_pool1(F.relu(self.conv1(inputs)))
        x = self.max_pool2(F.relu(self.conv2(x)))
        x = paddle.reshape(x, [x.shape[0], -1])
        return self.fc(x)


def normalise(image):
    # The chapter's preprocessing: (x - 127.5) / 127.5, shape [1, 28, 28]
    return ((np.asarray(image, dtype="float32") - 127.5) / 127.5).reshape(1, 28, 28)


def dataset(folder: str, mode: str):
    prefix = "train" if mode == "train" else "t10k"
    return paddle.vision.datasets.MNIST(
        image_path=f"{folder}/{prefix}-images-idx3-ubyte.gz", label_path=f"{folder}/{prefix}-labels-idx1-ubyte.gz",
        mode=mode, transform=normalise, download=False, backend="cv2",
    )


def main():
    args = parse_args()
    paddle.set_device("cpu")
    paddle.seed(0)
    train_loader = paddle.io.DataLoader(dataset(args.data_dir, "train"), batch_size=64, shuffle=True, drop_last=True)
    test_loader = paddle.io.DataLoader(dataset(args.data_dir, "test"), batch_size=1000)
    model = MLPChapter() if args.model == "mlp" else CNNChapter()
    model.train()
    opt = paddle.optimizer.SGD(learning_rate=0.01 if args.model == "mlp" else 0.001, parameters=model.parameters())
    batches = args.batches or len(train_loader)
    loss_list, seen, start = [], 0, time.perf_counter()
    for batch_id, data in enumerate(train_loader()):
        if batch_id == batches:
            break
        images, labels = data
        images = paddle.to_tensor(images)
        labels = paddle.to_tensor(labels, dtype="float32")
        predicts = model(images)
        loss = F.square_error_cost(predicts, labels)
        avg_loss = paddle.mean(loss)
        if batch_id % 200 == 0:
            loss_list.append(float(avg_loss.numpy()))
        avg_loss.backward()
        opt.step()
        opt.clear_grad()
        seen += images.shape[0]
    train_ips = seen / (time.perf_counter() - start)
    model.eval()
    seen, start = 0, time.perf_counter()
    with paddle.no_grad():
        for images, _ in test_loader():
            model(images)
            seen += images.shape[0]
    eval_ips = seen / (time.perf_counter() - start)
    report(train_ips, eval_ips, float(avg_loss.numpy()))


if __name__ == "__main__":
    main()
