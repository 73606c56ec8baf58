"""The `digitlab` command: a thin shell over the library, one module per command group.

Each command parses its arguments, then calls library functions with plain values.
torch and matplotlib are imported inside the commands, so `digitlab --help` is instant.
"""
from digitlab.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
