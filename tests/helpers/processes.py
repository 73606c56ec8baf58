"""What a process tree costs (tests and benchmarks only: nothing here ships in the wheel)."""
from __future__ import annotations

import re
from pathlib import Path


def tree_peak_mb(pid: int) -> float:
    """The peak memory (VmHWM) of a process and of every process under it, added up: a server and
    its picture workers."""
    total, todo = 0.0, [pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:  # it ended meanwhile
            continue
        total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        todo += children
    return total
