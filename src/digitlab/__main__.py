"""`python -m digitlab` and the `digitlab` command.

Signals are taken over first thing, before the CLI and its libraries load, so that
Ctrl-C at any moment ends in one line and exit code 130 (143 for SIGTERM).
"""
import sys

from digitlab import stop


def main() -> int:
    stop.install()
    try:
        from digitlab.cli.main import main as cli_main

        return cli_main()
    except (KeyboardInterrupt, Exception) as e:  # during start-up; cli_main handles its own
        name = stop.stopped_by(e)
        if name is None:
            raise
        print(f"digitlab: interrupted ({name})", file=sys.stderr)
        return stop.EXIT_CODES.get(name, 130)
    finally:
        # The command is over: a signal now would only break the interpreter's own clean-up
        # (torch's atexit hooks print a traceback). Let the process end with its own answer.
        stop.ignore()


if __name__ == "__main__":
    sys.exit(main())
