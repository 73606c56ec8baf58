"""`digitlab serve` and `digitlab export`.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from digitlab.cli.options import add_options, opset, options_from
from digitlab.config import ServeOptions
from digitlab.errors import UserError

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


def add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="a local web page: draw a digit and watch every loaded model read it")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run folders, checkpoints or exported .onnx files to load; the first one answers in large "
                        "(`digitlab train --preset best` makes the model that reads real handwriting best)")
    add_options(p, ServeOptions)
    p.set_defaults(func=cmd_serve)


def add_export_parser(commands) -> None:
    p = commands.add_parser("export", help="write a run's model as ONNX, for onnxruntime and other tools")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder (its best checkpoint) or a checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=opset, default=17, help="ONNX opset, 17 or newer (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (as train --overwrite does)")
    p.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace, stop: StopRequest) -> int:
    try:
        from digitlab.serving.server import serve
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]' in "
                        "digitlab's folder (or make setup)") from None
    serve(args.runs, options_from(args, ServeOptions))
    stop.check()  # uvicorn stops on Ctrl-C or SIGTERM itself, and hands the signal back
    return 0


def cmd_export(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.files import one_line
    from digitlab.serving.export import export_onnx

    print(f"wrote {one_line(str(export_onnx(args.run, args.out, opset=args.opset, overwrite=args.overwrite)))}")
    return 0
