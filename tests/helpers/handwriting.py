"""Pictures of handwriting-like digits that are not MNIST, for measuring only.

A person's digits differ from MNIST's: another pen (thicker, thinner), slant, size, paper,
light, and several digits in a row. This module draws such pictures two ways:

- `pen_digit`: a digit drawn the way a pen or a mouse draws it, as smooth strokes through
  jittered control points (several shapes per digit: a 1 with or without a flag and a base,
  a 7 with or without a bar, a 4 open or closed, a 5 whose bar is lifted off the page);
- `font_digit`: a digit in a handwriting font (Debian packages `fonts-dkg-handwriting`,
  `fonts-breip`, ... listed in `HANDWRITING_FONTS`), drawn thicker or thinner and rotated;

and puts the ink on paper (`on_paper`): an off-white or dark page, a lighting gradient, noise,
coloured ink, light-on-dark now and then. `number` sets several digits in a row, `non_digit`
draws letters, smileys and scribbles. benchmarks/handwriting_set.py writes a set of them to a
folder; the tests build numbers from MNIST digits with `number` and `on_paper`.

Nothing here is used for training.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Control points of each digit's strokes in a unit box (x right, y down). A repeated point
# is a corner. Each digit has several shapes, as people write them.
STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[[(0.5, 0.0), (0.18, 0.15), (0.1, 0.5), (0.2, 0.88), (0.5, 1.0), (0.8, 0.85), (0.9, 0.5),
          (0.8, 0.12), (0.48, 0.0), (0.38, 0.05)]],
        [[(0.55, 0.02), (0.25, 0.2), (0.2, 0.6), (0.35, 0.95), (0.65, 0.95), (0.8, 0.55), (0.72, 0.15),
          (0.5, 0.02)]]],
    1: [[[(0.5, 0.0), (0.5, 1.0)]],
        [[(0.25, 0.25), (0.55, 0.0), (0.55, 0.0), (0.5, 1.0)]],
        [[(0.25, 0.22), (0.55, 0.0), (0.55, 0.0), (0.55, 1.0)], [(0.3, 1.0), (0.8, 1.0)]]],
    2: [[[(0.15, 0.25), (0.35, 0.03), (0.65, 0.02), (0.85, 0.22), (0.75, 0.48), (0.12, 0.98), (0.12, 0.98),
          (0.9, 0.96)]],
        [[(0.12, 0.2), (0.45, 0.0), (0.8, 0.15), (0.75, 0.45), (0.3, 0.85), (0.2, 0.98), (0.35, 0.85),
          (0.6, 0.88), (0.92, 0.98)]]],
    3: [[[(0.15, 0.12), (0.45, 0.0), (0.8, 0.12), (0.78, 0.35), (0.42, 0.48), (0.42, 0.48), (0.85, 0.62),
          (0.85, 0.86), (0.5, 1.0), (0.12, 0.88)]],
        [[(0.15, 0.02), (0.85, 0.02), (0.85, 0.02), (0.45, 0.42), (0.8, 0.55), (0.85, 0.85), (0.5, 1.0),
          (0.12, 0.88)]]],
    4: [[[(0.55, 0.0), (0.1, 0.65), (0.1, 0.65), (0.92, 0.65)], [(0.7, 0.25), (0.7, 1.0)]],
        [[(0.2, 0.0), (0.15, 0.55), (0.15, 0.55), (0.85, 0.55)], [(0.75, 0.05), (0.72, 1.0)]]],
    5: [[[(0.82, 0.02), (0.28, 0.02), (0.28, 0.02), (0.22, 0.45), (0.22, 0.45), (0.55, 0.38), (0.85, 0.58),
          (0.82, 0.85), (0.5, 1.0), (0.15, 0.88)]],
        [[(0.3, 0.1), (0.25, 0.45), (0.25, 0.45), (0.55, 0.38), (0.85, 0.58), (0.82, 0.85), (0.5, 1.0),
          (0.15, 0.88)], [(0.32, 0.0), (0.85, 0.02)]]],  # the bar written apart
    6: [[[(0.75, 0.03), (0.4, 0.25), (0.18, 0.62), (0.25, 0.92), (0.55, 1.0), (0.82, 0.8), (0.75, 0.55),
          (0.45, 0.5), (0.2, 0.7)]]],
    7: [[[(0.1, 0.03), (0.9, 0.03), (0.9, 0.03), (0.4, 1.0)]],
        [[(0.1, 0.1), (0.9, 0.03), (0.9, 0.03), (0.45, 1.0)], [(0.35, 0.52), (0.85, 0.5)]]],
    8: [[[(0.78, 0.15), (0.5, 0.0), (0.22, 0.15), (0.28, 0.36), (0.72, 0.62), (0.8, 0.88), (0.5, 1.0),
          (0.2, 0.88), (0.28, 0.62), (0.72, 0.36), (0.78, 0.15), (0.7, 0.06)]]],
    9: [[[(0.8, 0.3), (0.55, 0.48), (0.25, 0.4), (0.22, 0.15), (0.5, 0.0), (0.8, 0.15), (0.8, 0.3), (0.8, 0.3),
          (0.75, 1.0)]],
        [[(0.8, 0.25), (0.55, 0.48), (0.22, 0.38), (0.25, 0.1), (0.55, 0.0), (0.8, 0.2), (0.75, 0.6),
          (0.6, 0.95), (0.35, 1.0)]]],
}

# Debian's handwriting fonts (apt-get install fonts-dkg-handwriting fonts-breip fonts-bwht
# fonts-humor-sans fonts-rufscript fonts-comic-neue fonts-dancingscript
# fonts-sjfonts fonts-yusei-magic fonts-leckerli-one fonts-klee); the ones present are used.
HANDWRITING_FONTS = [
    "truetype/fifthhorseman/dkg.ttf", "truetype/fifthhorseman/dkgBd.ttf", "truetype/fifthhorseman/dkgIt.ttf",
    "truetype/breip/Breip.ttf", "truetype/humor-sans/Humor-Sans.ttf",
    "truetype/rufscript/Rufscript010.ttf", "truetype/sjfonts/Delphine.ttf", "truetype/sjfonts/SteveHand.ttf",
    "truetype/yusei-magic/YuseiMagic-Regular.ttf", "truetype/leckerli-one/LeckerliOne-Regular.ttf",
    "truetype/klee/KleeOne-Regular.ttf", "truetype/klee/KleeOne-SemiBold.ttf",
    "opentype/comic-neue/ComicNeue-Regular.otf", "opentype/comic-neue/ComicNeue-Bold.otf",
    "opentype/comic-neue/ComicNeue-Italic.otf", "opentype/dancingscript/DancingScript-Regular.otf",
    "opentype/dancingscript/DancingScript-Bold.otf", "opentype/bwht/BecauseWeBuild-Regular.otf",
    "opentype/bwht/BecauseWeConnect-Regular.otf", "opentype/bwht/BecauseWeCreate-Regular.otf",
    "opentype/bwht/BecauseWeLearn-Regular.otf", "opentype/bwht/BecauseWeMentor-Regular.otf",
    "opentype/bwht/BecauseWeOrganize-Regular.otf",
]


def handwriting_fonts(root: str = "/usr/share/fonts") -> list[Path]:
    """The fonts of `HANDWRITING_FONTS` installed on this machine."""
    return [Path(root) / f for f in HANDWRITING_FONTS if (Path(root) / f).is_file()]


def _spline(points: np.ndarray, per_segment: int = 12) -> np.ndarray:
    """A Catmull-Rom curve through `points` (N, 2); repeated points make corners."""
    if len(points) < 2:
        return points
    padded = np.vstack([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1:i + 3]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    return np.vstack(out + [points[-1:]])


def _warp(rng: np.random.Generator, slant: float = 0.35, rotate: float = 12.0,
          aspect: tuple[float, float] = (0.6, 1.05)) -> np.ndarray:
    """A random 2x2 map: width/height ratio, slant (shear), and a small rotation."""
    a = math.radians(rng.uniform(-rotate, rotate))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shear = np.array([[1.0, -rng.uniform(-slant / 3, slant)], [0.0, 1.0]])  # mostly leaning right
    scale = np.diag([rng.uniform(*aspect), 1.0])
    return rot @ shear @ scale


def pen_digit(digit: int, rng: np.random.Generator, height: int = 96,
              pen: float | None = None) -> np.ndarray:
    """Ink (H, W) in [0, 1] of `digit` drawn as pen strokes, `height` pixels tall plus a margin.

    The pen is `pen` times the digit's height wide (random in 4-16% by default), the control
    points are jittered, the shape slanted, rotated and squeezed; the pressure varies along
    the stroke.
    """
    shape = STROKES[digit][rng.integers(len(STROKES[digit]))]
    warp = _warp(rng)
    strokes = []
    for stroke in shape:
        pts = np.array(stroke, dtype=np.float64)
        pts = pts + rng.normal(0, 0.035, pts.shape)
        strokes.append(_spline(pts) @ warp.T)
    allpts = np.vstack(strokes)
    lo, hi = allpts.min(0), allpts.max(0)
    k = height / max(hi[1] - lo[1], 1e-6)
    pen = (rng.uniform(0.04, 0.16) if pen is None else pen) * height
    margin = int(pen + 4)
    up = 4  # draw 4x larger, then shrink: smooth edges
    size = (int((hi[0] - lo[0]) * k) + 2 * margin, height + 2 * margin)
    canvas = Image.new("L", (size[0] * up, size[1] * up), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        xy = (stroke - lo) * k + margin
        pressure = 1 + 0.25 * np.sin(np.linspace(0, rng.uniform(2, 6), len(xy)) + rng.uniform(0, 6))
        for (x0, y0), (x1, y1), p in zip(xy[:-1], xy[1:], pressure):
            w = pen * p * up
            draw.line([(x0 * up, y0 * up), (x1 * up, y1 * up)], fill=255, width=max(1, int(w)))
            r = w / 2
            draw.ellipse([x1 * up - r, y1 * up - r, x1 * up + r, y1 * up + r], fill=255)
        x, y = xy[0]
        r = pen * pressure[0] * up / 2
        draw.ellipse([x * up - r, y * up - r, x * up + r, y * up + r], fill=255)
    ink = canvas.resize(size, Image.Resampling.BOX)
    return np.asarray(ink, dtype=np.float32) / 255


def font_glyph(text: str, font: str | Path, rng: np.random.Generator, height: int = 96,
               bold: int | None = None) -> np.ndarray:
    """Ink (H, W) in [0, 1] of `text` in a font, about `height` pixels tall, drawn `bold` (0-3, random
    by default) steps bolder and rotated a little."""
    f = ImageFont.truetype(str(font), size=int(height * 1.4))
    left, top, right, bottom = f.getbbox(text)
    bold = int((rng.choice([0, 0, 1, 2, 3]) if bold is None else bold) * height / 48)
    pad = 8 + bold + height // 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=f, fill=255, stroke_width=bold,
                                stroke_fill=255)
    canvas = canvas.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BICUBIC, expand=True)
    ink = np.asarray(canvas, dtype=np.float32) / 255
    ys, xs = np.nonzero(ink > 0.05)
    ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    k = height / ink.shape[0]
    im = Image.fromarray((ink * 255).astype(np.uint8)).resize(
        (max(1, round(ink.shape[1] * k)), height), Image.Resampling.LANCZOS)
    return np.pad(np.asarray(im, dtype=np.float32) / 255, 6)


def number(glyphs: list[np.ndarray], rng: np.random.Generator, gap: tuple[float, float] = (0.08, 0.4)
           ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Glyph inks set left to right, scaled to one height (+-10%), with gaps of `gap` times that
    height and a slight wander up and down. Returns the ink and each glyph's box (x0, y0, x1, y1)
    measured on its visible ink."""
    height = max(g.shape[0] for g in glyphs)
    placed, x = [], 0
    for g in glyphs:
        k = height * rng.uniform(0.9, 1.1) / g.shape[0]
        im = Image.fromarray((np.clip(g, 0, 1) * 255).astype(np.uint8))
        im = im.resize((max(1, round(g.shape[1] * k)), max(1, round(g.shape[0] * k))), Image.Resampling.BILINEAR)
        g = np.asarray(im, dtype=np.float32) / 255
        ys, xs = np.nonzero(g > 0.3)
        g = g[:, max(xs.min() - 2, 0):xs.max() + 3]  # the glyph's own margins do not count as a gap
        y = int(rng.uniform(0, 0.12) * height)
        placed.append((x, y, g))
        x += g.shape[1] + int(rng.uniform(*gap) * height)
    canvas = np.zeros((int(height * 1.25) + 2, x), dtype=np.float32)
    boxes = []
    for x0, y0, g in placed:
        h, w = g.shape
        canvas[y0:y0 + h, x0:x0 + w] = np.maximum(canvas[y0:y0 + h, x0:x0 + w], g)
        ys, xs = np.nonzero(g > 0.3)
        boxes.append((x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1))
    return canvas, boxes


