"""The IDX file format that MNIST comes in (http://yann.lecun.com/exdb/mnist/, LeCun et al., 1998):
a big-endian header (magic number, then one uint32 per dimension) followed by raw uint8 data.
Files are read as a stream, gzipped or not, and a header that promises more than MAX_IDX_BYTES
is refused before anything is allocated."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import torch

from digitlab.errors import UserError
from digitlab.files import one_line

IMAGE_MAGIC = 2051  # 0x00000803: uint8 data, 3 dimensions (count, rows, cols)
LABEL_MAGIC = 2049  # 0x00000801: uint8 data, 1 dimension (count)
ROWS = COLS = 28  # every MNIST image


class DataError(UserError):
    """A data file or folder that is missing or malformed."""


# MNIST-style sets are a few hundred MB at most: MNIST's training images are 47 MB, EMNIST's
# largest file 547 MB. A header that promises more is not such a set.
MAX_IDX_BYTES = 600 * 1024**2


def _open(path: Path):
    """The file's bytes as a stream, decompressed as it is read when it is gzip (decided by content)."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"'{one_line(str(path))}' {what}")
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one MNIST IDX file, gzipped or raw, into a uint8 tensor.

    Images come back as (N, 28, 28), labels as (N,). Anything that is not a well-formed
    MNIST file raises DataError naming the file and the defect. The file is read as a
    stream: the header first, then at most the promised size plus one byte, so a small
    file that decompresses to gigabytes costs no more memory than a real MNIST file.
    """
    path = Path(path)
    name = one_line(str(path))
    try:
        with _open(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"{name}: truncated: {len(head)} bytes is shorter than an IDX header")
            (magic,) = struct.unpack(">I", head[:4])
            if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
                raise DataError(
                    f"{name}: bad magic number {magic}; expected {IMAGE_MAGIC} (images) or {LABEL_MAGIC} (labels)")
            ndim = 3 if magic == IMAGE_MAGIC else 1
            rest = f.read(4 * (ndim - 1))
            if len(rest) < 4 * (ndim - 1):
                raise DataError(f"{name}: truncated: the header needs {4 + 4 * ndim} bytes")
            dims = struct.unpack(f">{ndim}I", head[4:] + rest)
            if ndim == 3 and dims[1:] != (ROWS, COLS):
                raise DataError(f"{name}: images are {dims[1]}x{dims[2]}; MNIST images are {ROWS}x{COLS}")
            if dims[0] == 0:
                raise DataError(f"{name}: the header promises 0 items; an empty set cannot be used")
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{name}: the header promises {dims[0]:,} items ({expected:,} bytes), more than "
                                f"any MNIST-style set ({MAX_IDX_BYTES // 1024**2} MB at most)")
            body = bytearray(expected + 1)  # one byte more than promised reveals trailing data
            got = f.readinto(body)  # a buffered reader fills the buffer unless the data ends first
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{name}: broken gzip data ({e}); download the file again") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    if got != expected:
        what, held = ("truncated", f"{got:,} bytes") if got < expected else ("trailing bytes", "more")
        raise DataError(f"{name}: {what}: the header promises {dims[0]:,} items ({expected:,} bytes), "
                        f"the file holds {held}")
    return torch.frombuffer(body, dtype=torch.uint8, count=expected).reshape(dims)
