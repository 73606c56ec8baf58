"""Predicting a person's own handwriting: a photo, a scan or a drawing, turned into MNIST.

A network trained on MNIST has only ever seen digits prepared one way (LeCun et al.,
1998): white ink on black, the digit scaled to fit a 20x20 box with its aspect kept, and
placed in 28x28 so that its centre of mass sits at the centre. A naive resize of a whole
photo gives it dark ink on grey paper, tiny and off-centre. `preprocess` repeats the
MNIST recipe on any picture:

1. grey scale; transparency composited onto white; EXIF rotation applied;
2. even out the lighting: subtract a heavily blurred copy (the paper's shade);
3. decide the ink's polarity: the ink is the minority on either side of Otsu's threshold;
4. keep the ink (Otsu's threshold, then the connected blobs of real size, not specks);
5. crop to the ink, scale into 20x20 keeping the aspect ratio;
6. paste into 28x28 with the centre of mass at the centre.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .files import one_line

MAX_PIXELS = 40_000_000  # refuse larger images before decoding them
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
BOX = 20  # MNIST digits fit a 20x20 box ...
SIZE = 28  # ... centred in 28x28
WORK_SIZE = 256  # long side of the working copy: enough detail, bounded cost
MIN_BLOB = 0.08  # a blob smaller than this fraction of the largest one is noise
MIN_CONTRAST = 0.08  # ink must differ from the paper by this much (of full scale)


class ImageError(UserError):
    """A file that cannot be read as a picture of a digit."""


def load_grey(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Any PNG/JPEG/BMP/WebP/GIF/TIFF file (or its bytes, as uploaded) as float32 grey in [0, 1];
    RGBA composited onto white.

    16-bit and floating-point greys are read at their full depth: squeezing them to 8 bits
    first can collapse a faint drawing to two levels. `name` names the picture in errors.
    """
    too_big = f"is over {MAX_PIXELS // 1_000_000} megapixels; crop or shrink it first"
    if isinstance(source, bytes):
        name, opened, head = name or "upload", io.BytesIO(source), source[:4]
    else:
        path = Path(source)
        name = name or one_line(str(path))
        if not path.is_file():  # a FIFO or a device would hang the reader
            raise ImageError(f"{name}: {'not a regular file' if path.exists() else 'no such file'}")
        with open(path, "rb") as f:
            head = f.read(4)
        opened = path
    try:
        with warnings.catch_warnings(), _libtiff_quiet(head in TIFF_MAGIC):
            # Pillow's own warnings (its bomb check from 89 MP, EXIF and TIFF oddities) would reach the
            # user as library noise; what matters becomes one ImageError line below.
            warnings.simplefilter("ignore")
            with Image.open(opened) as im:
                if im.width * im.height > MAX_PIXELS:  # the header is read, the pixels are not yet
                    raise ImageError(f"{name}: {im.width}x{im.height} {too_big}")
                im.load()
                im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
                return _grey(im)
    except Image.DecompressionBombError:  # over 178 MP: Pillow refuses before we can look
        raise ImageError(f"{name}: the image {too_big}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, BMP, WebP ...)") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, struct.error, EOFError,
            MemoryError, ZeroDivisionError, KeyError, AttributeError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: broken or truncated image ({one_line(str(e))[:120]})") from None


_STDERR_LOCK = threading.Lock()
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@contextlib.contextmanager
def _libtiff_quiet(is_tiff: bool):
    """libtiff writes its complaints about a damaged TIFF straight to file descriptor 2, past Python's
    warnings. For a TIFF, point descriptor 2 elsewhere while it is decoded (a lock keeps threads in
    turn; other output in that moment is lost, so this is done for TIFFs alone)."""
    if not is_tiff:
        yield
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _grey(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0
        if im.mode == "F":  # floats: their own range
            low, high = float(values.min()), float(values.max())
            return (values - low) / (high - low) if high > low else np.zeros_like(values)
        return np.clip(values / top, 0, 1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (1979): the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max()) + 1e-6))
    centers = (edges[:-1] + edges[1:]) / 2
    weight = hist.cumsum()
    mean = (hist * centers).cumsum()
    total_weight, total_mean = weight[-1], mean[-1]
    w1 = total_weight - weight
    valid = (weight > 0) & (w1 > 0)
    between = np.zeros_like(centers)
    m0 = mean[valid] / weight[valid]
    m1 = (total_mean - mean[valid]) / w1[valid]
    between[valid] = weight[valid] * w1[valid] * (m0 - m1) ** 2
    return float(centers[int(between.argmax())])


def _ink_map(grey: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1] (0 = paper), with the paper's shading removed."""
    from scipy import ndimage

    sigma = max(grey.shape) / 8  # wider than a stroke, narrower than a lighting gradient
    paper = ndimage.gaussian_filter(grey, sigma)
    flat = grey - paper  # dark ink < 0 < light ink
    # Polarity: the ink is the minority class on either side of Otsu's threshold.
    t = otsu_threshold(flat)
    light_ink = (flat > t).mean() < 0.5
    ink = flat if light_ink else -flat
    return ink - np.median(ink)


