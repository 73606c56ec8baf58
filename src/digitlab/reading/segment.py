"""Predicting a person's own handwriting: a photo, a scan or a drawing, turned into MNIST.

A network trained on MNIST has only ever seen digits prepared one way (LeCun et al.,
1998): white ink on black, the digit scaled to fit a 20x20 box with its aspect kept, and
placed in 28x28 so that its centre of mass sits at the centre. A naive resize of a whole
photo gives it dark ink on grey paper, tiny and off-centre. `find_digits` repeats the
MNIST recipe on any picture, for every digit in a row:

1. grey scale; transparency composited onto white; EXIF rotation applied (`image.open_grey`);
2. find the ink on a working copy of at most WORK_SIZE pixels on its short side (a photo's
   12 megapixels are not needed to see where its digits are): even out the lighting by
   subtracting the paper's shade (a heavy blur, taken on a PAPER_SIZE copy and scaled back up);
3. decide the ink's polarity: the ink is the minority on either side of Otsu's threshold;
4. keep the ink: Otsu's threshold, grown into fainter ink that touches it (hysteresis);
5. group the connected blobs into digits, left to right (`segment`: broken strokes stay
   together, specks go, digits joined by a short stroke are cut apart);
6. crop each digit (a digit small in the working copy is cut from the picture itself, at up
   to DETAIL pixels), bring its strokes to MNIST's width (a hairline thickened, a felt-tip
   thinned), scale it into 20x20 keeping the aspect ratio, and paste it into 28x28 with its
   centre of mass at the centre.

`preprocess` does the same for a picture of one digit. `read_digits` gives each prepared
digit the model's answer, with a confidence calibrated by the checkpoint's temperature and
a `sure` flag (the confidence reaches the threshold).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from digitlab.reading.blobs import MIN_BLOB, segment, sizes
from digitlab.reading.image import ImageError, grey_array

BOX = 20  # MNIST digits fit a 20x20 box ...
SIZE = 28  # ... centred in 28x28
WORK_SIZE = 128  # short side of the working copy where the ink is found ...
MAX_WORK_SIZE = 512  # ... and its long side at most (a row of digits)
INK_HEIGHT = 64  # ink shorter than this in the working copy is looked at again, larger ...
FINE_SIZE = 256  # ... up to this short side ...
MAX_FINE_SIZE = 1024  # ... and this long side
PAPER_SIZE = 32  # the paper's shade is a blur of a copy this big (long side), scaled back up
DETAIL = 128  # a digit is cut from the picture at up to this many pixels (long side): 6x MNIST's 20
MIN_CONTRAST = 0.08  # ink must differ from the paper by this much (of full scale)
FAINT = 0.6  # fainter ink down to this fraction of the threshold counts where it touches clear ink
# MNIST's strokes are 0.14 of a digit's long side wide (the median of 20,000 training digits, measured as
# mnist_stroke measures them); a tenth are under THINNEST, a twentieth over THICKEST. Strokes outside that
# range are brought to its nearest end: on the handwriting measuring set, the single digits read right
# went from 97.5% to 98.2%, the whole numbers from 94.0% to 96.5%, the felt-tip digits of the degraded set
# from 80.7% to 92.7% (a fast-preset model; benchmarks/handwriting.py).
THINNEST, THICKEST = 0.11, 0.22
BACKGROUND = 2.5  # ink at the picture's edge this many times thicker than the writing is a filled region
SHADOW = 0.5  # ink along the edge this long (of the picture's long side) may be a shadow's


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (1979): the cut that maximises the between-class variance."""
    low, high = float(values.min()), float(values.max()) + 1e-6
    width = (high - low) / bins
    hist = np.bincount(np.minimum(((values.ravel() - low) / width).astype(np.intp), bins - 1), minlength=bins)
    centers = low + width * (np.arange(bins) + 0.5)
    weight = hist.cumsum()
    mean = (hist * centers).cumsum()
    w1 = weight[-1] - weight
    valid = (weight > 0) & (w1 > 0)
    between = np.zeros_like(centers)
    m0 = mean[valid] / weight[valid]
    m1 = (mean[-1] - mean[valid]) / w1[valid]
    between[valid] = weight[valid] * w1[valid] * (m0 - m1) ** 2
    return float(centers[int(between.argmax())])


