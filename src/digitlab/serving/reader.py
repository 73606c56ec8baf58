"""One picture read by every loaded model, as `digitlab predict --json` reads a file.

At most one picture per core is decoded at a time (a semaphore), so that N concurrent uploads of
huge pictures cost about one's memory per core, not N; the digits found go to each model through
its micro-batcher, together with other requests' digits.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from digitlab.config import THRESHOLD
from digitlab.reading.image import open_grey
from digitlab.reading.predict import Prediction, readings
from digitlab.reading.segment import find_digits
from digitlab.serving.backends import ServedModel, png_data_url
from digitlab.serving.batching import MicroBatcher

PICTURE = "the picture"  # how errors name an upload


class Reader:
    """The loaded models, and a picture read by all of them."""

    def __init__(self, models: list[ServedModel], threshold: float = THRESHOLD, batch: int = 64,
                 wait: float = 0.002, decoders: int | None = None):
        self.models, self.threshold = models, threshold
        self.decoding = threading.BoundedSemaphore(decoders or os.cpu_count() or 1)
        self._coming, self._count = 0, threading.Lock()  # requests between their upload and their batch
        self.batchers = [MicroBatcher(m.outputs, size=batch, wait=wait, coming=lambda: self._coming, name=m.name)
                         for m in models]

    def read(self, data: bytes, maps: bool = False) -> dict:
        """Every model's reading of the picture in `data` (its bytes, as uploaded), the 28x28 digits they
        saw side by side, and with `maps` each conv layer's feature maps for each digit. A picture that
        cannot be read raises ImageError (one line)."""
        with self._on_its_way(), self.decoding:
            found = find_digits(open_grey(data, name=PICTURE), source=PICTURE)
        digits = np.stack([f.image for f in found])
        jobs = [b.submit(digits) for b in self.batchers]
        answers = []
        for model, job in zip(self.models, jobs):
            prediction = Prediction(PICTURE, readings(model.task, model.temperature, job.wait(), found, self.threshold))
            answer = {"name": model.name, "model": model.facts["model"], "task": model.task.name,
                      "calibrated": model.temperature is not None, **prediction.as_dict()}
            del answer["file"]
            if maps:
                for reading, digit in zip(answer["digits"], digits):
                    reading["feature_maps"] = model.feature_maps(digit)
            answers.append(answer)
        return {"image": png_data_url(np.hstack(list(digits))), "threshold": self.threshold, "models": answers}

    @contextlib.contextmanager
    def _on_its_way(self):
        """Counts this request as coming to the batchers until its digits are handed to them."""
        with self._count:
            self._coming += 1
        try:
            yield
        finally:
            with self._count:
                self._coming -= 1

    def close(self) -> None:
        for b in self.batchers:
            b.close()
