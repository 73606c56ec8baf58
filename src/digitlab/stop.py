"""Ctrl-C (SIGINT) and SIGTERM: stop cleanly at any moment, never with a traceback.

Outside training, a signal unwinds the command at once with `Interrupted`, which the CLI
turns into one line and exit code 130 (143 for SIGTERM). Inside `graceful()` (the training
loop), the first signal only sets a flag: the loop finishes its step, saves, and stops; a
second signal unwinds at once. The flag is process-wide, so a signal that arrives while
some library code swallows the exception is still seen by the next training loop.
"""
from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


class Interrupted(KeyboardInterrupt):
    """Raised by a signal outside a graceful section; `name` is 'SIGINT' or 'SIGTERM'."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def cause(error: BaseException) -> Interrupted | None:
    """The Interrupted behind `error`, if a signal caused it. Some code wraps what it catches: a
    signal during `import torch` can surface as the RuntimeError of a dataclass's __set_name__."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def stopped_by(error: BaseException) -> str | None:
    """'SIGINT' or 'SIGTERM' if `error` is, or wraps, a stop by signal (a bare KeyboardInterrupt is
    Ctrl-C), or if it came after a signal that some code swallowed; None for any other error.

    A signal that lands in a C extension's initialisation (numpy's, inside `import torch`) becomes
    that extension's ImportError, which a library may catch; the module is left half-made, and
    whatever uses it next fails in its own way. The signal was received all the same."""
    interrupted = cause(error)
    if interrupted is not None:
        return interrupted.name
    if isinstance(error, KeyboardInterrupt):
        return "SIGINT"
    return _received


_received: str | None = None  # the first signal since the flag was last consumed
_graceful = 0  # how deep inside graceful() sections the main thread is
_escalate = True  # whether a second signal inside one unwinds at once


def _handler(signum, frame):
    global _received
    first = _received is None
    name = signal.Signals(signum).name
    _received = _received or name
    if not (_graceful and (first or not _escalate)):
        raise Interrupted(name)


def install() -> None:
    """Handle SIGINT and SIGTERM from now on (the CLI calls this first thing)."""
    if threading.current_thread() is threading.main_thread():
        for s in HANDLED:
            signal.signal(s, _handler)


def ignore() -> None:
    """From now on SIGINT and SIGTERM do nothing (the command has finished and is exiting)."""
    if threading.current_thread() is threading.main_thread():
        for s in HANDLED:
            signal.signal(s, signal.SIG_IGN)


def received() -> str | None:
    """The signal that asked to stop, if any ('SIGINT' or 'SIGTERM')."""
    return _received


@contextlib.contextmanager
def graceful(escalate: bool = True):
    """Within this block, a first signal only asks to stop (see `received()`); a second unwinds,
    unless not `escalate` (a process training with others must stop with them, after a step).

    Outside the main thread no handler can be set, and signals keep their old meaning.
    Leaving the block consumes the request: the caller has acted on it.
    """
    global _graceful, _received, _escalate
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _received and not _graceful:  # it should have unwound the command already: some code swallowed it
        raise Interrupted(_received)
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _handler)
    _graceful += 1
    was, _escalate = _escalate, escalate
    try:
        yield
    finally:
        _graceful -= 1
        _escalate = was
        _received = None
        for s, h in previous.items():
            signal.signal(s, h)
