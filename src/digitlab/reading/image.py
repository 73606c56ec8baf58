"""Pictures in: decoding a file (PNG, JPEG, BMP, WebP, GIF, TIFF) into grey pixels, with bounds
checked before anything large is allocated, and finding the picture files a user named."""
from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from digitlab.errors import UserError
from digitlab.files import one_line

MAX_PIXELS = 40_000_000  # refuse larger images before decoding them
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


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
                return grey_pixels(im)
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


def grey_pixels(im: Image.Image) -> np.ndarray:
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
