"""The `digitlab` command: the parser, wired from one module per command, and `main(argv)`.

Bad input ends in one line on stderr and exit code 2; Ctrl-C in exit code 130 (143 for SIGTERM)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

import digitlab
from digitlab.cli import export, read, serve, show, sweep, train
from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.signals import StopRequest, interrupted_line, stopped_by


class _Version(argparse.Action):
    """--version, with the version read only when it is asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {digitlab.__version__}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    commands: argparse._SubParsersAction | None = None  # the top-level parser's, set by build_parser

    def error(self, message: str):  # one line instead of usage + message
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an option the command does not know is that command's error, pointing at
        its own --help (argparse leaves them to the top-level parser)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            argv = list(sys.argv[1:] if args is None else args)
            name = getattr(parsed, "command", None)
            if self.commands and name in argv and all(e in argv[argv.index(name) + 1:] for e in extras):
                self.commands.choices[name].error(f"unrecognized arguments: {' '.join(extras)}")
            self.error(f"unrecognized arguments: {' '.join(extras)}" +
                       (f"; options go after the command: digitlab {name} ..." if name else ""))
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="digitlab",
        description="Learn and compare neural-network structures on handwritten digits (MNIST).",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (show.add_summary_parser, train.add_train_parser, train.add_compare_parser, read.add_evaluate_parser,
                read.add_predict_parser, sweep.add_sweep_parser, serve.add_serve_parser, export.add_export_parser,
                show.add_plot_parser):  # in the order --help lists them
        add(commands)
    return parser


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    """Run one command; returns its exit code (errors.ExitCode). `stop` is the entry point's, else one
    is made and installed here."""
    stop = stop or StopRequest().install()
    try:
        with stop.deferred():  # a signal raised inside torch's C++ start-up would abort the process
            args = build_parser().parse_args(argv)
            args.argv = sys.argv[1:] if argv is None else list(argv)
            with contextlib.suppress(ModuleNotFoundError):  # absent where only exported models are served
                importlib.import_module("torch")  # every command's libraries come with torch (and numpy) ...
        stop.check()  # ... and a signal that came while they loaded stops the command here
        return args.func(args, stop)
    except UserError as e:
        print(f"digitlab: error: {one_line(str(e))}", file=sys.stderr)
        return ExitCode.USAGE
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"digitlab: error: digitlab {args.command} needs PyTorch, which is not installed: pip install -e . "
              "in digitlab's folder (or make setup)", file=sys.stderr)
        return ExitCode.USAGE
    except (KeyboardInterrupt, Exception) as e:  # a signal, or a library's error wrapped around one
        line = interrupted_line(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return ExitCode[stopped_by(e) or "SIGINT"]  # a line means a signal stopped it