class _Ink:
    """How strongly each pixel of a picture is ink, in [0, 1] of the grey scale (0 = paper): the
    picture less the paper's shade, turned so that ink is positive, less the median. Found on the
    working copy; `cut` applies the same to a piece of the picture itself."""

    def __init__(self, grey: np.ndarray, window: int = 0, sign: float = 0.0):
        from scipy import ndimage

        h, w = grey.shape
        if window:  # the paper as the ink's envelope: what is left of the page when strokes narrower
            # than `window` are filled in with the paper around them (a shadow's edge stays sharp)
            envelope = ndimage.grey_closing if sign < 0 else ndimage.grey_opening
            self.paper = envelope(grey, size=window, mode="nearest")
        else:  # wider than a stroke, narrower than a lighting gradient
            k = min(1.0, PAPER_SIZE / max(h, w))
            coarse = _resize(grey, (max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BOX)
            self.paper = ndimage.gaussian_filter(coarse, max(coarse.shape) / 8)
        flat = grey - _resize(self.paper, (w, h), Image.Resampling.BILINEAR)  # dark ink < 0 < light ink
        # Polarity: the ink is the minority class on either side of Otsu's threshold.
        t = otsu_threshold(flat)
        self.sign = sign or (1.0 if (flat > t).mean() < 0.5 else -1.0)
        ink = self.sign * flat
        self.offset = float(np.median(ink))
        self.map = ink - self.offset

    def cut(self, picture: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
        """The ink of `box` (x0, y0, x1, y1 in the picture's pixels) cut from the picture itself, at up
        to DETAIL pixels on its long side."""
        x0, y0, x1, y1 = box
        k = min(1.0, DETAIL / max(x1 - x0, y1 - y0))
        size = (max(1, round((x1 - x0) * k)), max(1, round((y1 - y0) * k)))
        grey = grey_array(picture.resize(size, Image.Resampling.BOX, box=box) if k < 1 else picture.crop(box))
        # the paper's shade over the box: its coarse copy covers the whole picture
        h, w = picture.height, picture.width
        ph, pw = self.paper.shape
        paper = Image.fromarray(self.paper).resize(size, Image.Resampling.BILINEAR,
                                                    box=(x0 * pw / w, y0 * ph / h, x1 * pw / w, y1 * ph / h))
        return self.sign * (grey - np.asarray(paper, dtype=np.float32)) - self.offset


def _resize(values: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """A float32 (H, W) array resized to `size` (W, H)."""
    if size == (values.shape[1], values.shape[0]):
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(size, resample), dtype=np.float32)


@dataclass
class Found:
    """One digit found in a picture: the 28x28 the network sees, and its box in the picture."""

    image: np.ndarray  # (28, 28) uint8, ink 255
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the picture's pixels (x1, y1 exclusive)


def preprocess(grey: np.ndarray | Image.Image, source: str = "image") -> np.ndarray:
    """A grey picture of one digit -> a 28x28 uint8 MNIST-style digit (ink = 255)."""
    return find_digits(grey, source, single=True)[0].image


def find_digits(grey: np.ndarray | Image.Image, source: str = "image", single: bool = False) -> list[Found]:
    """The digits in a grey picture, left to right, each prepared as MNIST's. The picture is an
    `image.open_grey` picture, or a float (H, W) array in [0, 1].

    Connected ink is grouped into digits (`segment`); `single` takes all the ink as one digit.
    The working copy's scale comes from the ink's size: a first look at WORK_SIZE; where the largest
    blob of ink is shorter than INK_HEIGHT there (or there is none), the ink is looked for again at
    up to FINE_SIZE.
    """
    picture = grey if isinstance(grey, Image.Image) else Image.fromarray(np.asarray(grey, dtype=np.float32))
    w, h = picture.size
    scale = min(1.0, WORK_SIZE / min(h, w), MAX_WORK_SIZE / max(h, w))
    fine = min(1.0, FINE_SIZE / min(h, w), MAX_FINE_SIZE / max(h, w))
    try:
        pieces, ink, faint, height = _find_ink(picture, scale, source, single)
    except ImageError:  # nothing found: look again, finer, where the picture allows
        if fine <= scale:
            raise
        height = 0
    if height < INK_HEIGHT and fine > scale:
        pieces, ink, faint, _ = _find_ink(picture, scale := fine, source, single)
    return [_digit(picture, ink, keep, scale, faint) for keep in pieces]


def _find_ink(picture: Image.Image, scale: float, source: str,
              single: bool) -> tuple[list[np.ndarray], _Ink, float, int]:
    """The digits' ink in a working copy of the picture at `scale`: their masks, the ink, the faint
    ink's threshold, and the height of the largest blob of ink (the size of the writing)."""
    from scipy import ndimage

    w, h = picture.size
    work = picture.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX) \
        if scale < 1 else picture  # box filtering keeps thin strokes
    if scale > 0.5:  # salt-and-pepper noise; shrinking by 2 or more averages it away already
        work = work.filter(ImageFilter.MedianFilter(3))
    grey = grey_array(work)
    ink = _Ink(grey)
    if ink.map.max() < MIN_CONTRAST:
        raise ImageError(f"{source}: no digit found (the page looks blank)")
    labels, count, threshold = _strong_ink(ink)
    window = _shadow_window(labels, count)
    if window:  # ink along the picture's edge: a shadow whose edge the blurred paper cannot follow
        shaded = _Ink(grey, window, ink.sign)
        found = _strong_ink(shaded)
        if found[1]:  # a solid shape at the edge, and nothing else, is what was written
            ink, (labels, count, threshold) = shaded, found
    labels, count = _without_background(labels, count)
    if count == 0:
        raise ImageError(f"{source}: no digit found (the page looks blank)")
    blob_sizes = sizes(labels, count)
    rows = ndimage.find_objects(labels)[int(blob_sizes.argmax())][0]
    if single:
        pieces = [np.isin(labels, 1 + np.flatnonzero(blob_sizes >= MIN_BLOB * blob_sizes.max()))]
    else:
        pieces = segment(labels, count, source)
    if not pieces:
        raise ImageError(f"{source}: no digit found (only marks too small or too thin to be digits)")
    return pieces, ink, FAINT * threshold, rows.stop - rows.start


def _strong_ink(ink: _Ink) -> tuple[np.ndarray, int, float]:
    """Hysteresis: the blobs of ink above Otsu's threshold, grown into fainter ink touching them (a thin
    or light stroke stays in one piece); their labels, count, and the threshold."""
    from scipy import ndimage

    threshold = max(otsu_threshold(ink.map), MIN_CONTRAST / 2)
    labels, count = ndimage.label(ink.map > FAINT * threshold)
    inked = np.unique(labels[ink.map > threshold])  # all labelled: strong ink is over the faint threshold
    renumber = np.zeros(count + 1, dtype=labels.dtype)  # the blobs with strong ink, numbered 1..count
    renumber[inked] = np.arange(1, len(inked) + 1)
    return renumber[labels], len(inked), threshold


def _blob_shapes(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each labelled blob: whether it touches the picture's edge, its extent (the long side of its
    box), and its thickness (the radius of the widest disc inside it)."""
    from scipy import ndimage

    h, w = labels.shape
    boxes = ndimage.find_objects(labels)
    edge = np.array([r.start == 0 or c.start == 0 or r.stop == h or c.stop == w for r, c in boxes], dtype=bool)
    extent = np.array([max(r.stop - r.start, c.stop - c.start) for r, c in boxes], dtype=int)
    thickness = np.asarray(ndimage.maximum(ndimage.distance_transform_edt(labels > 0), labels,
                                           index=np.arange(1, count + 1)), dtype=float).reshape(count)
    return edge, extent, thickness


def _shadow_window(labels: np.ndarray, count: int) -> int:
    """Where ink runs along the picture's edge for SHADOW of its long side or more (a shadow's edge, or a
    dark band the blurred paper left), the window for the paper as the ink's envelope: just wider than
    the writing's thickest stroke away from the edge (0: no such ink)."""
    edge, extent, thickness = _blob_shapes(labels, count)
    if not (edge & (extent >= SHADOW * max(labels.shape))).any():
        return 0
    radius = thickness[~edge].max() if (~edge).any() else max(labels.shape) / 40
    return 2 * math.ceil(2 * radius) + 1


