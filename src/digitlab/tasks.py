"""What a network is asked to do with a digit: the chapter's regression, or classification.

The chapter (section 2.3) trains both structures to output the digit's *value*: one number,
squared error against the label, rounded to a digit when read. The course then turns to
classification: ten logits, cross-entropy, the arg-max read as the digit and a softmax
probability as its confidence. A task holds everything that differs between the two, so
the loop, evaluation, prediction, the server and export never ask which one they have:

    task = get_task(config.task)
    loss = task.loss(model(images), labels)      # (B, outputs) -> scalar
    digits = task.digits(outputs)                # (N, outputs) -> (N,)

Reading answers (`answers`) needs numpy alone, so that a server of exported models runs without
PyTorch; the rest takes torch tensors, and imports torch when first called.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from digitlab.errors import UserError

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 10


@dataclass
class Answer:
    """One digit read: the best guess, how sure (None where the task has no probability), the
    three nearest guesses, and what the page shows besides."""

    digit: int
    confidence: float | None
    sure: bool | None
    top3: list[dict]  # classification: {digit, p}; regression: {digit, distance}
    details: dict = field(default_factory=dict)  # the scores behind it: {"probabilities": [...]} or {"value": x}


class Task:
    name: str
    outputs: int  # the width of the model's last layer
    confident: bool  # whether an answer has a probability: calibrated, 'not sure', trained to reject
    onnx_output: str  # the name of the exported graph's output

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """The mean loss; `smoothing` (classification) trains towards label-smoothed targets."""
        raise NotImplementedError

    def loss_and_gradient(self, outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss and its gradient with respect to `outputs`, written out (for a hand-written step)."""
        raise NotImplementedError

    def digits(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, outputs) -> (N,) the digits read."""
        raise NotImplementedError

    def wrongness(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) how confidently each answer is wrong, to show the worst first (right answers get -1)."""
        raise NotImplementedError

    def answers(self, outputs, temperature: float | None, threshold: float) -> list[Answer]:
        """(N, outputs) outputs (a torch tensor or a numpy array) -> the N answers."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class Regression(Task):
    """The chapter's: one output, the digit's value; squared error; read as the nearest digit."""

    name, outputs, confident, onnx_output = "regress", 1, False, "value"

    def loss(self, outputs, labels, smoothing=0.0):
        import torch.nn.functional as F

        # The chapter's F.square_error_cost then mean: the digit value is the target.
        return F.mse_loss(outputs.squeeze(1), labels.to(outputs.dtype))  # (B, 1) -> (B,)

    def loss_and_gradient(self, outputs, labels):
        diff = outputs.squeeze(1) - labels.to(outputs.dtype)
        return diff.square().mean(), (2 / len(diff)) * diff.unsqueeze(1)  # d mean((out - y)^2) / d out

    def digits(self, outputs):
        return outputs.squeeze(1).round().clamp(0, NUM_CLASSES - 1).long()

    def wrongness(self, outputs, labels):
        score = (outputs.squeeze(1) - labels.float()).abs()
        return score.masked_fill(self.digits(outputs) == labels, -1.0)

    def answers(self, outputs, temperature, threshold):
        answers = []
        for value in np.asarray(outputs, dtype=np.float64)[:, 0].tolist():
            near = sorted(range(NUM_CLASSES), key=lambda d: abs(d - value))[:3]  # the nearest digits to the value
            distances = [{"digit": d, "distance": round(abs(d - value), 4)} for d in near]
            answers.append(Answer(near[0], None, None, distances, {"value": round(value, 4)}))
        return answers


class Classification(Task):
    """Ten logits, cross-entropy; read as the arg-max, with softmax(logits / T) as its confidence."""

    name, outputs, confident, onnx_output = "classify", NUM_CLASSES, True, "logits"

    def loss(self, outputs, labels, smoothing=0.0):
        import torch.nn.functional as F

        return F.cross_entropy(outputs, labels, label_smoothing=smoothing)  # (B, 10) logits against class indices

    def loss_and_gradient(self, outputs, labels):
        import torch

        log_p = torch.log_softmax(outputs, 1)
        n = len(labels)
        d_out = log_p.exp()
        d_out[torch.arange(n), labels] -= 1
        d_out /= n  # d cross_entropy / d logits = (softmax - onehot) / B
        return -log_p.gather(1, labels.unsqueeze(1)).mean(), d_out

    def digits(self, outputs):
        return outputs.argmax(1)

    def wrongness(self, outputs, labels):
        score = outputs.softmax(1).max(1).values
        return score.masked_fill(self.digits(outputs) == labels, -1.0)

    def answers(self, outputs, temperature, threshold):
        answers = []
        for probs in softmax(np.asarray(outputs, dtype=np.float64), temperature):
            top = np.argsort(-probs, kind="stable")[:3]
            confidence = float(probs[top[0]])
            answers.append(Answer(int(top[0]), confidence, confidence >= threshold,
                                  [{"digit": int(d), "p": round(float(probs[d]), 4)} for d in top],
                                  {"probabilities": [round(float(p), 5) for p in probs]}))
        return answers


def softmax(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """softmax(logits / T) along the last axis, in float64 (float32 rounds a clear answer to exactly
    1, which would pass any threshold); T defaults to 1 (an uncalibrated model)."""
    z = logits / (temperature or 1.0)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def probabilities(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """`softmax` for torch tensors."""
    return (logits.double() / (temperature or 1.0)).softmax(-1)


TASKS: dict[str, Task] = {t.name: t for t in (Regression(), Classification())}


def get_task(task: str | Task) -> Task:
    """The task named `task` (or `task` itself); one line for a name that is none."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}") from None
