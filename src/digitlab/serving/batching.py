"""Micro-batching: the digits of concurrent requests go to a model together, in one forward pass.

Each model has one worker thread. A request hands it its digits and waits. The worker takes what
is queued; when more requests are on their way (their pictures are being decoded), it waits for
them up to `wait` seconds or until `size` digits are gathered, then answers every request of the
batch from one forward pass. A lone request is answered at once: batching costs it nothing.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np


class _Job:
    def __init__(self, digits: np.ndarray):
        self.digits, self.done = digits, threading.Event()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None

    def wait(self) -> np.ndarray:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class MicroBatcher:
    """Runs `forward` ((N, 28, 28) uint8 -> (N, outputs)) on the digits of concurrent requests at once.

    `coming()` says how many requests are on their way (0 when unknown): only then is it worth
    waiting for them."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], size: int = 64, wait: float = 0.002,
                 coming: Callable[[], int] = lambda: 0, name: str = "model"):
        self.forward, self.size, self.wait, self.coming = forward, size, wait, coming
        self.batches = self.digits = 0  # served so far: their ratio is the mean batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"digitlab-batch-{name}", daemon=True)
        self._thread.start()

    def __call__(self, digits: np.ndarray) -> np.ndarray:
        """The outputs for these digits (blocks until their batch has run)."""
        return self.submit(digits).wait()

    def submit(self, digits: np.ndarray) -> _Job:
        job = _Job(digits)
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, count = [job], len(job.digits)
            deadline = time.monotonic() + self.wait
            while count < self.size:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.coming() == 0:
                        break
                    try:
                        job = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if job is None:
                    self._queue.put(None)  # closing: answer this batch first
                    break
                jobs.append(job)
                count += len(job.digits)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            outputs = self.forward(np.concatenate([j.digits for j in jobs]))
        except BaseException as e:  # every request of the batch gets the error
            for j in jobs:
                j.error = e
        else:
            start = 0
            for j in jobs:
                j.result, start = outputs[start:start + len(j.digits)], start + len(j.digits)
        self.batches, self.digits = self.batches + 1, self.digits + sum(len(j.digits) for j in jobs)
        for j in jobs:
            j.done.set()