def _without_background(labels: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """The labelled blobs less those that touch the picture's edge and are far thicker than the writing
    (their thickness over BACKGROUND times that of any ink away from the edge): a filled region, such as
    the table or the dark background at the edge of a tilted photo, not pen strokes."""
    edge, _, thickness = _blob_shapes(labels, count)
    if edge.all() or not edge.any():
        return labels, count
    keep = np.concatenate([[True], ~(edge & (thickness > BACKGROUND * thickness[~edge].max()))])  # [0]: paper
    renumber = np.zeros(count + 1, dtype=labels.dtype)
    renumber[keep] = np.arange(int(keep.sum()))
    return renumber[labels], int(keep.sum()) - 1


def _digit(picture: Image.Image, ink: _Ink, keep: np.ndarray, scale: float, faint: float) -> Found:
    """The digit whose ink is `keep` (a mask of the working copy): its ink strength inside its blobs
    (grown by a pixel for the anti-aliased edge), 0 elsewhere. A digit shorter than INK_HEIGHT in
    the working copy is cut from the picture itself, at a finer scale: its blobs there are the ink
    over `faint` within the working copy's blobs (grown by a pixel): which ink is whose comes from
    the working copy, the strokes' shape from the picture."""
    ys, xs = np.nonzero(keep)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    w, h = picture.size
    box = (int(x0 / scale), int(y0 / scale), min(w, math.ceil(x1 / scale)), min(h, math.ceil(y1 / scale)))
    inside = keep[y0:y1, x0:x1]
    region = _grown(inside)  # nothing of `keep` is outside its box
    if scale == 1 or y1 - y0 >= INK_HEIGHT:  # the working copy has the detail
        strength = ink.map[y0:y1, x0:x1]
    else:
        strength = ink.cut(picture, box)
        size = (strength.shape[1], strength.shape[0])
        near = np.asarray(Image.fromarray(region).resize(size, Image.Resampling.NEAREST))
        inside = near & (strength > faint)
        region = _grown(inside) & near
    top = np.percentile(strength[inside], 90) if inside.any() else 0.0
    strength = np.clip(strength / top, 0, 1) * region if top > 0 else np.zeros_like(strength)
    return Found(mnist_digit(strength), box)


def _grown(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by a pixel, within its own bounds (the anti-aliased edge of its strokes)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def mnist_stroke(crop: np.ndarray) -> np.ndarray:
    """The digit's strokes brought into MNIST's range of widths: a ballpoint's hairline thickened (it
    would fade to a grey trace at 20x20, and a thin 7 reads as a 1), a felt-tip's thinned (its loops
    would close up). The width is 2 x area / outline of the ink (a stroke of width w and length L:
    area wL, outline 2L), as a share of the digit's long side, against MNIST's: THINNEST to THICKEST.
    Thickening never closes a loop, and thinning never breaks a stroke in two: where it would, the
    strokes are changed by less, or left as they are."""
    from scipy import ndimage

    ink = crop > 0.5
    area = int(ink.sum())
    if not area:
        return crop
    width = 2 * area / max(1, area - int(ndimage.binary_erosion(ink).sum())) / max(crop.shape)
    if THINNEST <= width <= THICKEST:
        return crop
    thicken = width < THINNEST
    grow = ndimage.grey_dilation if thicken else ndimage.grey_erosion
    pieces, loops = _shape(ink)
    target = THINNEST if thicken else THICKEST  # the nearest width in MNIST's range
    for radius in range(round(abs(width - target) * max(crop.shape) / 2), 0, -1):  # none under half a pixel
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        changed = grow(crop, footprint=xx ** 2 + yy ** 2 <= radius ** 2)
        after = _shape(changed > 0.5)
        if (after[1] >= loops) if thicken else (after[0] <= pieces):
            return changed
    return crop


def _shape(ink: np.ndarray) -> tuple[int, int]:
    """The pieces of ink of a digit, and its loops (paper that the ink closes in: holes not open to the edge)."""
    from scipy import ndimage

    paper, regions = ndimage.label(~ink)
    open_to_edge = np.unique(np.concatenate([paper[0], paper[-1], paper[:, 0], paper[:, -1]]))
    return ndimage.label(ink)[1], regions - int((open_to_edge > 0).sum())


def mnist_digit(crop: np.ndarray) -> np.ndarray:
    """Ink strength (h, w) in [0, 1], cropped to the digit -> MNIST's 28x28 uint8: strokes of MNIST's
    width, scaled into a 20x20 box with its aspect kept, then placed so that its centre of mass is at
    the centre."""
    from scipy import ndimage

    crop = mnist_stroke(crop)
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
