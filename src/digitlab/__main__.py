"""`python -m digitlab` and the `digitlab` command.

Signals are taken over first thing, before the CLI and its libraries load, so that
Ctrl-C at any moment ends in one line and exit code 130 (143 for SIGTERM).
"""
import sys

from . import signals


def main() -> int:
    signals.install()
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt as e:  # during start-up; cli_main handles its own
        name = getattr(e, "name", "SIGINT")
        print(f"digitlab: interrupted ({name})", file=sys.stderr)
        return signals.EXIT_CODES.get(name, 130)
    except Exception as e:  # a library that wrapped the signal while the CLI was loading
        signal = signals.cause(e)
        if signal is None:
            raise
        print(f"digitlab: interrupted ({signal.name})", file=sys.stderr)
        return signals.EXIT_CODES.get(signal.name, 130)
    finally:
        # The command is over: a signal now would only break the interpreter's own clean-up
        # (torch's atexit hooks print a traceback). Let the process end with its own answer.
        signals.ignore()


if __name__ == "__main__":
    sys.exit(main())
