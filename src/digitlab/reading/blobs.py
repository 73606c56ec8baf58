"""Which blobs of ink make which digit: the grouping step of reading a row of digits (`segment`).

Given the connected blobs of ink of a picture (labelled), broken strokes are put back together,
specks and dots are dropped or attached, and digits joined by a short stroke are cut apart.
"""
from __future__ import annotations

import numpy as np

from digitlab.reading.image import ImageError

MIN_BLOB = 0.08  # a blob smaller than this fraction of the largest one is not a stroke of its own ...
MIN_SPECK = 0.01  # ... but one down to this joins the digit above or below it; smaller ones are noise
MIN_HEIGHT = 0.4  # a group of ink less tall than this fraction of the tallest is not a digit (a dot, a dash)
SHARED = 0.3  # blobs whose columns overlap by this fraction of the narrower one's width are one digit
PART = 0.3  # a blob under this fraction of another's ink joins it when their columns overlap a little ...
TOUCH = 0.04  # ... or they are at most this fraction of the tallest blob's height apart
NEAR = 0.15  # a short piece this close to a digit (in heights of the tallest blob) is part of it
JOINED = 1.15  # ink wider than this times its height may be digits that touch (see _cuts) ...
SEVERAL = 2.4  # ... and wider than this times its height is
THIN = 0.3  # a stroke that joins two digits is at most this fraction of their height
TALL = 0.6  # each side of a cut must be this fraction of the blob's height (not a 5's bar, a 1's flag)
DIGIT_WIDTH = 0.72  # digits are about this wide per height
MAX_BLOBS = 100  # more separate strokes than this is no row of digits


def sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """The pixel count of each of the `count` labelled blobs."""
    return np.bincount(labels.ravel(), minlength=count + 1)[1:]


def segment(labels: np.ndarray, count: int, source: str = "image") -> list[np.ndarray]:
    """Masks of the digits in a labelled ink mask, left to right.

    1. Blobs of at least MIN_BLOB of the largest one are strokes; blobs whose columns overlap
       by SHARED of the narrower one's width belong to one digit (a 5 whose bar is written apart,
       a 4 or a 7 in two strokes), and so does a blob under PART of another's ink that
       overlaps it a little or touches it.
    2. Groups shorter than MIN_HEIGHT of the tallest blob join the digit beside them when
       they are NEAR it (a piece of stroke broken off), and are dropped otherwise.
    3. Smaller blobs down to MIN_SPECK join the digit whose columns they overlap (the dot a
       pen leaves); the rest, a full stop among them, are noise.
    4. A group much wider than tall is two or more digits joined by a stroke: it is cut at the
       columns with the least ink near the even cuts (see `_cuts`).
    """
    blobs = _Blobs(labels, count)
    big = [i for i in range(count) if blobs.sizes[i] >= MIN_BLOB * blobs.sizes.max()]
    if len(big) > MAX_BLOBS:  # a page of text or a texture, not a row of digits (and pairs of them cost time)
        raise ImageError(f"{source}: {len(big)} separate marks of similar size; digitlab reads one row of digits: "
                         "crop the picture to them")
    blobs.tallest = max(blobs.height([i]) for i in big)  # of strokes, not a line
    digits = _attach_pieces(blobs, _group_strokes(blobs, big), set(big))
    pieces = []
    for m in (np.isin(labels, [i + 1 for i in m]) for m in digits.values()):
        cols = np.nonzero(m.any(0))[0]
        x0, x1 = cols.min(), cols.max() + 1
        cuts = _cuts(m[:, x0:x1]) + x0
        for a, b in zip([x0, *cuts], [*cuts, x1]):
            piece = np.zeros_like(m)
            piece[:, a:b] = m[:, a:b]
            if piece.any():
                pieces.append(piece)
    return sorted(pieces, key=lambda p: np.nonzero(p.any(0))[0].mean())


