"""Ctrl-C (SIGINT) and SIGTERM: stop cleanly at any moment, never with a traceback.

One `StopRequest` per command. The entry point makes it, installs its handlers first thing,
and hands it down to whatever runs long: the training loop, a sweep, the server. Outside a
graceful section a signal unwinds the command at once with `Interrupted`, which the entry
point turns into one line and the signal's exit code (errors.ExitCode). Inside `graceful()`
the first signal only sets `requested`: the loop finishes its step, saves and stops; a second
signal unwinds at once.

A library may swallow our `Interrupted`: a Ctrl-C inside numpy's C initialisation becomes
numpy's ImportError, which `import torch` catches, and the command would go on with numpy
half-made. The request remembers the signal all the same, and `check()` raises it at the
next safe point: the CLI checks once the command's libraries are loaded, and every graceful
section starts with a check. An error that neither is nor wraps a signal surfaces as itself.
Python itself swallows one raised inside a `__del__` (a lock collected as the signal lands), and
prints it with a traceback: for our `Interrupted`, `install` makes that silent.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)
SIGNALS = tuple(s.name for s in HANDLED)  # the stops a signal asks for: 'SIGINT', 'SIGTERM'


class Interrupted(KeyboardInterrupt):
    """Raised by a signal outside a graceful section; `name` is 'SIGINT' or 'SIGTERM', `after` what the
    user should know of the state the stop left (the rest of the command's one line), and `finished_in`
    the run folder whose training had finished when the stop came (its results not yet written)."""

    def __init__(self, name: str, after: str = "", finished_in=None):
        super().__init__(name)
        self.name, self.after, self.finished_in = name, after, finished_in


def interrupted_line(error: BaseException) -> str | None:
    """The one line that says a command was stopped by a signal (`error` is, or wraps, the stop); None
    for any other error."""
    name = stopped_by(error)
    if name is None:
        return None
    after = getattr(cause(error), "after", "")
    return f"digitlab: interrupted ({name})" + (f": {after}" if after else "")


def cause(error: BaseException) -> Interrupted | None:
    """The Interrupted behind `error`, if a signal caused it. Some code wraps what it catches: a
    signal during `import torch` can surface as the RuntimeError of a dataclass's __set_name__."""
    seen = set()
    found: BaseException | None = error
    while found is not None and id(found) not in seen:
        if isinstance(found, Interrupted):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def stopped_by(error: BaseException) -> str | None:
    """'SIGINT' or 'SIGTERM' if `error` is, or wraps, a stop by signal (a bare KeyboardInterrupt is
    Ctrl-C); None for any other error, which is then the error to show."""
    interrupted = cause(error)
    if interrupted is not None:
        return interrupted.name
    return "SIGINT" if isinstance(error, KeyboardInterrupt) else None


class StopRequest:
    """The signals one command has received, and how it answers them."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the first signal not yet acted on: 'SIGINT' or 'SIGTERM'
        self._graceful = 0  # how deep inside graceful() sections the main thread is
        self._escalate = True  # whether a second signal inside one unwinds at once

    def install(self) -> StopRequest:
        """Handle SIGINT and SIGTERM from now on (the entry point does this first thing)."""
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                signal.signal(s, self._handler)
            if not isinstance(sys.unraisablehook, _QuietInterrupts):
                sys.unraisablehook = _QuietInterrupts(sys.unraisablehook)
        return self

    def ignore(self) -> None:
        """From now on SIGINT and SIGTERM do nothing (the command has finished and is exiting)."""
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                signal.signal(s, signal.SIG_IGN)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        first = self.requested is None
        self.requested = self.requested or name
        if not (self._graceful and (first or not self._escalate)):
            raise Interrupted(name)

    def check(self) -> None:
        """Stop now if a signal came outside a graceful section and some library swallowed it."""
        if self.requested and not self._graceful:
            raise Interrupted(self.requested)

    def deferred(self) -> contextlib.AbstractContextManager:
        """Within this block a signal only sets `requested`, and `check()` after it acts on it: for code
        that cannot be unwound, such as a C++ extension loading (an exception raised inside `import torch`
        aborts the process: "terminate called after throwing an instance of 'pybind11::error_already_set'")."""
        on_main = threading.current_thread() is threading.main_thread()
        return self._holding(escalate=False) if on_main else contextlib.nullcontext()

    @contextlib.contextmanager
    def _holding(self, escalate: bool):
        """Signals only set `requested` (a second one unwinds if `escalate`) while the block runs."""
        self._graceful += 1
        was, self._escalate = self._escalate, escalate
        try:
            yield
        finally:
            self._graceful -= 1
            self._escalate = was

    @contextlib.contextmanager
    def graceful(self, escalate: bool = True):
        """Within this block, a first signal only sets `requested`; a second unwinds, unless not
        `escalate` (a process training with others must stop with them, after a step).

        Outside the main thread no handler can be set, and signals keep their old meaning.
        Leaving the block consumes the request: the caller has acted on it.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.check()
        previous = {s: signal.signal(s, self._handler) for s in HANDLED}  # signal() returns the handler it replaces
        try:
            with self._holding(escalate):
                yield
        finally:
            self.requested = None
            for s, h in previous.items():
                signal.signal(s, h)


class _QuietInterrupts:
    """sys.unraisablehook: an Interrupted that Python swallowed (raised inside a `__del__` or a weakref
    callback) passes silently, since the request has it and `check()` acts on it; anything else goes to
    the hook that was there before."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            self.previous(unraisable)
