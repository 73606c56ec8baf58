"""The one exception type the CLI turns into a single line and exit code 2."""

EXIT_USAGE = 2  # bad input from a user: one line on stderr, then this exit code


class UserError(Exception):
    """Bad input from a user: a path, a file, a number or a name.

    The message is one line saying what is wrong and what to do about it.
    """
