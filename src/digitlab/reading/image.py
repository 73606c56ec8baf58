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

try:  # decodes uploaded PNGs faster than Pillow (`_spng`); optional: the serve extras bring it
    import pyspng
except ImportError:
    pyspng = None

MAX_PIXELS = 40_000_000  # refuse larger images before decoding them ...
MAX_DECODED = 4 * MAX_PIXELS  # ... and any whose first frame decodes to more bytes than this
TOO_BIG = f"is over {MAX_PIXELS // 1_000_000} megapixels; crop or shrink it first"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DEEP_MODES = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}  # 16-bit and float greys, bytes per band
ICO_MAGIC = b"\x00\x00\x01\x00"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DRAWING_PIXELS = 512 * 512  # a picture up to this size is a drawing, not a photo: an uploaded PNG may go to libspng
STRIP = 512  # rows converted at a time: a large picture is never held twice over in a wider mode
PLAIN_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"sRGB", b"gAMA", b"cHRM", b"iCCP", b"sBIT", b"pHYs", b"bKGD", b"tIME"}


class ImageError(UserError):
    """A file that cannot be read as a picture of a digit."""


def load_grey(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """`open_grey`'s picture (of a file, or its bytes as uploaded) as float32 grey in [0, 1]."""
    return grey_array(open_grey(source, name))


def grey_array(picture: Image.Image) -> np.ndarray:
    """A grey picture ("L", or "F" already in [0, 1]) as float32 values in [0, 1]."""
    return np.asarray(picture, dtype=np.float32) / (255.0 if picture.mode == "L" else 1.0)


def open_grey(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Any PNG/JPEG/BMP/WebP/GIF/TIFF file (or its bytes, as uploaded) as one grey picture: mode "L"
    (8 bits), or "F" in [0, 1] for 16-bit and floating-point greys (squeezing them to 8 bits can
    collapse a faint drawing to two levels). Transparency is composited onto white, EXIF rotation
    applied, and only the first frame of an animation is decoded.

    The size of what would be decoded (pixels, and bytes of its first frame) is checked from the
    header, before anything is allocated. `name` names the picture in errors."""
    if isinstance(source, bytes):
        opened: io.BytesIO | Path
        name, opened, head = name or "upload", io.BytesIO(source), source[:4]
    else:
        opened = Path(source)
        name = name or one_line(str(opened))
        if not opened.is_file():  # a FIFO or a device would hang the reader
            raise ImageError(f"{name}: {'not a regular file' if opened.exists() else 'no such file'}")
        with open(opened, "rb") as f:
            head = f.read(4)
    try:
        with warnings.catch_warnings(), _libtiff_quiet() if head in TIFF_MAGIC else contextlib.nullcontext():
            # Pillow's own warnings (its bomb check from 89 MP, EXIF and TIFF oddities) would reach the
            # user as library noise; what matters becomes one ImageError line below.
            warnings.simplefilter("ignore")
            if head == ICO_MAGIC:  # Pillow's ICO reader decodes while it opens: look at its frames first
                _check_icon(opened, name)
            with Image.open(opened) as im:
                _check_size(im, name)
                fast = _spng(source, im) if isinstance(source, bytes) else None
                if fast is not None:
                    return grey_picture(fast)
                if im.format == "JPEG" and im.mode in ("RGB", "YCbCr"):
                    im.draft("L", im.size)  # decode the brightness alone: no colour to convert
                im.load()
                ImageOps.exif_transpose(im, in_place=True)  # phone photos store their rotation in EXIF
                return grey_picture(im)
    except Image.DecompressionBombError:  # over 178 MP: Pillow refuses before we can look
        raise ImageError(f"{name}: the image {TOO_BIG}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, BMP, WebP ...)") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, struct.error, EOFError,
            MemoryError, ZeroDivisionError, KeyError, AttributeError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: broken or truncated image ({one_line(str(e))[:120]})") from None


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """A PNG's width, height, bit depth and colour type, from its IHDR chunk (the first thing after
    the signature); None if `data` does not start as a PNG. Nothing is decoded."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBB", data[16:26])


def _plain_png(data: bytes) -> str | None:
    """The mode ("L", "RGB" or "RGBA") in which libspng decodes `data` exactly as Pillow does, or None:
    a PNG of at most DRAWING_PIXELS (libspng's RGB is copied once more into Pillow's), 8-bit grey, RGB
    or RGBA, whose chunks are all PLAIN_CHUNKS: no transparent colour, no animation, and no text or
    EXIF (Pillow turns a picture by an orientation found in either)."""
    header = png_header(data)
    if header is None:
        return None
    width, height, bits, colour = header
    mode = {0: "L", 2: "RGB", 6: "RGBA"}.get(colour)
    if bits != 8 or mode is None or width * height > DRAWING_PIXELS:
        return None
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind not in PLAIN_CHUNKS:
            return None
        if kind == b"IEND":
            return mode
        at += 12 + length  # length, type, data, checksum
    return None


