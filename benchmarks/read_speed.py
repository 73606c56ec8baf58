"""How fast a picture is read, and what it costs in memory: the README's "reading speed" table.

- a 280x280 canvas PNG, as the serve page sends it: decoded and prepared (median of 300);
- a 12-megapixel JPEG photo: decoded and prepared (median of 5);
- `predict` on 100 mixed photos of 1 to 12 megapixels (JPEG): seconds per photo;
- peak memory above the interpreter, each picture in a process of its own, for the largest
  pictures digitlab reads (40 megapixels): RGBA PNG, JPEG, 16-bit PNG, float TIFF.

It uses only what older digitlab versions have too (`load_grey`, or `open_grey` where it exists,
`find_digits`, `predict_files`), so `PYTHONPATH=OLD/src python benchmarks/read_speed.py RUN`
measures a version before it.

    python benchmarks/read_speed.py RUN_DIR [--photos 100]
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import cpu_name
from digitlab.reading import image as image_module
from digitlab.reading.segment import find_digits

READ = getattr(image_module, "open_grey", image_module.load_grey)  # the reading path of this version
SIDE = 6300  # 40 megapixels: the largest picture digitlab reads


def canvas_png() -> bytes:
    """A 7 drawn on the serve page's 280x280 canvas: black strokes 18 px wide on white, RGBA."""
    im = Image.new("RGBA", (280, 280), (255, 255, 255, 255))
    ImageDraw.Draw(im).line([(70, 60), (210, 60), (120, 230)], fill=(0, 0, 0, 255), width=18, joint="curve")
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    return buffer.getvalue()


def photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A phone photo of paper with a number on it: uneven light, noise, dark strokes, JPEG."""
    yy, xx = np.mgrid[0:height:8, 0:width:8].astype(np.float32) / max(width, height)
    light = Image.fromarray(((0.8 + 0.1 * xx - 0.05 * yy) * 255).astype(np.uint8)).resize((width, height))
    page = np.asarray(light, dtype=np.int16) + rng.integers(-8, 8, (height, width), dtype=np.int16)
    im = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    size, stroke = min(width, height) * rng.uniform(0.15, 0.35), max(3, int(min(width, height) * 0.02))
    x, y = width * rng.uniform(0.1, 0.4), height * rng.uniform(0.2, 0.5)
    for k in range(int(rng.integers(1, 4))):  # a row of 1-3 digits: a 7, a 1, a 0
        left = x + k * size * 0.8
        if k % 3 == 0:
            points = [(left, y), (left + size * 0.5, y), (left + size * 0.2, y + size)]
            draw.line(points, fill=(40, 40, 50), width=stroke)
        elif k % 3 == 1:
            draw.line([(left + size * 0.25, y), (left + size * 0.25, y + size)], fill=(40, 40, 50), width=stroke)
        else:
            draw.ellipse([left, y, left + size * 0.55, y + size], outline=(40, 40, 50), width=stroke)
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def timed(read, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def big_picture(kind: str, path: Path) -> None:
    ink = (slice(1500, 4800), slice(3000, 3400))
    if kind == "RGBA PNG":
        pixels = np.full((SIDE, SIDE, 4), 255, np.uint8)
        pixels[ink + (slice(0, 3),)] = 0
        Image.fromarray(pixels).save(path, "PNG")
    elif kind == "JPEG":
        pixels = np.full((SIDE, SIDE, 3), 230, np.uint8)
        pixels[ink] = 20
        Image.fromarray(pixels).save(path, "JPEG")
    elif kind == "16-bit grey PNG":
        pixels = np.full((SIDE, SIDE), 60000, np.uint16)
        pixels[ink] = 0
        Image.fromarray(pixels).save(path, "PNG")
    else:  # float TIFF
        pixels = np.ones((SIDE, SIDE), np.float32)
        pixels[ink] = 0
        Image.fromarray(pixels).save(path, "TIFF")


def peak_memory(path: Path) -> float:
    """MB above the interpreter (with digitlab's reading modules loaded) to read `path`, in a fresh process."""
    # VmHWM, not ru_maxrss: the latter carries the parent's peak over from before exec
    code = ("import re, sys, scipy.ndimage\n"
            "from digitlab.reading import image\n"
            "from digitlab.reading.segment import find_digits\n"
            "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "before = peak()\n"
            "find_digits(getattr(image, 'open_grey', image.load_grey)(sys.argv[1]))\n"
            "print((peak() - before) / 1024)")
    return float(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: the model `predict` reads the photos with")
    parser.add_argument("--photos", type=int, default=100, help="how many mixed photos (default: %(default)s)")
    args = parser.parse_args()
    from digitlab.checkpoint import load_checkpoint
    from digitlab.reading.predict import predict_files

    rng = np.random.default_rng(0)
    canvas, photo = canvas_png(), photo_jpeg(4000, 3000, rng)
    find_digits(READ(canvas))  # scipy's first call
    print(f"{cpu_name()}; digitlab from {Path(image_module.__file__).parents[2]}\n")
    print("| picture | decoded and prepared |\n|---|---:|")
    canvas_ms = timed(lambda: find_digits(READ(canvas)), 300) * 1000
    print(f"| 280x280 canvas PNG (RGBA), median of 300 | {canvas_ms:.2f} ms |")
    print(f"| 12 MP JPEG photo, median of 5 | {timed(lambda: find_digits(READ(photo)), 5) * 1000:.0f} ms |", flush=True)
    model, meta = load_checkpoint(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(args.photos):
            megapixels = rng.uniform(1, 12)
            width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
            path = Path(tmp) / f"photo{k:03d}.jpg"
            path.write_bytes(photo_jpeg(width, int(width * 3 / 4), rng))
            files.append(path)
        start = time.perf_counter()
        read = predict_files(model, meta, files)
        seconds = (time.perf_counter() - start) / len(files)
        found = sum(p.error is None for p in read)
        print(f"| `predict` on {len(files)} mixed photos of 1-12 MP, per photo | {seconds * 1000:.0f} ms "
              f"({found} read) |\n", flush=True)
        print("| 40-megapixel picture | peak memory above the interpreter |\n|---|---:|")
        for kind in ("RGBA PNG", "JPEG", "16-bit grey PNG", "float TIFF"):
            path = Path(tmp) / "big"
            big_picture(kind, path)
            print(f"| {kind} | {peak_memory(path):.0f} MB |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