def on_paper(ink: np.ndarray, rng: np.random.Generator, *, dark_board: bool | None = None,
             margin: tuple[float, float] = (0.3, 1.2), colour: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Ink (H, W) in [0, 1] on a page: paper or a dark board, a lighting gradient, noise, a pen's
    colour. Returns the picture and where the ink's top-left corner went (x, y)."""
    h, w = ink.shape
    mx, my = (int(rng.uniform(*margin) * max(h, 40)) for _ in range(2))
    H, W = h + 2 * my, w + 2 * mx
    yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
    angle = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0.05, 0.3) * (math.cos(angle) * xx + math.sin(angle) * yy)
    if dark_board is None:
        dark_board = rng.random() < 0.15
    base = rng.uniform(0.15, 0.3) if dark_board else rng.uniform(0.75, 0.95)
    paper = base + light - light.mean() + rng.normal(0, rng.uniform(0.005, 0.04), (H, W))
    full = np.zeros((H, W), dtype=np.float32)
    full[my:my + h, mx:mx + w] = ink
    strength = rng.uniform(0.5, 0.7) if dark_board else -rng.uniform(0.45, 0.75)
    page = np.clip(paper + strength * full, 0, 1)
    if not colour or dark_board:
        return Image.fromarray((page * 255).astype(np.uint8)), (mx, my)
    pen = np.array(rng.choice([(0.1, 0.1, 0.12), (0.1, 0.15, 0.6), (0.5, 0.5, 0.5), (0.7, 0.1, 0.1)]))
    tint = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 1.0)])  # warm or white paper
    rgb = (paper[..., None] * tint) * (1 - full[..., None] * 0.85) + full[..., None] * 0.85 * pen
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)), (mx, my)


