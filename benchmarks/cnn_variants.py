"""What makes the chapter's cnn fast on a CPU: each candidate trick, measured against stock.

Every variant trains the chapter's cnn with the chapter's maths (batch 64, plain SGD,
squared error, fp32) on the same real batches, interleaved round by round, and reports
the median images/s and its ratio to the stock NCHW model (ReLU, then pool, as the
chapter writes it). A second table does the same for evaluation of the 10k test set.

    python benchmarks/cnn_variants.py --data-dir ../shared/data/mnist [--rounds 3] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from digitlab.data import InMemoryLoader, normalize, read_folder
from digitlab.models import create_model


def stock(m, x):  # the chapter's order: conv -> ReLU -> pool
    x = m.max_pool1(F.relu(m.conv1(x)))
    x = m.max_pool2(F.relu(m.conv2(x)))
    return m.fc(x.flatten(1))


def pool_first(m, x):  # ReLU fused after the pool: the same function on 4x fewer values
    return m(x)


def amax_pool(x):  # max-pool as a reshape and a reduction
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax((3, 5))


def reshape_pool(m, x):
    x = F.relu(amax_pool(m.conv1(x)))
    x = F.relu(amax_pool(m.conv2(x)))
    return m.fc(x.flatten(1))


def unfold_conv1(m, x):  # conv1 (one input channel) as im2col + one batched matmul
    cols = F.unfold(x, 5, padding=2)  # (B, 25, 784)
    y = torch.baddbmm(m.conv1.bias.view(1, -1, 1), m.conv1.weight.view(1, 20, 25).expand(len(x), -1, -1), cols)
    x = F.relu(m.max_pool1(y.view(len(x), 20, 28, 28)))
    x = F.relu(m.max_pool2(m.conv2(x)))
    return m.fc(x.flatten(1))


# name -> (forward, channels_last, threads)
VARIANTS = {
    "stock (NCHW, ReLU then pool)": (stock, False, None),
    "ReLU fused after pool": (pool_first, False, None),
    "reshape+amax max-pool": (reshape_pool, False, None),
    "conv1 as unfold+matmul": (unfold_conv1, False, None),
    "channels_last": (stock, True, None),
    "1 thread instead of 2": (stock, False, 1),
    "channels_last + ReLU after pool (digitlab)": (pool_first, True, None),
}


def train_ips(forward, channels_last: bool, threads, batches, compiled=False) -> float:
    torch.manual_seed(0)
    model = create_model("cnn")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(lambda x: forward(model, x)) if compiled else (lambda x: forward(model, x))
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for i, (x, y) in enumerate(batches):
            if i == 10:  # warm-up done (and compilation, if any)
                start = time.perf_counter()
            loss = F.mse_loss(step_fn(x).squeeze(1), y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (len(batches) - 10) * len(batches[0][0]) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def eval_ips(images: torch.Tensor, channels_last: bool, batch_size: int, inference: bool) -> float:
    model = create_model("cnn").eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    context = torch.inference_mode if inference else torch.no_grad
    with context():
        model(images[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: digitlab's usual search)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=160,
                        help="training batches per measurement (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (about 25 s to compile)")
    args = parser.parse_args()

    from digitlab.data import load_mnist

    data = read_folder(args.data_dir) if args.data_dir else load_mnist()
    loader = InMemoryLoader(data.train_images, data.train_labels, batch_size=64, seed=0)
    batches = [batch for batch, _ in zip(loader, range(args.batches))]
    variants = dict(VARIANTS)
    if args.compile:
        variants["torch.compile (inductor)"] = (stock, False, None)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (forward, channels_last, threads) in variants.items():
            results[name].append(train_ips(forward, channels_last, threads, batches, compiled="compile" in name))
    base = statistics.median(results[next(iter(variants))])
    print(f"training, batch 64, median of {args.rounds} rounds, {torch.get_num_threads()} threads\n")
    print("| variant | img/s | vs stock |\n|---|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f}x |")

    images = normalize(data.test_images)
    cases = {f"{'channels_last' if cl else 'NCHW'}, batch {bs}, {'inference_mode' if inf else 'no_grad'}": (cl, bs, inf)
             for cl, bs, inf in [(False, 64, False), (False, 1000, True), (True, 64, True), (True, 256, True),
                                 (True, 1000, True), (True, 10000, True)]}
    evals: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (cl, bs, inf) in cases.items():
            evals[name].append(eval_ips(images, cl, bs, inf))
    base = statistics.median(evals[next(iter(cases))])
    print(f"\nevaluation of the {len(images):,} test images\n")
    print("| variant | img/s | vs first |\n|---|---:|---:|")
    for name, values in evals.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
