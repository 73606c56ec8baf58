"""Build the handwriting-like measuring set: digits and numbers that are not MNIST.

    python benchmarks/handwriting_set.py OUT_DIR [--digits 1000] [--numbers 200] [--others 60] [--seed 0]

Writes OUT_DIR/digits (single digits, half drawn as pen strokes and half in handwriting
fonts), OUT_DIR/numbers (2-5 digits in a row, some with a 5's bar written apart or a light
pen on a dark board) and OUT_DIR/others (letters, smileys and scribbles: not digits), each
with a labels.csv. Pictures are PNG, JPEG or WebP on paper-like backgrounds, 100-400 px.

OUT_DIR/degraded is the second measuring set: --degraded digits (300 by default) drawn the same way, each
at every one of DEGRADATIONS, the ways low-resolution scans, phone photos and markers spoil a digit:
drawn 8-16 px tall then scaled up as a viewer would (nearest or bilinear), Gaussian or motion blur,
heavy JPEG compression, thick marker strokes, low contrast, and light that falls off across the page.
Its labels.csv has the degradation of each picture. It has its own random stream, so the first
set is the same with or without it.

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
from PIL import Image, ImageFilter
from scipy import ndimage

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


DEGRADATIONS = ("small-nearest", "small-bilinear", "gaussian-blur", "motion-blur", "jpeg", "marker",
                "low-contrast", "uneven-light")


def degraded(ink: np.ndarray, kind: str, path: Path, rng: np.random.Generator) -> Path:
    """Save the ink (a digit about 96 px tall) on paper, spoilt in one of DEGRADATIONS' ways."""
    height = 96
    if kind == "marker":  # a felt-tip: strokes 15-25% of the digit's height, loops nearly closed
        size = int(rng.uniform(0.08, 0.14) * height) * 2 + 1
        ink = ndimage.grey_dilation(ink, footprint=_disc(size))
    if kind == "low-contrast":  # a faint pencil, or a grey pen on grey paper: ink 10-25% off the paper
        ink = ink * rng.uniform(0.15, 0.35)
    picture, _ = on_paper(np.pad(ink, 12), rng)
    if kind == "uneven-light":  # a shadow across the page: one side at 15-40% of the other's light
        w, h = picture.size
        t = np.linspace(-1, 1, w)[None, :] * np.cos(a := rng.uniform(0, 2 * np.pi)) + \
            np.linspace(-1, 1, h)[:, None] * np.sin(a)
        light = rng.uniform(0.15, 0.4) + (1 - rng.uniform(0.15, 0.4)) / (1 + np.exp(-6 * (t - rng.uniform(-.3, .3))))
        rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) * light[..., None]
        picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if kind.startswith("small"):  # scanned small: the digit 8-16 px tall, then enlarged to 100-400 px
        k = rng.uniform(8, 16) / height
        small = picture.resize((max(1, round(picture.width * k)), max(1, round(picture.height * k))),
                               Image.Resampling.BOX)
        up = rng.uniform(100, 400) / max(small.size)
        how = Image.Resampling.NEAREST if kind == "small-nearest" else Image.Resampling.BILINEAR
        picture = small.resize((round(small.width * up), round(small.height * up)), how)
        path = path.with_suffix(".png")
        picture.save(path)
        return path
    if kind == "gaussian-blur":  # out of focus: sigma 3-6% of the digit's height
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.03, 0.06) * height))
    if kind == "motion-blur":  # a shaken phone: a streak 8-16% of the digit's height, at any angle
        length, angle = int(rng.uniform(0.08, 0.16) * height), rng.uniform(0, 180)
        line = np.zeros((length, length), np.float32)
        line[length // 2] = 1
        line = ndimage.rotate(line, angle, reshape=False, order=1)
        rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)
        rgb = np.stack([ndimage.convolve(rgb[..., c], line / line.sum(), mode="nearest") for c in range(3)], -1)
        picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if kind == "jpeg":  # a picture sent on and on: quality 4-12
        k = rng.uniform(100, 400) / max(picture.size)
        picture = picture.resize((round(picture.width * k), round(picture.height * k)), Image.Resampling.LANCZOS)
        path = path.with_suffix(".jpg")
        picture.convert("RGB").save(path, quality=int(rng.integers(4, 13)))
        return path
    return save(picture, path, rng)


def _disc(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    return xx ** 2 + yy ** 2 <= (size // 2) ** 2


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
    parser.add_argument("--degraded", type=int, default=300, help="digits in the degraded set, each at every "
                        "degradation (0: none)")
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

    folder = args.out / "degraded"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng([args.seed, 1])  # its own stream: the sets above are the same without it
    for k in range(args.degraded):
        d, source = k % 10, sources[(k // 10) % len(sources)]
        font = [fonts[rng.integers(len(fonts))]] if fonts else []
        ink = glyph(d, source, font, rng)
        for kind in DEGRADATIONS:
            rows.append((degraded(ink, kind, folder / f"{k:04d}-{d}-{kind}", rng).name, d, source, kind))
    write_labels(folder, ["file", "label", "source", "degradation"], rows)
    print(f"{args.out}: {args.digits} digits, {args.numbers} numbers, {args.others} non-digits, {args.degraded} "
          f"digits at {len(DEGRADATIONS)} degradations ({len(fonts)} handwriting fonts)")


def write_labels(folder: Path, header: list[str], rows: list[tuple]) -> None:
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
