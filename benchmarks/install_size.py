"""What each way of installing digitlab puts on disk: the README's install-size line.

Adds up the files of every distribution a set of requirements pulls in (their dependency closure,
read from the metadata of what is installed here), for the full install (digitlab with the `serve`
extra: PyTorch and the rest) and for the ONNX server without PyTorch (requirements/serve-onnx.txt).

    python benchmarks/install_size.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/helpers: not shipped in the wheel
from helpers.venv import closure, requirements_of  # noqa: E402


def size_mb(requirements: list[str]) -> tuple[float, list[str]]:
    total, names = 0, []
    for name, dist in sorted(closure(requirements).items()):
        root = Path(dist.locate_file(""))
        total += sum((root / f).stat().st_size for f in dist.files or [] if (root / f).is_file())
        names.append(name)
    return total / 1e6, names


def main() -> None:
    full, full_names = size_mb(["digitlab[serve]"])
    onnx, onnx_names = size_mb(requirements_of(ROOT / "requirements" / "serve-onnx.txt"))
    print("| install | distributions | size on disk |\n|---|---:|---:|")
    print(f"| digitlab with the serve extra (PyTorch CPU) | {len(full_names)} | {full:,.0f} MB |")
    print(f"| requirements/serve-onnx.txt (onnxruntime, no PyTorch) | {len(onnx_names)} | {onnx:,.0f} MB |")
    print(f"\nin the full install only: {', '.join(sorted(set(full_names) - set(onnx_names)))}")


if __name__ == "__main__":
    main()
