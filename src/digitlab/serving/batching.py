"""Micro-batching: the digits of concurrent requests go to a model together, in one forward pass.

It runs on the server's event loop. A request hands its digits over and awaits their outputs.
The batch runs once the loop has taken in what is ready (other requests' digits that arrived at
the same moment join it); when more requests are on their way (their pictures are being read),
it waits for them up to `wait` seconds, or until `size` digits are gathered. A lone request is
answered at once: batching costs it nothing, and no thread stands between it and the model.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import numpy as np


class MicroBatcher:
    """Runs `forward` ((N, 28, 28) uint8 -> (N, outputs)) on the digits of concurrent requests at once.

    `coming()` says how many requests are on their way (0 when unknown): only then is it worth
    waiting for them."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], size: int = 64, wait: float = 0.002,
                 coming: Callable[[], int] = lambda: 0):
        self.forward, self.size, self.wait, self.coming = forward, size, wait, coming
        self.batches = self.digits = 0  # served so far: their ratio is the mean batch
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._first = 0.0  # when the oldest pending digits came
        self._timer: asyncio.Handle | None = None

    def __call__(self, digits: np.ndarray) -> asyncio.Future:
        """A future of the outputs for these digits."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            self._first = time.monotonic()
        self._pending.append((digits, future))
        if sum(len(d) for d, _ in self._pending) >= self.size:
            self._run()
        elif self._timer is None:
            self._timer = loop.call_soon(self._due)
        return future

    def _due(self) -> None:
        self._timer = None
        if not self._pending:
            return
        left = self._first + self.wait - time.monotonic()
        if self.coming() > 0 and left > 0:  # more digits are on their way: give them a moment
            self._timer = asyncio.get_running_loop().call_later(left, self._due)
        else:
            self._run()

    def _run(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        sizes = [len(d) for d, _ in batch]
        try:
            outputs = np.split(self.forward(np.concatenate([d for d, _ in batch])), np.cumsum(sizes)[:-1])
        except Exception as e:  # every request of the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future), output in zip(batch, outputs):
                if not future.done():  # a request that was cancelled meanwhile wants nothing
                    future.set_result(output)
        self.batches, self.digits = self.batches + 1, self.digits + sum(sizes)
