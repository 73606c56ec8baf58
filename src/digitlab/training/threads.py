"""How many threads a training process computes with.

PyTorch takes one thread per core. On a machine whose cores are busy with other work that is a
cliff, not a slope: its threads wait for each other at every operation, and a step that runs
on a core that another process holds waits for that process. Measured on a 2-core VM with one
other process busy (benchmarks/threads.py): 2 threads ran the fast recipe's steps at 0.43x the
speed of 1 thread. So a run looks at the machine when it starts: one thread per core that is not
busy (the processes running right now, looked at a few times), at least one.

`--threads N` decides instead; then a resumed run's own count (another count sums in another
order, and a resumed run is meant to repeat its steps bit for bit); then $OMP_NUM_THREADS
(PyTorch has read it already; torchrun and `--nproc` set it); then $DIGITLAB_THREADS.
"""
from __future__ import annotations

import os

ENV = "DIGITLAB_THREADS"  # a count for every digitlab process (the tests fix it, so runs compare bit for bit)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(samples: int = 5, every: float = 0.01) -> float:
    """How many cores other processes keep busy now: the processes running (less this one), looked at
    `samples` times `every` seconds apart, the median; 0 where the system does not say. (Not the load
    average: it remembers the last minute, so a run started after another would see that one.)"""
    import statistics
    import time

    counts = []
    try:
        for k in range(samples):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            if k < samples - 1:
                time.sleep(every)
    except (OSError, ValueError, IndexError):
        return 0.0
    return float(statistics.median(counts))


def choose(asked: int | None = None, saved: int | None = None) -> tuple[int, str | None]:
    """The thread count for this run, and a line to tell the user when it is not what they would assume
    (None otherwise): `asked` (--threads), else `saved` (a resumed run's), else $DIGITLAB_THREADS or
    $OMP_NUM_THREADS, else one per core that is not busy."""
    import torch

    cores = usable_cores()
    if asked or saved:
        return asked or saved or cores, None
    if os.environ.get("OMP_NUM_THREADS"):  # PyTorch read it when it started (torchrun and --nproc set it)
        return torch.get_num_threads(), None
    if os.environ.get(ENV, "").isdigit() and int(os.environ[ENV]) > 0:
        return int(os.environ[ENV]), None
    busy = busy_cores()
    free = max(1, min(cores, int(cores - busy + 0.5)))
    if free == cores:
        return cores, None
    return free, (f"the machine is busy ({busy:.0f} other processes running on {cores} cores): training on "
                  f"{free} thread{'s' * (free > 1)}; --threads N chooses")


def apply(count: int) -> None:
    import torch

    torch.set_num_threads(count)
