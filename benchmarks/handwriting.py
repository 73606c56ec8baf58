"""How well trained models read handwriting that is not MNIST: the README's "reading your
handwriting" table.

    python benchmarks/handwriting_set.py /tmp/hwset            # build the measuring set once
    python benchmarks/handwriting.py /tmp/hwset RUN [RUN ...] --data-dir ../shared/data/mnist
    python benchmarks/handwriting.py /tmp/hwset --train /tmp/presets --data-dir ../shared/data/mnist

--train first trains into that folder the chapter's cnn for 2 epochs (as a regression, as the
course does, and as a classifier), the fast and best presets, and both again with --reject;
then measures them. For each run it prints: the MNIST test
accuracy, the accuracy on the set's single digits (pen-drawn and font, and both), the share of
whole numbers read exactly, the expected calibration error on the MNIST test set and on the
single digits, the share
of single digits read "sure" (and how many of those are right), and the share of non-digits
(letters, smileys, scribbles) that come out "not sure".

It only calls predict_files(model, meta, files) and reads `.digit`, plus `.text` and `.sure`
where they exist, so it also measures older digitlab versions (put their src/ first on
PYTHONPATH): a version without whole numbers reads each number as one digit.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from digitlab.checkpoint import load_checkpoint
from digitlab.data import read_folder
from digitlab.evaluate import model_outputs
from digitlab.reading.predict import predict_files

PRESETS = {  # what --train trains: the chapter's cnn as the course runs it and as a classifier, the presets
    "chapter": ["cnn", "--epochs", "2"],
    "chapter-classify": ["cnn", "--task", "classify", "--epochs", "2"],
    "fast": ["--preset", "fast"],
    "best": ["--preset", "best"],
    "fast-reject": ["--preset", "fast", "--reject"],
    "best-reject": ["--preset", "best", "--reject"],
}


def rows(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (15 equal-width bins), written out here so that it measures any version."""
    which = (confidence * bins).long().clamp(max=bins - 1)
    gap = torch.bincount(which, weights=correct.double() - confidence.double(), minlength=bins)
    return float(gap.abs().sum() / len(correct))


def measure(run: Path, hw: Path, data) -> dict:
    model, meta = load_checkpoint(run)
    out = {"run": run.name, "model": meta.model, "task": meta.task.name,
           "seconds": (meta.results or {}).get("seconds")}
    outputs = model_outputs(model, data.test_images, normalization=meta.normalization)
    labels = data.test_labels.long()
    if meta.task.confident:
        out["mnist"] = float((outputs.argmax(1) == labels).double().mean())
        confidence, guess = (outputs / (meta.temperature or 1.0)).softmax(1).max(1)
        out["ece"] = ece(confidence, guess == labels)
    else:
        out["mnist"] = float((outputs.squeeze(1).round().clamp(0, 9) == labels).double().mean())
        out["ece"] = None
    digits = rows(hw / "digits")
    said = predict_files(model, meta, [hw / "digits" / r["file"] for r in digits])
    right = np.array([p.error is None and getattr(p, "text", str(p.digit)) == r["label"] for p, r in zip(said, digits)])
    for source in ("pen", "font"):
        which = np.array([r["source"] == source for r in digits])
        out[f"digits_{source}"] = float(right[which].mean()) if which.any() else None
    out["digits"] = float(right.mean())
    read = [k for k, p in enumerate(said) if p.error is None and p.confidence is not None]
    out["hw_ece"] = (ece(torch.tensor([said[k].confidence for k in read]), torch.from_numpy(right[read]))
                     if meta.task.confident and read else None)
    # an older version is always "sure"; a file it could not read is not
    sure = np.array([p.error is None and getattr(p, "sure", None) is not False for p in said])
    out["sure"] = float(sure.mean()) if meta.task.confident else None  # regression: no confidence
    out["right_when_sure"] = float(right[sure].mean()) if sure.any() and out["sure"] is not None else None
    numbers = rows(hw / "numbers")
    said = predict_files(model, meta, [hw / "numbers" / r["file"] for r in numbers])
    out["numbers"] = float(np.mean([p.error is None and getattr(p, "text", str(p.digit)) == r["text"]
                                    for p, r in zip(said, numbers)]))
    others = rows(hw / "others")
    said = predict_files(model, meta, [hw / "others" / r["file"] for r in others])
    out["not_sure"] = (float(np.mean([p.error is not None or getattr(p, "sure", True) is False for p in said]))
                       if meta.task.confident else None)
    return out


def train_presets(folder: Path, data_dir: str) -> list[Path]:
    runs = []
    for name, args in PRESETS.items():
        out = folder / name
        print(f"training {name} into {out} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "digitlab", "train", *args, "--out", str(out), "--overwrite",
                        "--data-dir", data_dir], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        runs.append(out)
    return runs


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", type=Path, help="the folder benchmarks/handwriting_set.py wrote")
    parser.add_argument("runs", type=Path, nargs="*", help="run folders or checkpoints to measure")
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--train", type=Path, metavar="DIR", help="train the runs of PRESETS here first")
    args = parser.parse_args()
    runs = list(args.runs) + (train_presets(args.train, args.data_dir) if args.train else [])
    data = read_folder(args.data_dir)
    counts = {k: len(rows(args.set / k)) for k in ("digits", "numbers", "others")}
    print(f"set {args.set}: {counts['digits']} digits, {counts['numbers']} numbers of 2-5 digits, "
          f"{counts['others']} non-digits")
    print("| run | model | training (s) | MNIST test | handwriting digits (pen / font) | whole numbers | "
          "calibration error (MNIST test / handwriting) | digits sure (right when sure) | non-digits 'not sure' |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        m = measure(run, args.set, data)
        seconds = "-" if m["seconds"] is None else f"{m['seconds']:.0f}"
        print(f"| {m['run']} | {m['model']} ({m['task']}) | {seconds} | {m['mnist']:.2%} | {pct(m['digits'])} "
              f"({pct(m['digits_pen'])} / {pct(m['digits_font'])}) | {pct(m['numbers'])} | {pct(m['ece'])} / "
              f"{pct(m['hw_ece'])} | "
              f"{pct(m['sure'])} ({pct(m['right_when_sure'])}) | {pct(m['not_sure'])} |", flush=True)


if __name__ == "__main__":
    main()