class _Blobs:
    """The labelled blobs of ink: their sizes, bounding boxes and column spans, and how groups of
    them (lists of blob indices) sit against each other."""

    def __init__(self, labels: np.ndarray, count: int):
        from scipy import ndimage  # imported here: scipy loads slowly, and only pictures need it

        self.count, self.sizes = count, sizes(labels, count)
        self.slices = ndimage.find_objects(labels)
        self.spans = [(sl[1].start, sl[1].stop) for sl in self.slices]  # columns of each blob
        self.tallest = 0

    def span(self, m: list[int]) -> tuple[int, int]:
        return min(self.spans[i][0] for i in m), max(self.spans[i][1] for i in m)

    def height(self, m: list[int]) -> int:
        return max(self.slices[i][0].stop for i in m) - min(self.slices[i][0].start for i in m)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Shared columns as a fraction of the narrower span; below 0 when apart."""
    return (min(a[1], b[1]) - max(a[0], b[0])) / max(1, min(a[1] - a[0], b[1] - b[0]))


def _gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(a[0], b[0]) - min(a[1], b[1])  # columns between them; 0 or less when they overlap


def _group_strokes(blobs: _Blobs, big: list[int]) -> dict[int, list[int]]:
    """Step 1: strokes whose columns overlap enough, or a small stroke on or touching a larger one, are
    one digit; returns the groups, keyed by their first stroke."""
    group = {i: i for i in big}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    sizes, spans = blobs.sizes, blobs.spans
    for n, i in enumerate(big):
        for j in big[n + 1:]:
            shared = _overlap(spans[i], spans[j])
            small = min(sizes[i], sizes[j]) < PART * max(sizes[i], sizes[j])
            if shared >= SHARED or (small and (shared > 0.1 or _gap(spans[i], spans[j]) <= TOUCH * blobs.tallest)):
                group[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in big:
        members.setdefault(root(i), []).append(i)
    return members


def _attach_pieces(blobs: _Blobs, members: dict[int, list[int]], strokes: set[int]) -> dict[int, list[int]]:
    """Steps 2 and 3: short groups join the digit beside them (a stroke the pen broke off) or are
    dropped; specks join the digit whose columns they overlap (a pen's dot), or are noise."""
    tall = {r: m for r, m in members.items() if blobs.height(m) >= MIN_HEIGHT * blobs.tallest}
    for r, m in members.items():
        if r not in tall and tall:
            near = min(tall, key=lambda t: _gap(blobs.span(m), blobs.span(tall[t])))
            if _gap(blobs.span(m), blobs.span(tall[near])) <= NEAR * blobs.tallest:
                tall[near] = tall[near] + m
    for i in range(blobs.count):
        if i not in strokes and blobs.sizes[i] >= MIN_SPECK * blobs.sizes.max() and tall:
            best = max(tall, key=lambda r: _overlap(blobs.spans[i], blobs.span(tall[r])))
            if _overlap(blobs.spans[i], blobs.span(tall[best])) > 0:
                tall[best] = tall[best] + [i]
    return tall


def _cuts(mask: np.ndarray) -> np.ndarray:
    """Columns at which to cut a blob of ink (h, w), cropped to its columns, into digits that touch.

    A blob up to JOINED times as wide as tall is one digit. A wider one holds k = width /
    (DIGIT_WIDTH x height) digits; each cut goes at the column with the least ink within a
    third of a digit of the even cut. Below SEVERAL times as wide as tall, a cut is made only
    where a single short stroke (at most THIN of the height) joins the parts: the middle of a
    wide 0 has two strokes, its top and its bottom, and stays whole. Either side of a cut must
    be TALL: a 5's long bar or a 1's long flag is no digit of its own.
    """
    rows = np.nonzero(mask.any(1))[0]
    height, width = rows.max() - rows.min() + 1, mask.shape[1]
    if width <= JOINED * height or height < 2:  # not wide, or a line: nothing to cut
        return np.array([], dtype=int)
    ink = mask.sum(0)
    k = max(2, round(width / (DIGIT_WIDTH * height)))
    reach = max(1, width // (3 * k))

    def tall(a: int, b: int) -> bool:  # a digit's part, not a flag or a bar sticking out
        part = np.nonzero(mask[:, a:b].any(1))[0]
        return len(part) > 0 and part.max() - part.min() + 1 >= TALL * height

    cuts = []
    for i in range(1, k):
        even = i * width // k
        lo, hi = max(1, even - reach), min(width - 1, even + reach)
        if hi <= lo:
            continue
        c = lo + int(np.argmin(ink[lo:hi] + np.abs(np.arange(lo, hi) - even) * 1e-3))
        runs = np.count_nonzero(np.diff(mask[:, c].astype(np.int8)) == 1) + int(mask[0, c])
        joined = width > SEVERAL * height or (runs <= 1 and ink[c] <= THIN * height)
        if joined and tall((i - 1) * width // k, c) and tall(c, (i + 1) * width // k):
            cuts.append(c)
    return np.array(cuts, dtype=int)
