"""`python -m digitlab` and the `digitlab` command.

Signals are taken over first thing, before the CLI and its libraries load, so that
Ctrl-C at any moment ends in one line and exit code 130 (143 for SIGTERM).
"""
import sys

from digitlab.errors import ExitCode, UserError
from digitlab.files import Output
from digitlab.signals import StopRequest, stopped_by


def main() -> int:
    stop = StopRequest().install()
    sys.stdout = Output(sys.stdout)  # a closed pipe stops the writing, not the command
    code = None
    try:
        # imported here, after the handlers: a signal while the CLI loads is answered like any other
        from digitlab.cli.main import main as cli_main

        code = cli_main(stop=stop)
        sys.stdout.flush()  # what is still buffered, while a failure can still be one line
    except UserError as e:  # the output could not be written (a full disk)
        print(f"digitlab: error: {e}", file=sys.stderr)
        code = ExitCode.USAGE
    except (KeyboardInterrupt, Exception) as e:  # during start-up; cli_main handles its own
        name = stopped_by(e)
        if name is None:
            raise
        # after the command has answered, a signal changes nothing: the launcher's SIGTERM to a process that
        # had already seen its peer die and said so (LOST) must not add a line to the launcher's
        if code is None:
            print(f"digitlab: interrupted ({name})", file=sys.stderr)
            code = ExitCode[name]
    finally:
        # The command is over: a signal now would only break the interpreter's own clean-up
        # (torch's atexit hooks print a traceback). Let the process end with its own answer.
        stop.ignore()
    # a training process of several (torchrun, --nproc) ends without the interpreter's clean-up
    distributed = sys.modules.get("digitlab.training.distributed")
    if distributed is not None and distributed.joined():
        distributed.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
