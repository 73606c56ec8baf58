"""`digitlab serve` and `digitlab export`."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from digitlab.errors import UserError

if TYPE_CHECKING:
    from digitlab.stop import StopRequest


def cmd_serve(args: argparse.Namespace, stop: StopRequest) -> int:
    try:
        from digitlab.serving.server import serve
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install 'digitlab[serve]'") from None
    serve(args.runs, host=args.host, port=args.port, threshold=args.threshold)
    stop.check()  # uvicorn stops on Ctrl-C or SIGTERM itself, and hands the signal back
    return 0


def cmd_export(args: argparse.Namespace, stop: StopRequest) -> int:
    from digitlab.serving.export import export_onnx

    print(f"wrote {export_onnx(args.run, args.out, opset=args.opset)}")
    return 0