def _spng(data: bytes, im: Image.Image) -> Image.Image | None:
    """An uploaded plain PNG (`_plain_png`) decoded by libspng: 0.6 against 0.9 ms for a 280x280
    canvas drawing, decoded and turned grey, and the same pixels as Pillow's (libspng also reads a
    chunk with a bad checksum, which Pillow refuses). None, and Pillow decodes it, for any other
    picture, or where pyspng is not installed (it comes with the serve extras)."""
    mode = _plain_png(data) if pyspng is not None else None
    if mode is None or im.mode != mode:
        return None
    try:
        return Image.fromarray(pyspng.load(data, mode))
    except Exception:  # damaged: Pillow's decoder says how, as for any picture
        return None


def _check_size(im: Image.Image, name: str) -> None:
    """Refuse a picture whose first frame is too large, from its header: the pixels are not read yet."""
    if im.width * im.height > MAX_PIXELS:
        raise ImageError(f"{name}: {im.width}x{im.height} {TOO_BIG}")
    decoded = im.width * im.height * len(im.getbands()) * DEEP_MODES.get(im.mode, 1)
    if decoded > MAX_DECODED:
        raise ImageError(f"{name}: {im.width}x{im.height} {im.mode} would take {decoded / 1e6:,.0f} MB to decode, "
                         f"over {MAX_DECODED // 1_000_000} MB; save it as 8-bit grey or shrink it first")


def _check_icon(opened: Path | io.BytesIO, name: str) -> None:
    """An ICO file holds PNG or BMP frames whose real size is in their own headers, not in the icon's
    directory: read those headers (not the pixels) and refuse a frame too large."""
    from PIL import BmpImagePlugin, IcoImagePlugin, PngImagePlugin

    with open(opened, "rb") if isinstance(opened, Path) else contextlib.nullcontext(opened) as f:
        icon = IcoImagePlugin.IcoFile(f)
        for entry in icon.entry:
            f.seek(entry.offset)
            png = f.read(8) == PngImagePlugin._MAGIC
            f.seek(entry.offset)
            frame = PngImagePlugin.PngImageFile(f) if png else BmpImagePlugin.DibImageFile(f)
            _check_size(frame, name)
        f.seek(0)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _libtiff_quiet():
    """libtiff writes its complaints about a damaged TIFF straight to file descriptor 2, past Python's
    warnings. For a TIFF, point descriptor 2 elsewhere while it is decoded (a lock keeps threads in
    turn; other output in that moment is lost, so this is done for TIFFs alone)."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def grey_picture(im: Image.Image) -> Image.Image:
    """A decoded picture as grey: "L", or "F" in [0, 1] for deep greys (16 bits against their full
    range, floating point against the range of their finite values: NaN is paper, infinities the ends).
    Transparency is composited onto white. Converted a strip of rows at a time, so that a large
    picture costs its own size and the grey copy's, not a colour copy besides."""
    if im.mode in DEEP_MODES:
        return _deep_grey(im)
    if im.mode == "L":
        return im
    transparent = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info)
    if transparent and im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema() == (255, 255):
        transparent = False  # opaque all over, as a canvas drawing is: nothing to composite
    if im.height <= STRIP:  # small enough to convert at once
        return _grey_strip(im, transparent)
    grey = Image.new("L", im.size, 255)
    for top in range(0, im.height, STRIP):
        grey.paste(_grey_strip(im.crop((0, top, im.width, min(im.height, top + STRIP))), transparent), (0, top))
    return grey


def _grey_strip(strip: Image.Image, transparent: bool) -> Image.Image:
    if not transparent:
        return strip.convert("L")
    strip = strip.convert("RGBA") if strip.mode not in ("LA", "RGBA") else strip
    grey = Image.new("L", strip.size, 255)
    grey.paste(strip.convert("L"), mask=strip.getchannel("A"))  # ink over white paper
    return grey


def _deep_grey(im: Image.Image) -> Image.Image:
    def rows(top: int) -> np.ndarray:
        return np.array(im.crop((0, top, im.width, min(im.height, top + STRIP))), dtype=np.float32)

    if im.mode == "F":  # floats: their own range, from the finite values
        low, high, sample = np.inf, -np.inf, []
        for top in range(0, im.height, STRIP):
            values = rows(top)
            finite = values[np.isfinite(values)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
                sample.append(finite[::97].copy())  # not a view: the strip goes
        paper = float(np.median(np.concatenate(sample))) if sample else 0.0
        span = high - low if high > low else np.inf  # one value, or none: all paper
    else:
        wide = im.mode.startswith("I;16") or im.getextrema()[1] > 255  # type: ignore[operator]  # one band
        low, span = 0.0, 65535.0 if wide else 255.0
    grey = Image.new("F", im.size)
    for top in range(0, im.height, STRIP):
        values = rows(top)
        if im.mode == "F":
            with np.errstate(invalid="ignore", over="ignore"):
                np.nan_to_num(values, copy=False, nan=paper, posinf=high, neginf=low)
        grey.paste(Image.fromarray(np.clip((values - low) / span, 0, 1, dtype=np.float32)), (0, top))
    return grey


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
            raise UserError(f"no such file or folder: '{one_line(str(p))}'; give pictures of digits (a photo, a scan "
                            "or a drawing: PNG, JPEG, ...) or folders of them")
    return files
