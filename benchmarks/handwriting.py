"""How well trained models read handwriting that is not MNIST: docs/handwriting.md's tables.

    python benchmarks/handwriting_set.py /tmp/hwset            # build the measuring sets once
    python benchmarks/handwriting.py /tmp/hwset RUN [RUN ...] --data-dir ../shared/data/mnist
    python benchmarks/handwriting.py /tmp/hwset --train /tmp/presets --presets sprint fast best --data-dir DIR

--train first trains into that folder the runs of PRESETS (the chapter's cnn for 2 epochs as a
regression, as the course does, and as a classifier; the sprint, fast and best presets; fast and
best again with --reject), or those --presets names; then measures them. For each run and each
set (the MNIST test set, the single handwriting digits, the whole numbers, the degraded digits) it
prints the accuracy, the share of answers marked sure and how often those were right; then the
share of non-digits (letters, smileys, scribbles) marked sure (they should not be), the single
digits' accuracy by source (pen-drawn / font), the expected calibration errors, and the degraded
digits misread per degradation.

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
from digitlab.options import THRESHOLD
from digitlab.reading.predict import predict_files

PRESETS = {  # what --train trains: the chapter's cnn as the course runs it and as a classifier, the presets
    "chapter": ["cnn", "--epochs", "2"],
    "chapter-classify": ["cnn", "--task", "classify", "--epochs", "2"],
    "sprint": ["--preset", "sprint"],
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


def readings(model, meta, folder: Path, key: str = "label") -> tuple[list[dict], list, np.ndarray, np.ndarray]:
    """Each picture of a measuring-set folder read: its rows, the predictions, whether each was read right,
    whether it was sure."""
    listed = rows(folder)
    said = predict_files(model, meta, [folder / r["file"] for r in listed])
    right = np.array([p.error is None and getattr(p, "text", str(p.digit)) == r[key] for p, r in zip(said, listed)])
    # an older version is always "sure"; a file it could not read is not
    sure = np.array([p.error is None and getattr(p, "sure", None) is not False for p in said])
    return listed, said, right, sure


def scores(right: np.ndarray, sure: np.ndarray, confident: bool) -> dict:
    """Accuracy, the share marked sure, and how often sure was right (None for a regression: no confidence)."""
    return {"accuracy": float(right.mean()), "sure": float(sure.mean()) if confident else None,
            "right_when_sure": float(right[sure].mean()) if confident and sure.any() else None}


def measure(run: Path, hw: Path, data) -> dict:
    model, meta = load_checkpoint(run)
    confident = meta.task.confident
    out = {"run": run.name, "model": meta.model, "task": meta.task.name,
           "seconds": (meta.results or {}).get("seconds")}
    outputs = model_outputs(model, data.test_images, normalization=meta.normalization)
    labels = data.test_labels.long()
    if confident:
        confidence, guess = (outputs / (meta.temperature or 1.0)).softmax(1).max(1)
        out["ece"] = ece(confidence, guess == labels)
        out["mnist"] = scores((guess == labels).numpy(), (confidence >= THRESHOLD).numpy(), True)
    else:
        guess = outputs.squeeze(1).round().clamp(0, 9)
        out["mnist"] = scores((guess == labels).numpy(), np.zeros(len(labels), bool), False)
        out["ece"] = None
    digits, said, right, sure = readings(model, meta, hw / "digits")
    out["digits"] = scores(right, sure, confident)
    for source in ("pen", "font"):
        which = np.array([r["source"] == source for r in digits])
        out[f"digits_{source}"] = float(right[which].mean()) if which.any() else None
    read = [k for k, p in enumerate(said) if p.error is None and p.confidence is not None]
    out["hw_ece"] = (ece(torch.tensor([said[k].confidence for k in read]), torch.from_numpy(right[read]))
                     if confident and read else None)
    _, _, right, sure = readings(model, meta, hw / "numbers", key="text")
    out["numbers"] = scores(right, sure, confident)
    if (hw / "degraded").is_dir():
        spoilt, _, right, sure = readings(model, meta, hw / "degraded")
        out["degraded"] = scores(right, sure, confident)
        out["degradations"] = {kind: scores(right[which], sure[which], confident) for kind in
                               dict.fromkeys(r["degradation"] for r in spoilt)
                               for which in [np.array([r["degradation"] == kind for r in spoilt])]}
    _, _, _, sure = readings(model, meta, hw / "others", key="kind")
    out["not_sure"] = float(1 - sure.mean()) if confident else None
    return out


def train_presets(folder: Path, data_dir: str, names: list[str]) -> list[Path]:
    runs = []
    for name in names:
        args = PRESETS[name]
        out = folder / name
        print(f"training {name} into {out} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "digitlab", "train", *args, "--out", str(out), "--overwrite",
                        "--data-dir", data_dir], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        runs.append(out)
    return runs


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def cells(m: dict, digits: int = 1) -> str:
    """accuracy | sure | right when sure"""
    return f"{pct(m['accuracy'], digits)} | {pct(m['sure'])} | {pct(m['right_when_sure'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", type=Path, help="the folder benchmarks/handwriting_set.py wrote")
    parser.add_argument("runs", type=Path, nargs="*", help="run folders or checkpoints to measure")
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    parser.add_argument("--train", type=Path, metavar="DIR", help="train the runs of PRESETS here first")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                        help="which of PRESETS --train trains")
    args = parser.parse_args()
    runs = list(args.runs) + (train_presets(args.train, args.data_dir, args.presets) if args.train else [])
    data = read_folder(args.data_dir)
    counts = {k: len(rows(args.set / k)) for k in ("digits", "numbers", "others", "degraded")
              if (args.set / k).is_dir()}
    print(f"set {args.set}: {counts['digits']} digits, {counts['numbers']} numbers of 2-5 digits, "
          f"{counts['others']} non-digits, {counts.get('degraded', 0)} degraded digits; 'sure': calibrated "
          f"confidence >= {THRESHOLD} (a number's: its digits' multiplied)\n")
    measured = [measure(run, args.set, data) for run in runs]
    print("| run | model | training (s) | set | accuracy | marked sure | right when sure |\n"
          "|---|---|---:|---|---:|---:|---:|")
    for m in measured:
        seconds = "-" if m["seconds"] is None else f"{m['seconds']:.0f}"
        for name, key, places in [("MNIST test", "mnist", 2), ("handwriting digits", "digits", 1),
                                  ("whole numbers", "numbers", 1), ("degraded digits", "degraded", 1)]:
            if key in m:
                print(f"| {m['run']} | {m['model']} ({m['task']}) | {seconds} | {name} | {cells(m[key], places)} |")
        print(f"| {m['run']} | {m['model']} ({m['task']}) | {seconds} | non-digits | - | "
              f"{pct(None if m['not_sure'] is None else 1 - m['not_sure'])} | - |")
    print("\nOther figures: handwriting digits pen / font; calibration error (ECE) on MNIST test / handwriting\n\n"
          "| run | pen / font | ECE MNIST / handwriting |\n|---|---:|---:|")
    for m in measured:
        print(f"| {m['run']} | {pct(m['digits_pen'])} / {pct(m['digits_font'])} | {pct(m['ece'])} / "
              f"{pct(m['hw_ece'])} |")
    kinds = list(next((m["degradations"] for m in measured if "degradations" in m), {}))
    if kinds:
        print("\nDegraded digits misread, per degradation (right when sure in brackets)\n\n"
              f"| run | {' | '.join(kinds)} |\n|---|{'---:|' * len(kinds)}")
        for m in measured:
            print(f"| {m['run']} | " + " | ".join(
                f"{pct(1 - d['accuracy'])} ({pct(d['right_when_sure'])})" for d in m["degradations"].values()) + " |")


if __name__ == "__main__":
    main()
