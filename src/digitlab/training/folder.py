"""A run folder's files, and claiming a folder for one run (a lock, no overwriting by accident,
no half-written run left behind)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from digitlab.config import CONFIG_FILE
from digitlab.errors import UserError
from digitlab.files import PART_SUFFIX, one_line, prepare_out_dir
from digitlab.reading.checkpoint import BEST_FILE, WEIGHTS_FILE

STATE_FILE = "state.safetensors"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
# Everything a run (and `evaluate` on it) writes into its folder; --overwrite removes these.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, BEST_FILE, STATE_FILE, HISTORY_FILE, METRICS_FILE, "loss.png", "loss.svg",
             "confusion.png", "confusion.svg", "worst.png", "worst.svg", TENSORBOARD_DIR)


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds (part of) a run already, or a comparison's results."""
    return any((folder / name).exists() for name in (*RUN_FILES, "results.json"))


def holds_training(folder: Path) -> bool:
    """Whether `folder` is a training run's own (its state, weights or history), not a comparison's."""
    return any((folder / name).exists() for name in (STATE_FILE, WEIGHTS_FILE, HISTORY_FILE))


def fresh_run_dir(base: str | os.PathLike) -> Path:
    """`base` if it holds no run yet, else the first of base-2, base-3, ... that holds none."""
    base = Path(base)
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@contextlib.contextmanager
def claim(out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Make `out_dir` this run's own for as long as the block runs.

    Refuses a folder that holds another run (unless `overwrite`, which removes that run's
    files first) and one that another process is training into (a lock), sweeps stale
    temporary files a killed run left, and if the block fails before a state was saved,
    removes what it wrote (and the folder, if it made it): no half-written run is left.
    """
    from filelock import FileLock, Timeout

    created = not out_dir.exists()
    out_dir = prepare_out_dir(out_dir)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"'{one_line(str(out_dir))}' is in use: another digitlab run is writing into it; wait "
                        "for it to finish or choose another --out") from None
    try:
        if not resume and holds_run(out_dir):
            if not overwrite:
                raise UserError(f"'{one_line(str(out_dir))}' holds a run already; pass --overwrite to replace it, "
                                "--resume to continue it, or --out for another folder")
            for name in RUN_FILES:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for litter in out_dir.glob(f".*{PART_SUFFIX}"):  # from a run killed while it saved
            litter.unlink(missing_ok=True)
        try:
            yield out_dir
        except BaseException:
            if not (out_dir / STATE_FILE).exists():
                for name in RUN_FILES:
                    path = out_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise
    finally:
        lock.release()
