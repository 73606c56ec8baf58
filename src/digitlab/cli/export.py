"""`digitlab export`: a run's model as an ONNX file, for onnxruntime and other tools.

The library is imported inside the command function, not at the top: `digitlab --help` builds
every parser without loading torch.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.options import add_options, option, out_option, overwrite_option

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


@dataclass
class ExportOptions:
    run: Path = option(None, "a run folder (its best checkpoint) or a checkpoint", kind=Path, flag="", metavar="RUN")
    out: Path = out_option("the .onnx file to write", required=True)
    opset: int = option(17, "ONNX opset, 17 or newer", minimum=17, maximum=21)
    overwrite: bool = overwrite_option("--out if it exists, as train --overwrite does")


def add_export_parser(commands) -> None:
    p = commands.add_parser("export", help="write a run's model as ONNX, for onnxruntime and other tools")
    add_options(p, ExportOptions)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.files import one_line
    from digitlab.serving.export import export_onnx

    print(f"wrote {one_line(str(export_onnx(args.run, args.out, opset=args.opset, overwrite=args.overwrite)))}")
    return 0
