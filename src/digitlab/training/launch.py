"""`digitlab train --nproc N`: start the training processes here (and meet other machines) through
torch's elastic launcher, as torchrun does, and turn what goes wrong into one line."""
from __future__ import annotations

import os
import sys
from dataclasses import fields

from digitlab.config import LaunchOptions, flag
from digitlab.errors import ExitCode, UserError

LAUNCH_FLAGS = tuple(flag(f) for f in fields(LaunchOptions))  # the launcher's own: its workers get the rest
LAUNCHER = "DIGITLAB_LAUNCHER"  # set for the workers `--nproc` starts: their launcher reports a lost process


def worker_argv(argv: list[str]) -> list[str]:
    """The command line each worker runs: this one without the launcher's own options."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in LAUNCH_FLAGS:
            skip = True
        elif not token.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            kept.append(token)
    return kept


def launch(argv: list[str], options: LaunchOptions) -> int:
    """Start `python -m digitlab ARGV` on `options.nproc` processes here (and meet `nnodes - 1` other
    machines at `rdzv_endpoint`) through torch's elastic launcher, as torchrun does; returns the exit
    code. As the launcher, it alone sets environment variables (for itself and its workers)."""
    nproc, nnodes, endpoint, timeout = options.nproc, options.nnodes, options.rdzv_endpoint, options.rdzv_timeout
    import logging
    import signal
    import uuid

    # what goes wrong is ours to tell, once: the elastic agent's own loggers read LOGLEVEL when they are
    # made, the rest inherit from their parent
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1 and not endpoint:
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine")
    # torchrun's default would be one thread each, with a warning: share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          run_id=f"digitlab-{endpoint}" if nnodes > 1 else f"digitlab-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=endpoint or "127.0.0.1:0",
                          rdzv_configs={"join_timeout": timeout}, max_restarts=0, monitor_interval=0.2)
    os.environ[LAUNCHER] = "1"
    try:
        elastic_launch(config, sys.executable)("-m", "digitlab", *argv)
    except ChildFailedError as e:
        said = {rank: f.exitcode for rank, f in e.failures.items() if f.exitcode in (ExitCode.USAGE, ExitCode.SIGINT, ExitCode.SIGTERM)}
        dead = {rank: f.exitcode for rank, f in e.failures.items() if f.exitcode not in (ExitCode.LOST, *said.values())}
        if dead:
            rank = min(dead)
            raise UserError(f"training process {rank} of {nproc * nnodes} died ({_how(dead[rank])}); the run's "
                            "last saved state is resumable with --resume RUN") from None
        if said:  # a worker said why, in one line (rank 0's line when it has one)
            return said.get(0, next(iter(said.values())))
        raise UserError("the training processes lost contact with each other; the run's last saved state is "
                        "resumable with --resume RUN") from None
    except SignalException as e:  # Ctrl-C or SIGTERM: the workers stopped after an agreed step, and rank 0 said so
        name = signal.Signals(e.sigval).name
        return ExitCode[name] if name in ExitCode.__members__ else 128 + e.sigval
    except RendezvousError as e:
        where = endpoint or "this machine"
        raise UserError(f"the {nnodes} machines did not meet at {where} within {timeout} s "
                        f"({type(e).__name__}); start the same command on every machine, with one "
                        "--rdzv-endpoint all of them can reach") from None
    return 0


def _how(exitcode: int) -> str:
    import signal

    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"
