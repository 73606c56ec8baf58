"""A real virtual environment holding only what a requirements file needs, built offline.

`pip install -r FILE` would fetch from PyPI; the tests build the same environment from the
distributions already installed here: the requirements' dependency closure (read from each
distribution's metadata, markers evaluated) is linked into a fresh venv, and digitlab is put on
its path without its own dependencies, as `pip install --no-deps -e .` does. What is not in the
closure (PyTorch, for the ONNX server) is not importable there.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that `requirements` pull in, by normalised name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in found:
            continue
        dist = metadata.distribution(requirement.name)
        found[name] = dist
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or "extra" not in str(r.marker):
                todo.append(r)  # its marker (python_version ...) is evaluated when it is taken
            elif any(r.marker.evaluate({"extra": e}) for e in requirement.extras):  # digitlab[serve]: the extra's
                r.marker = None
                todo.append(r)
    return found


def requirements_of(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def build(folder: Path, requirements_file: Path, source: Path) -> Path:
    """A venv at `folder` with the closure of `requirements_file` and digitlab's `source` (src/); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in closure(requirements_of(requirements_file)).values():
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            source_file = root / file
            target = site / file
            if file.parts[0] == ".." or not source_file.is_file() or target.exists():
                continue  # console scripts live in bin/; the tests run `python -m`
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source_file, target)
    (site / "digitlab-source.pth").write_text(str(source) + "\n")
    return python
