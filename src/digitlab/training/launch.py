"""`digitlab train --nproc N`: start the training processes here (and meet other machines) through
torch's elastic launcher, as torchrun does, and turn what goes wrong into one line."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from dataclasses import fields

from digitlab.errors import ExitCode, UserError
from digitlab.files import one_line
from digitlab.options import LaunchOptions, flag

LAUNCH_FLAGS = tuple(flag(f) for f in fields(LaunchOptions))  # the launcher's own: its workers get the rest
LAUNCHER = "DIGITLAB_LAUNCHER"  # set for the workers `--nproc` starts: their launcher reports a lost process
DEFAULT_PORT = 29400  # torchrun's, for an endpoint given without one


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
    code. The environment and the signal handlers are as they were afterwards."""
    nproc, nnodes, endpoint, timeout = options.nproc or 1, options.nnodes, options.rdzv_endpoint, options.rdzv_timeout
    if nnodes > 1 and not endpoint:
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine")
    if endpoint:
        check_endpoint(*parse_endpoint(endpoint), timeout)
    # the workers inherit this process's environment: what they need is set for the launch only.
    # torchrun's default would be one thread each, with a warning: share the cores instead. What goes
    # wrong is ours to tell, once: the elastic agent's loggers read LOGLEVEL when they are made.
    workers_env = {LAUNCHER: "1", "LOGLEVEL": os.environ.get("LOGLEVEL", "CRITICAL"),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    machines = f", one of {nnodes} machines meeting at {endpoint}" if nnodes > 1 else ""
    print(f"digitlab: starting {nproc} training process{'es' * (nproc > 1)} on this machine{machines}", flush=True)
    with _environment(workers_env), _signal_handlers_kept():
        return _launch(argv, nproc, nnodes, endpoint, timeout)


def _launch(argv: list[str], nproc: int, nnodes: int, endpoint: str | None, timeout: int) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          run_id=f"digitlab-{endpoint}" if nnodes > 1 else f"digitlab-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=endpoint or "127.0.0.1:0",
                          rdzv_configs={"join_timeout": timeout}, max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "digitlab", *argv)
    except ChildFailedError as e:
        rank, exitcode = _first_failure(e.failures)
        if exitcode in (ExitCode.USAGE, ExitCode.SIGINT, ExitCode.SIGTERM):
            return exitcode  # the worker said why, in one line
        if exitcode == ExitCode.LOST:
            raise UserError("the training processes lost contact with each other; the run's last saved state "
                            "is resumable with --resume RUN") from None
        raise UserError(f"training process {rank} of {nproc * nnodes} died ({_how(exitcode)}); the run's "
                        "last saved state is resumable with --resume RUN") from None
    except SignalException as e:  # Ctrl-C or SIGTERM: the workers stopped after an agreed step, and rank 0 said so
        name = signal.Signals(e.sigval).name
        return ExitCode[name] if name in ExitCode.__members__ else 128 + e.sigval
    except RendezvousError as e:
        where = endpoint or "this machine"
        raise UserError(f"the {nnodes} machines did not meet at {where} within {timeout} s "
                        f"({type(e).__name__}); start the same command on every machine, with one "
                        "--rdzv-endpoint all of them can reach") from None
    return 0


def parse_endpoint(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or 'HOST' (torchrun's port 29400) -> (host, port); one line if it is none of these."""
    shown = one_line(text)[:80]
    bracket = text.startswith("[")
    if bracket:
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UserError(f"--rdzv-endpoint {shown!r}: an IPv6 address goes in brackets, as [::1]:29400")
        port = rest[1:] if rest else str(DEFAULT_PORT)
    else:
        host, sep, port = text.rpartition(":") if text.count(":") == 1 else (text, "", str(DEFAULT_PORT))
    if not host or (":" in host and not bracket):
        raise UserError(f"--rdzv-endpoint {shown!r}: give HOST:PORT, e.g. 127.0.0.1:29400 or [::1]:29400")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"--rdzv-endpoint {shown!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def check_endpoint(host: str, port: int, timeout: float) -> None:
    """Meet torch's rendezvous halfway, where its own waits would not end: a host name that does not
    resolve (torch aborts with a C++ stack trace), and a port held by something that accepts and never
    answers (torch would wait there, deaf to Ctrl-C). Nothing listening yet is fine: the first machine
    starts the rendezvous there."""
    where = f"{host}:{port}"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--rdzv-endpoint {one_line(where)[:80]}: cannot find the host "
                        f"({one_line(str(e))[:80]}); give a name or address every machine can reach") from None
    try:
        socket.create_connection((host, port), timeout=min(timeout, 5)).close()
    except OSError:
        return  # nobody there yet (or not reachable from here yet): torch's own wait and timeout take over
    answered = threading.Event()

    def ask() -> None:  # a store client's handshake; it waits in C++ without the GIL, so we wait beside it
        from datetime import timedelta

        from torch.distributed import TCPStore

        with contextlib.suppress(Exception):
            TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False)
        answered.set()

    threading.Thread(target=ask, name="digitlab-rendezvous-check", daemon=True).start()
    if not answered.wait(timeout):  # a signal meanwhile ends the command at once
        raise UserError(f"--rdzv-endpoint {one_line(where)[:80]}: something listens there but did not answer as a "
                        f"rendezvous within {timeout:g} s (another program's port?); pick a free port")


def _how(exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):  # a number that names no signal
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _first_failure(failures: dict) -> tuple[int, int]:
    """The failure that ended the run, as (rank, exit code): the earliest one. Once a process fails, the
    agent stops the others (SIGTERM, then SIGKILL), and their exits are recorded too, in the same second
    as often as not. So within a second: a process that said why (a usage error, Ctrl-C) comes first,
    then one that died of something else, then one killed by a signal, then one that exited on a SIGTERM
    (which the agent sends the survivors: the user's SIGTERM reaches the launcher itself), and a
    process that only lost the others comes last."""
    def order(rank: int) -> tuple:
        code = failures[rank].exitcode
        kind = (0 if code in (ExitCode.USAGE, ExitCode.SIGINT) else 3 if code == ExitCode.SIGTERM
                else 4 if code == ExitCode.LOST else 2 if code in (-signal.SIGTERM, -signal.SIGKILL) else 1)
        return failures[rank].timestamp, kind, rank

    rank = min(failures, key=order)
    return rank, failures[rank].exitcode


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in os.environ for the duration; afterwards the environment is as it was (the elastic
    agent adds variables of its own too)."""
    before = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@contextlib.contextmanager
def _signal_handlers_kept():
    """The signal handlers as they were, afterwards: the elastic agent installs its own and leaves them."""
    numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    kept = {number: signal.getsignal(number) for number in numbers}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)
