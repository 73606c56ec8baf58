"""`digitlab serve` and `digitlab export`.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from digitlab.errors import UserError
from digitlab.options import ExportOptions, ServeOptions, add_options, options_from

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


def add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="a local web page: draw a digit and watch every loaded model read it")
    add_options(p, ServeOptions)
    p.set_defaults(func=cmd_serve)


def add_export_parser(commands) -> None:
    p = commands.add_parser("export", help="write a run's model as ONNX, for onnxruntime and other tools")
    add_options(p, ExportOptions)
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
