"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""
from __future__ import annotations

import contextlib
import io
import tempfile


def quiet_run(config, data):
    """digitlab.train.run() into a throw-away folder, without its log lines."""
    from digitlab.train import run

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        return run(config, data, out)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"
