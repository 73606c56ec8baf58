"""Build the handwriting-like measuring set: digits and numbers that are not MNIST.

    python benchmarks/handwriting_set.py OUT_DIR [--digits 1000] [--numbers 200] [--others 60] [--seed 0]

Writes OUT_DIR/digits (single digits, half drawn as pen strokes and half in handwriting
fonts), OUT_DIR/numbers (2-5 digits in a row, some with a 5's bar written apart or a light
pen on a dark board) and OUT_DIR/others (letters, smileys and scribbles: not digits), each
with a labels.csv. Pictures are PNG, JPEG or WebP on paper-like backgrounds, 100-400 px.

The fonts are Debian packages: apt-get install fonts-dkg-handwriting fonts-breip fonts-bwht
fonts-humor-sans fonts-rufscript fonts-comic-neue fonts-dancingscript
fonts-sjfonts fonts-yusei-magic fonts-leckerli-one fonts-klee
Without them the set is pen strokes only (the script says so). The set is for measuring;
nothing in digitlab trains on it.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers: not shipped in the wheel
from helpers.handwriting import font_glyph, handwriting_fonts, non_digit, number, on_paper, pen_digit


def save(image: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """Scale the picture to 100-400 px on its long side and save it as PNG, JPEG or WebP."""
    k = rng.uniform(100, 400) / max(image.size)
    image = image.resize((max(1, round(image.width * k)), max(1, round(image.height * k))), Image.Resampling.LANCZOS)
    fmt = rng.choice(["png", "jpg", "webp"])
    path = path.with_suffix(f".{fmt}")
    image.save(path, quality=int(rng.integers(60, 95))) if fmt != "png" else image.save(path)
    return path


def glyph(d: int, source: str, fonts: list[Path], rng: np.random.Generator, pen: float | None = None) -> np.ndarray:
    """A pen-drawn digit, or one in the first of `fonts`; `pen` sets the stroke (random by default)."""
    if source == "pen":
        return pen_digit(d, rng, pen=None if pen is None else 0.04 + 0.12 * pen)
    return font_glyph(str(d), fonts[0], rng, bold=None if pen is None else round(3 * pen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--digits", type=int, default=1000)
    parser.add_argument("--numbers", type=int, default=200)
    parser.add_argument("--others", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fonts = handwriting_fonts()
    if not fonts:
        print("no handwriting fonts installed: pen strokes only (see this script's docstring)", file=sys.stderr)
    sources = ["pen", "font"] if fonts else ["pen"]
    rng = np.random.default_rng(args.seed)

    folder = args.out / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(args.digits):
        d, source = k % 10, sources[(k // 10) % len(sources)]
        picture, _ = on_paper(glyph(d, source, [fonts[k % len(fonts)]] if fonts else [], rng), rng)
        rows.append((save(picture, folder / f"{k:04d}-{d}", rng).name, d, source))
    write_labels(folder, ["file", "label", "source"], rows)

    folder = args.out / "numbers"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(args.numbers):
        text = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(2, 6))))
        source = sources[k % len(sources)]
        font = [fonts[rng.integers(len(fonts))]] if fonts else []  # one writer, one pen per number
        pen = rng.uniform()
        ink, _ = number([glyph(int(c), source, font, rng, pen) for c in text], rng)
        picture, _ = on_paper(ink, rng, margin=(0.2, 0.6))
        rows.append((save(picture, folder / f"{k:04d}-{text}", rng).name, text, source))
    write_labels(folder, ["file", "text", "source"], rows)

    folder = args.out / "others"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    kinds = ["letter", "smiley", "scribble"] if fonts else ["smiley", "scribble"]
    for k in range(args.others):
        kind = kinds[k % len(kinds)]
        picture, _ = on_paper(non_digit(kind, rng, fonts), rng)
        rows.append((save(picture, folder / f"{k:04d}-{kind}", rng).name, kind, ""))
    write_labels(folder, ["file", "kind", "source"], rows)
    print(f"{args.out}: {args.digits} digits, {args.numbers} numbers, {args.others} non-digits "
          f"({len(fonts)} handwriting fonts)")


def write_labels(folder: Path, header: list[str], rows: list[tuple]) -> None:
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
