"""Synthetic photos of MNIST digits, and the naive resize they are measured against (tests and
benchmarks only: nothing here ships in the wheel)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from digitlab.reading.segment import SIZE


def naive_resize(grey: np.ndarray) -> np.ndarray:
    """The baseline that fails: shrink the whole picture to 28x28 as it is (dark ink stays dark)."""
    im = Image.fromarray((grey * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def synthetic_photo(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One MNIST digit (28x28, ink high) as a phone photo of paper would show it.

    A 300-700 px canvas, a lighting gradient and noise, dark ink (one in five: light ink on
    a dark board), the digit 25-50% of the short side, rotated up to 10 degrees, anywhere;
    grey, RGB or RGBA. The tests and benchmarks/predict_photos.py build their inputs so.
    """
    h, w = rng.integers(300, 700, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    light = 0.12 * (np.cos(angle) * xx + np.sin(angle) * yy)  # a lighting gradient across the page
    dark_board = rng.random() < 0.2
    paper = (0.25 if dark_board else 0.85) + light - light.mean() + rng.normal(0, 0.03, (h, w))
    size = int(rng.uniform(0.25, 0.5) * min(h, w))  # the 28x28 digit drawn this big
    glyph = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
    ink = np.asarray(glyph, dtype=np.float32) / 255
    top, left = rng.integers(0, h - size), rng.integers(0, w - size)
    page = paper.copy()
    strength = 0.6 if dark_board else -0.65
    page[top:top + size, left:left + size] += strength * ink
    grey = (np.clip(page, 0, 1) * 255).astype(np.uint8)
    kind = rng.integers(3)
    if kind == 0:
        return Image.fromarray(grey)
    tint = np.stack([grey, (grey * 0.97).astype(np.uint8), (grey * 0.9).astype(np.uint8)], -1)
    if kind == 1:
        return Image.fromarray(tint)
    return Image.fromarray(np.dstack([tint, np.full_like(grey, 255)]))  # RGBA, opaque