NON_DIGIT_LETTERS = "ACEFHKMNPRTVWXYabdehkmnrwx#?&@%"


def non_digit(kind: str, rng: np.random.Generator, fonts: list[Path], height: int = 96) -> np.ndarray:
    """Ink of something that is not a digit: 'letter' (in a handwriting font), 'smiley' or 'scribble'."""
    if kind == "letter":
        return font_glyph(str(rng.choice(list(NON_DIGIT_LETTERS))), fonts[rng.integers(len(fonts))], rng, height)
    up, size = 4, height + 24
    canvas = Image.new("L", (size * up, size * up), 0)
    draw = ImageDraw.Draw(canvas)
    pen = int(rng.uniform(0.04, 0.1) * height * up)
    c, r = size * up / 2, height * up / 2
    if kind == "smiley":
        draw.ellipse([c - r, c - r, c + r, c + r], outline=255, width=pen)
        for ex in (-0.35, 0.35):
            e = pen * 0.9
            draw.ellipse([c + ex * r - e, c - 0.3 * r - e, c + ex * r + e, c - 0.3 * r + e], fill=255)
        draw.arc([c - 0.55 * r, c - 0.4 * r, c + 0.55 * r, c + 0.55 * r], 20, 160, fill=255, width=pen)
    elif kind == "scribble":
        pts = np.cumsum(rng.normal(0, 0.35, (int(rng.integers(8, 20)), 2)), 0)
        pts = (pts - pts.min(0)) / max(np.ptp(pts, 0).max(), 1e-6)
        xy = _spline(pts) * 2 * r + (c - r)
        draw.line([tuple(p) for p in xy], fill=255, width=pen, joint="curve")
    else:
        raise ValueError(f"unknown kind of non-digit: {kind}")
    ink = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
    return ink
