"""torch.compile and memory layouts for the fast and best recipes' models, on this CPU.

For each model (convnet_tiny of --preset sprint, convnet_small of fast, convnet of best) and each variant,
a training step (forward, cross-entropy, backward, Adam) on real MNIST batches of 128:

- eager, as digitlab trains (`models.place`: channels-last conv weights on the CPU);
- eager, all contiguous (NCHW);
- torch.compile (inductor, its C++ kernels on the CPU), default mode: the first step's time is the
  compile time, reported apart, then the steady step.

The variants are measured in turn, `--repeats` times (interleaved); the table gives the median
steady step, and what compiling costs before the first step. A user waits for both: the last
column is how many steps a run needs before compiling pays for itself (never, if it is slower).

    python benchmarks/compile.py --data-dir ../shared/data/mnist [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import cpu_name
from digitlab.data import normalize, read_folder
from digitlab.models import create_model, place

MODELS = {"convnet_tiny (sprint)": "convnet_tiny", "convnet_small (fast)": "convnet_small", "convnet (best)": "convnet"}


def variant(name: str, model_name: str):
    torch.manual_seed(0)
    model = create_model(model_name, num_outputs=10)
    if name == "contiguous":
        model = model.to(memory_format=torch.contiguous_format)
    else:
        model = place(model, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.compile(model) if name == "compiled" else model
    return net, optimizer


def step(net, optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(net(images), labels).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--steps", type=int, default=40, help="steady steps timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell, interleaved")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    images = normalize(data.train_images[:128 * args.steps]).reshape(args.steps, 128, 1, 28, 28)
    labels = data.train_labels[:128 * args.steps].long().reshape(args.steps, 128)
    names = ("eager (digitlab)", "contiguous", "compiled")
    steady: dict[tuple[str, str], list[float]] = {}
    first: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for label, model_name in MODELS.items():
            for name in names:
                torch._dynamo.reset()  # every compiled measurement pays its compile again
                net, optimizer = variant(name.split()[0], model_name)
                start = time.perf_counter()
                step(net, optimizer, images[0], labels[0])  # compiles, for the compiled variant
                step(net, optimizer, images[1], labels[1])
                first.setdefault((label, name), []).append(time.perf_counter() - start)
                start = time.perf_counter()
                for k in range(args.steps):
                    step(net, optimizer, images[k], labels[k])
                steady.setdefault((label, name), []).append((time.perf_counter() - start) / args.steps)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 128, median of "
          f"{args.repeats}, interleaved\n")
    print("| model | variant | steady step (ms) | vs eager | first two steps (s) | steps before compiling pays |\n"
          "|---|---|---:|---:|---:|---:|")
    for label in MODELS:
        eager = statistics.median(steady[label, names[0]])
        for name in names:
            s, f = statistics.median(steady[label, name]), statistics.median(first[label, name])
            pays = "-"
            if name == "compiled":
                saved = eager - s
                pays = f"{(f - 2 * eager) / saved:,.0f}" if saved > 0 else "never"
            print(f"| {label} | {name} | {s * 1000:.1f} | {eager / s:.2f}x | {f:.1f} | {pays} |")


if __name__ == "__main__":
    main()
