"""Worker processes that find the digits in uploaded pictures, one picture each at a time.

One worker per core: at most that many pictures are decoded at once, so that N concurrent uploads
of huge pictures cost about one's memory per core, not N; and the decoding runs beside the server's
own Python instead of taking turns with it for the interpreter. Each worker is a process of its own
with a pipe to the server: a request takes an idle worker, sends the picture's bytes and awaits the
digits found (`segment.Found`, a few kB) on the server's event loop, with no thread in between.

A small PNG (a drawing from the page: 6-10 kB, 280x280) that is the only request the server is
answering is read on the event loop itself, which saves the round trip to a worker (the pipe both
ways, waking the process): one client's median answer came 0.3-3 ms sooner. Anything else (a photo,
a JPEG, whose decoding a crafted file can make slow, or a request while others are in flight) goes
to a worker, so the loop is held for a few milliseconds at most.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import traceback
from typing import Any

from digitlab.errors import UserError
from digitlab.reading.image import DRAWING_PIXELS, ImageError, open_grey, png_header
from digitlab.reading.segment import Found, find_digits

PICTURE = "the picture"  # how errors name an upload
LOOP_PIXELS = DRAWING_PIXELS  # a PNG of at most this many pixels (a drawing) ...
LOOP_BYTES = 256 * 1024  # ... and this many bytes, when it is the only request, is read on the event loop


class PictureWorkers:
    """`count` processes (one per core by default) that read pictures for the server's requests; the
    event loop reads a lone small PNG itself."""

    def __init__(self, count: int | None = None):
        # forkserver: the workers start from a clean process, not a fork of one with threads running
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["digitlab.reading.segment", "digitlab.reading.image"])
        self.count = count or os.cpu_count() or 1
        self._workers = [self._start() for _ in range(self.count)]
        self._idle: asyncio.Queue = asyncio.Queue()  # the idle workers; it takes the event loop of its first wait
        for worker in self._workers:
            self._idle.put_nowait(worker)
        self.read_on_loop = 0  # pictures read on the event loop so far, not by a worker

    def _start(self):
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_work, args=(theirs,), name="digitlab-picture", daemon=True)
        process.start()
        theirs.close()
        return process, ours

    async def find_digits(self, data: bytes, alone: bool = False) -> list[Found]:
        """The digits in the picture whose bytes are `data`; ImageError (one line) if it cannot be read.
        A small PNG `alone` (no other request is being answered) is read here, on the loop."""
        if alone and _small_png(data):
            self.read_on_loop += 1
            return read(data)
        worker = await self._idle.get()  # waits while every worker is busy
        try:
            ok, answer = await _ask(worker[1], data)
        except (EOFError, OSError):  # it died (killed for its memory?): another takes its place
            worker = self._replace(worker)
            raise UserError("reading the picture took its process down (out of memory?); send a smaller "
                            "picture") from None
        except BaseException:  # cancelled mid-way: its answer would reach the next request
            worker = self._replace(worker)
            raise
        finally:
            self._idle.put_nowait(worker)
        if ok is None:
            raise RuntimeError(f"a picture worker failed:\n{answer}")
        if not ok:
            raise ImageError(answer)
        return answer

    def _replace(self, worker):
        worker[0].kill()
        worker[1].close()
        fresh = self._start()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for _, pipe in self._workers:
            pipe.close()  # the worker reads the end of its pipe and returns
        for process, _ in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


async def _ask(pipe, data: bytes):
    """Sends a picture down a worker's pipe and awaits its answer without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(pipe.fileno(), wake)
    try:
        pipe.send_bytes(data)  # the worker is waiting for it: up to 10 MB go through at once
        await ready
    finally:
        loop.remove_reader(pipe.fileno())
    return pipe.recv()  # a few kB, being written now


def read(data: bytes) -> list[Found]:
    """The digits in an uploaded picture (its bytes); ImageError or UserError, one line, if there are none."""
    return find_digits(open_grey(data, name=PICTURE), source=PICTURE)


def _small_png(data: bytes) -> bool:
    """Whether `data` is a PNG of at most LOOP_BYTES whose header (its IHDR chunk: width and height,
    the first thing after the signature) says at most LOOP_PIXELS. Nothing is decoded."""
    header = png_header(data) if len(data) <= LOOP_BYTES else None
    return header is not None and header[0] * header[1] <= LOOP_PIXELS


def _work(pipe) -> None:
    """A worker's life: read a picture, answer its digits (or the one line saying why not), again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server stops us
    while True:
        try:
            data = pipe.recv_bytes()
        except (EOFError, OSError):
            return
        answer: tuple[bool | None, Any]
        try:
            answer = (True, read(data))
        except UserError as e:
            answer = (False, str(e))
        except Exception:  # a bug: the server answers 500 and logs it
            answer = (None, traceback.format_exc())
        pipe.send(answer)
