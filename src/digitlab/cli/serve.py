"""`digitlab serve` and `digitlab export`."""
from __future__ import annotations

import argparse

from digitlab.errors import UserError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from digitlab.serving.server import serve
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install 'digitlab[serve]'") from None
    from digitlab import stop

    serve(args.runs, host=args.host, port=args.port, threshold=args.threshold)
    if stop.received():  # uvicorn stopped on Ctrl-C or SIGTERM, and handed the signal back
        raise stop.Interrupted(stop.received())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from digitlab.serving.export import export_onnx

    print(f"wrote {export_onnx(args.run, args.out, opset=args.opset)}")
    return 0