def preprocess(grey: np.ndarray, source: str = "image") -> np.ndarray:
    """A grey picture (H, W) in [0, 1] -> a 28x28 uint8 MNIST-style digit (ink = 255)."""
    from scipy import ndimage

    h, w = grey.shape
    scale = WORK_SIZE / max(h, w)
    if scale < 1:  # work on a bounded copy; box filtering keeps thin strokes
        small = Image.fromarray((grey * 255).astype(np.uint8)).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
        grey = np.asarray(small, dtype=np.float32) / 255.0
    grey = ndimage.median_filter(grey, size=3)  # salt-and-pepper noise
    ink = _ink_map(grey)
    if ink.max() < MIN_CONTRAST:
        raise ImageError(f"{source}: no digit found (the page looks blank)")
    mask = ink > max(otsu_threshold(ink), MIN_CONTRAST / 2)
    labels, count = ndimage.label(mask)
    if count == 0:
        raise ImageError(f"{source}: no digit found (the page looks blank)")
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_BLOB * sizes.max()))
    ys, xs = np.nonzero(keep)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # Ink strength inside the kept blobs (grown by a pixel for the anti-aliased edge), 0 elsewhere.
    region = ndimage.binary_dilation(keep, iterations=1)
    strength = np.clip(ink / np.percentile(ink[keep], 90), 0, 1) * region
    crop = strength[y0:y1, x0:x1]
    ch, cw = crop.shape
    k = BOX / max(ch, cw)
    size = (max(1, round(cw * k)), max(1, round(ch * k)))
    digit = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32)
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left = (SIZE - size[1]) // 2, (SIZE - size[0]) // 2
    canvas[top:top + size[1], left:left + size[0]] = digit
    cy, cx = ndimage.center_of_mass(canvas)
    canvas = ndimage.shift(canvas, (SIZE / 2 - 0.5 - cy, SIZE / 2 - 0.5 - cx), order=1, mode="constant")
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def naive_resize(grey: np.ndarray) -> np.ndarray:
    """The baseline that fails: shrink the whole picture to 28x28 as it is (dark ink stays dark)."""
    im = Image.fromarray((grey * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, folders as their image files (sorted); a missing path or a non-file is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise UserError(f"'{one_line(str(p))}' is not a regular file or a folder (a pipe or a device?)")
        else:
            raise UserError(f"no such file or folder: '{one_line(str(p))}'")
    return files


def preprocessed_names(files: list[Path]) -> list[str]:
    """A distinct file name for each input's 28x28 picture: `x.png.28x28.png`, or with as much of
    its folder path as tells it apart (`a_x.png...` and `b_x.png...`)."""
    parts = [Path(os.path.abspath(f)).parts for f in files]
    depth = 1
    while depth < max((len(p) for p in parts), default=1):
        names = ["_".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
        depth += 1
    names = ["_".join(p[-depth:]) for p in parts]
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # the same file given twice
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return [f"{name}.28x28.png" for name in unique]


@dataclass
class Prediction:
    file: str
    digit: int | None = None
    confidence: float | None = None  # softmax probability; None for the chapter's regression models
    top3: list[dict] | None = None
    error: str | None = None
    image: np.ndarray | None = None  # the 28x28 the network saw

    def as_dict(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "digit": self.digit, "confidence": self.confidence, "top3": self.top3}


def predict_files(model, meta: dict, files: list[Path]) -> list[Prediction]:
    """Preprocess each file and classify it; a bad file gets an error, the rest go on."""
    import torch

    from .evaluate import model_outputs

    predictions, images = [], []
    for f in files:
        try:
            images.append(preprocess(load_grey(f), source=str(f)))
            predictions.append(Prediction(str(f)))
        except UserError as e:
            predictions.append(Prediction(str(f), error=str(e)))
    ok = [p for p in predictions if p.error is None]
    if not ok:
        return predictions
    outputs = model_outputs(model, torch.from_numpy(np.stack(images)), normalization=meta.get("normalization"))
    for p, image, out in zip(ok, images, outputs):
        p.image = image
        if meta["task"] == "classify":
            probs = out.softmax(0)
            top = probs.topk(3)
            p.digit, p.confidence = int(top.indices[0]), float(top.values[0])
            p.top3 = [{"digit": int(d), "p": round(float(v), 4)} for v, d in zip(top.values, top.indices)]
        else:  # regression: the nearest digits to the output value
            value = float(out[0])
            near = sorted(range(10), key=lambda d: abs(d - value))[:3]
            p.digit = near[0]
            p.top3 = [{"digit": d, "distance": round(abs(d - value), 4)} for d in near]
    return predictions


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
