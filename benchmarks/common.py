"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""
from __future__ import annotations

import tempfile


def quiet_run(config, data, out=None, resume=False):
    """digitlab.training.run.run() silently, into `out` or a throw-away folder."""
    from digitlab.training.reporters import Reporter
    from digitlab.training.run import run

    if out is not None:
        return run(config, data, out, resume=resume, reporter=Reporter())
    with tempfile.TemporaryDirectory() as out:
        return run(config, data, out, reporter=Reporter())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"
