"""One picture read by every loaded model, as `digitlab predict --json` reads a file.

Pictures are decoded and their digits found by worker processes, one per core, or on the event loop
for a lone drawing (`workers`); the digits go to each model through its micro-batcher, together with
other requests' digits.
"""
from __future__ import annotations

import asyncio

import numpy as np
from starlette.concurrency import run_in_threadpool

from digitlab.options import THRESHOLD
from digitlab.reading.predict import Prediction, readings
from digitlab.serving.backends import ServedModel, png_data_url
from digitlab.serving.batching import MicroBatcher
from digitlab.serving.workers import PICTURE, PictureWorkers


class Reader:
    """The loaded models, and a picture read by all of them, on the server's event loop."""

    def __init__(self, models: list[ServedModel], threshold: float = THRESHOLD, batch: int = 64,
                 wait: float = 0.002, decoders: int | None = None):
        self.models, self.threshold = models, threshold
        self.workers = PictureWorkers(decoders)
        self.coming = 0  # requests whose pictures are being read: the batchers may wait for them
        self.answering = 0  # how many requests are being answered (read, batched, put into words)
        self.batchers = [MicroBatcher(m.outputs, size=batch, wait=wait, coming=lambda: self.coming) for m in models]

    async def read(self, data: bytes, maps: bool = False) -> dict:
        """Every model's reading of the picture in `data` (its bytes, as uploaded), the 28x28 digits they
        saw side by side, and with `maps` each conv layer's feature maps for each digit. A picture that
        cannot be read raises ImageError (one line)."""
        self.answering += 1
        try:
            return await self._read(data, maps)
        finally:
            self.answering -= 1

    async def _read(self, data: bytes, maps: bool) -> dict:
        self.coming += 1
        try:
            found = await self.workers.find_digits(data, alone=self.answering == 1)
        finally:
            self.coming -= 1
        digits = np.stack([f.image for f in found])
        outputs = await asyncio.gather(*(batcher(digits) for batcher in self.batchers))
        answers = []
        for model, output in zip(self.models, outputs):
            prediction = Prediction(PICTURE, readings(model.task, model.temperature, output, found, self.threshold),
                                    threshold=self.threshold)
            answer = {"name": model.name, "model": model.facts["model"], "task": model.task.name,
                      "calibrated": model.temperature is not None, **prediction.as_dict()}
            del answer["file"]
            answers.append(answer)
        if maps:  # drawn in a thread: the loop goes on answering meanwhile
            drawn = await run_in_threadpool(lambda: [[m.feature_maps(d) for d in digits] for m in self.models])
            for answer, model_maps in zip(answers, drawn):
                for reading, feature_maps in zip(answer["digits"], model_maps):
                    reading["feature_maps"] = feature_maps
        return {"image": png_data_url(np.hstack(list(digits))), "threshold": self.threshold, "models": answers}

    def close(self) -> None:
        self.workers.close()
