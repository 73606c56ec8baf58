"""digitlab against what a learner would otherwise run, each contender in its own process.

Contenders (benchmarks/contenders/): the chapter's own PaddlePaddle code, a canonical
PyTorch Dataset + DataLoader loop, and digitlab. Same data, same models, batch 64, plain
SGD, squared error, fp32. Each run trains one full epoch (or --batches), then evaluates
the 10k test set. Runs are interleaved (the contender order rotates every repeat) and
each figure is the median of the repeats; peak RSS is the largest seen. It also times
`digitlab --help`. PaddlePaddle comes from the `bench` extra: pip install -e '.[bench]'.

    python benchmarks/side_by_side.py --data-dir ../shared/data/mnist [--repeats 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name

HERE = Path(__file__).resolve().parent
CONTENDERS = {"paddle": "paddle_chapter.py", "dataloader": "torch_dataloader.py", "digitlab": "digitlab_loop.py"}
LABELS = {"paddle": "chapter code, PaddlePaddle", "dataloader": "PyTorch Dataset + DataLoader", "digitlab": "digitlab"}


def run_contender(name: str, model: str, data_dir: str, batches: int | None, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(HERE / "contenders" / CONTENDERS[name]), "--model", model, "--data-dir", data_dir,
           "--device", device]
    if batches:
        cmd += ["--batches", str(batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(none)"


def help_seconds(repeats: int = 7) -> float:
    exe = shutil.which("digitlab", path=str(Path(sys.executable).parent)) or shutil.which("digitlab")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([exe, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_flops_per_image(model: str, batch: int = 64) -> float:
    """FLOPs of one training step (forward and backward, as PyTorch's FlopCounterMode counts convolutions
    and matrix products), per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from digitlab.models import create_model

    net = create_model(model)
    images, targets = torch.randn(batch, 1, 28, 28), torch.rand(batch, 1) * 9
    with FlopCounterMode(display=False) as counter:
        ((net(images) - targets) ** 2).mean().backward()
    return counter.get_total_flops() / batch


def machine_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's FLOP limit as this PyTorch reaches it: the best of a few float32 matrix products
    (a large sgemm runs close to the cores' peak), on every core."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST .gz files")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each contender and model (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=None,
                        help="training batches per run (default: a full epoch, 937)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS),
                        help="which to run (default: all; paddle is skipped if not installed)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the PyTorch contenders train (the chapter's Paddle code stays on the CPU)")
    args = parser.parse_args()
    contenders = [c for c in args.contenders if c != "paddle" or importlib.util.find_spec("paddle")]
    if len(contenders) < len(args.contenders):
        print("paddle is not installed (pip install -e '.[bench]'): skipping the chapter's code")

    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        order = contenders[repeat % len(contenders):] + contenders[:repeat % len(contenders)]
        for model in args.models:
            for name in order:
                result = run_contender(name, model, args.data_dir, args.batches, args.device)
                runs.setdefault((name, model), []).append(result)
                print(f"repeat {repeat + 1}: {name:10} {model}: train {result['train_ips']:9,.0f} img/s, "
                      f"eval {result['eval_ips']:9,.0f} img/s, peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)

    def med(name, model, key):
        return statistics.median(r[key] for r in runs[(name, model)])

    where = "CUDA GPU " + _gpu_name() if args.device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"\n{where}; median of {args.repeats} interleaved runs; "
          f"{'a full epoch' if not args.batches else f'{args.batches} batches'} of batch 64\n")
    models = args.models
    print("| contender | " + " | ".join(f"{m} train img/s" for m in models) + " | "
          + ("cnn epoch (s) | " if "cnn" in models else "") + " | ".join(f"{m} eval img/s" for m in models)
          + " | peak RSS (MB) |")
    print("|---|" + "---:|" * (2 * len(models) + ("cnn" in models) + 1))
    for name in contenders:
        rss = max(r["peak_rss_mb"] for model in models for r in runs[(name, model)])
        cells = [f"{med(name, m, 'train_ips'):,.0f}" for m in models]
        if "cnn" in models:
            cells.append(f"{60_000 / med(name, 'cnn', 'train_ips'):.1f}")
        cells += [f"{med(name, m, 'eval_ips'):,.0f}" for m in models]
        print(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {rss:,.0f} |")
    print()
    for base in (c for c in contenders if c != "digitlab"):
        ratios = ", ".join(
            f"{model} {key.split('_')[0]} {med('digitlab', model, key) / med(base, model, key):.2f}x"
            for model in models for key in ("train_ips", "eval_ips"))
        print(f"digitlab vs {LABELS[base]}: {ratios}")
        if "cnn" in models:  # each repeat on its own: the ratio must hold in every one, not only in the median
            each = [d["train_ips"] / b["train_ips"] for d, b in zip(runs[("digitlab", "cnn")], runs[(base, "cnn")])]
            print(f"  cnn train, repeat by repeat: {', '.join(f'{r:.2f}x' for r in each)} (lowest {min(each):.2f}x)")
    if "cnn" in models and args.device == "cpu":
        flops, peak = training_flops_per_image("cnn"), machine_gflops()
        used = med("digitlab", "cnn", "train_ips") * flops / 1e9
        print(f"\nthe chapter's cnn: {flops / 1e6:.1f} MFLOP per training image; digitlab trains it at "
              f"{used:.1f} GFLOP/s, "
              f"{used / peak:.0%} of the {peak:.0f} GFLOP/s this machine's float32 matrix product reaches")
    print(f"\n`digitlab --help`: {help_seconds():.3f} s (median of 7)")


if __name__ == "__main__":
    main()
