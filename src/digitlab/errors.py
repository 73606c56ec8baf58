"""How a command ends: the one exception type the CLI turns into a single line, and the one table
of exit codes."""
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2  # bad input from a user (UserError): one line on stderr
    LOST = 3  # under `train --nproc`, a worker that lost the others: its launcher names the one that died
    SIGINT = 130  # Ctrl-C: 128 + the signal's number, as shells report it
    SIGTERM = 143


class UserError(Exception):
    """Bad input from a user: a path, a file, a number or a name.

    The message is one line saying what is wrong and what to do about it.
    """
