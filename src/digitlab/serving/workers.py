"""Worker processes that find the digits in uploaded pictures, one picture each at a time.

One worker per core: at most that many pictures are decoded at once, so that N concurrent uploads
of huge pictures cost about one's memory per core, not N; and the decoding runs beside the server's
own Python instead of taking turns with it for the interpreter. Each worker is a process of its own
with a pipe to the server: a request takes an idle worker, sends the picture's bytes and awaits the
digits found (`segment.Found`, a few kB) on the server's event loop, with no thread in between.

A small picture (a drawing from the page) that is the server's only work is read on the event loop
itself: the round trip to a worker (the pipe both ways, waking the process) took longer than reading
it, and nothing else waits meanwhile.
"""
from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
import traceback
import warnings

from PIL import Image

from digitlab.errors import UserError
from digitlab.reading.image import ImageError, open_grey
from digitlab.reading.segment import Found, find_digits

PICTURE = "the picture"  # how errors name an upload
HERE_PIXELS = 512 * 512  # a picture up to this size, when it is the server's only work, is read on the loop
HERE_FORMATS = (b"\x89PNG", b"\xff\xd8\xff")  # PNG, JPEG: Pillow reads their size from the header alone


class PictureWorkers:
    """`count` processes (one per core by default) that read pictures for the server's requests."""

    def __init__(self, count: int | None = None):
        # forkserver: the workers start from a clean process, not a fork of one with threads running
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["digitlab.reading.segment", "digitlab.reading.image"])
        self.count = count or os.cpu_count() or 1
        self._workers = [self._start() for _ in range(self.count)]
        self._idle: asyncio.Queue | None = None  # made on the event loop, when first needed
        self.read_here = 0  # pictures read on the event loop so far, not by a worker

    def _start(self):
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_work, args=(theirs,), name="digitlab-picture", daemon=True)
        process.start()
        theirs.close()
        return process, ours

    async def find_digits(self, data: bytes, alone: bool = False) -> list[Found]:
        """The digits in the picture whose bytes are `data`; ImageError (one line) if it cannot be read.
        A small picture `alone` (nothing else is being read or answered) is read here, on the loop."""
        if alone and _small(data):
            self.read_here += 1
            return read(data)
        if self._idle is None:
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
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
        for process, pipe in self._workers:
            pipe.close()  # the worker reads the end of its pipe and returns
        for process, _ in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


async def _ask(pipe, data: bytes):
    """Sends a picture down a worker's pipe and awaits its answer without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(pipe.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        pipe.send_bytes(data)  # the worker is waiting for it: up to 10 MB go through at once
        await ready
    finally:
        loop.remove_reader(pipe.fileno())
    return pipe.recv()  # a few kB, being written now


def read(data: bytes) -> list[Found]:
    """The digits in an uploaded picture (its bytes); ImageError or UserError, one line, if there are none."""
    return find_digits(open_grey(data, name=PICTURE), source=PICTURE)


def _small(data: bytes) -> bool:
    """Whether a PNG's or JPEG's header says it has at most HERE_PIXELS; nothing is decoded. Anything
    else goes to a worker, which also says what is wrong with a file that cannot be read."""
    if not data.startswith(HERE_FORMATS):
        return False
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")
            return im.width * im.height <= HERE_PIXELS
    except Exception:  # unreadable: the worker tells the user why
        return False


def _work(pipe) -> None:
    """A worker's life: read a picture, answer its digits (or the one line saying why not), again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server stops us
    while True:
        try:
            data = pipe.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            answer = (True, read(data))
        except UserError as e:
            answer = (False, str(e))
        except Exception:  # a bug: the server answers 500 and logs it
            answer = (None, traceback.format_exc())
        pipe.send(answer)
