"""What a process tree costs (tests and benchmarks only: nothing here ships in the wheel)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable


def _tree_sum(pid: int, of: Callable[[int], float]) -> float:
    """`of(pid)` added up over a process and every process under it: a server and its picture workers."""
    total, todo = 0.0, [pid]
    while todo:
        pid = todo.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]
            total += of(pid)
        except OSError:  # it ended meanwhile
            continue
        todo += children
    return total


def tree_peak_mb(pid: int) -> float:
    """The peak memory (VmHWM) of a process tree, added up (a zombie has none: 0)."""
    def peak(p: int) -> float:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        return int(found.group(1)) / 1024 if found else 0.0

    return _tree_sum(pid, peak)


def tree_cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) that a process tree has taken so far, added up: of the processes
    alive now (one that ended meanwhile is not counted)."""
    def cpu(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    return _tree_sum(pid, cpu)
