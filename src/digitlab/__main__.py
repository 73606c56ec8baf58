"""`python -m digitlab` and the `digitlab` command.

Signals are taken over first thing, before the CLI and its libraries load, so that
Ctrl-C at any moment ends in one line and exit code 130 (143 for SIGTERM).
"""
import sys

from digitlab.errors import ExitCode
from digitlab.stop import StopRequest, stopped_by


def main() -> int:
    stop = StopRequest().install()
    try:
        # imported here, after the handlers: a signal while the CLI loads is answered like any other
        from digitlab.cli.main import main as cli_main

        return cli_main(stop=stop)
    except (KeyboardInterrupt, Exception) as e:  # during start-up; cli_main handles its own
        name = stopped_by(e)
        if name is None:
            raise
        print(f"digitlab: interrupted ({name})", file=sys.stderr)
        return ExitCode[name]
    finally:
        # The command is over: a signal now would only break the interpreter's own clean-up
        # (torch's atexit hooks print a traceback). Let the process end with its own answer.
        stop.ignore()


if __name__ == "__main__":
    sys.exit(main())
