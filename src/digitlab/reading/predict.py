"""Reading pictures: each digit found in a picture goes through the model, and comes back as a
reading with its confidence, its runners-up and whether the model is sure."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digitlab.errors import UserError
from digitlab.options import THRESHOLD
from digitlab.reading.image import open_grey
from digitlab.reading.segment import Found, find_digits
from digitlab.tasks import Task

PREPROCESSED_SUFFIX = ".28x28.png"
NAME_BYTES = 255  # a file name's limit on Linux's and macOS's file systems


def preprocessed_names(files: list[Path]) -> list[str]:
    """A distinct file name for each input's 28x28 picture: `x.png.28x28.png`, or with as much of
    its folder path as tells it apart (`a_x.png...` and `b_x.png...`); a name too long for a file system is
    cut (see _fitted)."""
    parts = [Path(os.path.abspath(f)).parts for f in files]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["_".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # the same file given twice
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return [_fitted(name) + PREPROCESSED_SUFFIX for name in unique]


def _fitted(name: str) -> str:
    """`name`, cut so that it and the suffix fit in NAME_BYTES; a cut name ends in a hash of the whole, so that
    two long names alike in their first 200-odd bytes stay apart."""
    room = NAME_BYTES - len(PREPROCESSED_SUFFIX)
    if len(os.fsencode(name)) <= room:
        return name
    tag = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    cut = name[:room]
    while len(os.fsencode(cut + tag)) > room:
        cut = cut[:-1]
    return cut + tag


@dataclass
class Reading:
    """One digit as a model read it."""

    digit: int
    confidence: float | None  # calibrated softmax probability; None for the chapter's regression models
    sure: bool | None  # confidence >= the threshold; None for regression
    top3: list[dict]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the picture
    image: np.ndarray  # the 28x28 the network saw
    scores: dict = field(default_factory=dict)  # {"probabilities": 10 calibrated ones} or {"value": the output}

    def as_dict(self) -> dict:
        return {"digit": self.digit, "confidence": self.confidence, "sure": self.sure, "top3": self.top3,
                "box": list(self.box), **self.scores}


@dataclass
class Prediction:
    """What was read in one file: its digits left to right, or an error."""

    file: str
    digits: list[Reading] = field(default_factory=list)
    error: str | None = None
    threshold: float = THRESHOLD  # the whole text is sure when its confidence reaches this

    @property
    def text(self) -> str:
        return "".join(str(r.digit) for r in self.digits)

    @property
    def digit(self) -> int | None:
        """The digit, when the picture holds one; None for several."""
        return self.digits[0].digit if len(self.digits) == 1 else None

    @property
    def confidence(self) -> float | None:
        """The chance that the whole text is right: the digits' confidences multiplied."""
        if not self.digits or any(r.confidence is None for r in self.digits):
            return None
        return float(np.prod([r.confidence or 0.0 for r in self.digits]))

    @property
    def sure(self) -> bool | None:
        """Whether the whole text is sure: the chance that all of it is right (not each digit's) reaches
        the threshold, so "57" read at 0.9 and 0.85 (0.77 together) is not."""
        confidence = self.confidence
        return None if confidence is None else confidence >= self.threshold

    @property
    def image(self) -> np.ndarray:
        """The 28x28 pictures the network saw, side by side."""
        return np.hstack([r.image for r in self.digits])

    def guesses(self, n: int = 2) -> list[str]:
        """Up to n guesses at the text: the best one, then each of the n - 1 least sure digits in turn
        changed to its runner-up."""
        texts = [self.text]
        unsure = sorted((r.confidence or 0, i) for i, r in enumerate(self.digits))
        for _, i in unsure[:n - 1]:
            if len(self.digits[i].top3) > 1:  # a runner-up to put in its place
                texts.append(self.text[:i] + str(self.digits[i].top3[1]["digit"]) + self.text[i + 1:])
        return texts

    def as_dict(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        single = len(self.digits) == 1
        return {"file": self.file, "text": self.text, "sure": self.sure, "digit": self.digit,
                "confidence": self.confidence, "top3": self.digits[0].top3 if single else None,
                "digits": [r.as_dict() for r in self.digits]}


def read_digits(model, meta, found: list[Found], threshold: float = THRESHOLD) -> list[Reading]:
    """Classify prepared digits with a checkpoint's model; confidences use its temperature."""
    import torch

    from digitlab.evaluate import model_outputs

    if not found:
        return []
    outputs = model_outputs(model, torch.from_numpy(np.stack([f.image for f in found])),
                            normalization=meta.normalization)
    return readings(meta.task, meta.temperature, outputs, found, threshold)


def readings(task: Task, temperature: float | None, outputs, found: list[Found],
             threshold: float = THRESHOLD) -> list[Reading]:
    """A model's outputs (N, outputs) for N prepared digits, as readings."""
    answers = task.answers(outputs, temperature, threshold)
    return [Reading(a.digit, a.confidence, a.sure, a.top3, f.box, f.image, a.details) for a, f in zip(answers, found)]


def predict_files(model, meta: dict, files: list[Path], single: bool = False,
                  threshold: float = THRESHOLD) -> list[Prediction]:
    """Find and read the digits in each file; a bad file gets an error, the rest go on.

    single: read each picture as one digit, whatever it holds.
    """
    predictions, found = [], []
    for f in files:
        try:
            digits = find_digits(open_grey(f), source=str(f), single=single)
            predictions.append(Prediction(str(f), threshold=threshold))
            found.append(digits)
        except UserError as e:
            predictions.append(Prediction(str(f), error=str(e)))
    readings = iter(read_digits(model, meta, [d for digits in found for d in digits], threshold))
    for p, digits in zip([p for p in predictions if p.error is None], found):
        p.digits = [next(readings) for _ in digits]
    return predictions
