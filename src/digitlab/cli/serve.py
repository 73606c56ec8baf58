"""`digitlab serve`: the page where every loaded model reads what you draw.

The library is imported inside each command function, not at the top: `digitlab --help` builds
every parser here without loading torch.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from digitlab.errors import UserError
from digitlab.options import ServeOptions, add_options, options_from

if TYPE_CHECKING:
    from digitlab.signals import StopRequest


def add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="a local web page: draw a digit and watch every loaded model read it")
    add_options(p, ServeOptions)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, stop: StopRequest) -> int:
    try:
        from digitlab.serving.server import serve
    except ImportError as e:
        raise UserError(f"serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]' in "
                        "digitlab's folder (or make setup)") from None
    serve(args.runs, options_from(args, ServeOptions))
    stop.check()  # uvicorn stops on Ctrl-C or SIGTERM itself, and hands the signal back
    return 0
