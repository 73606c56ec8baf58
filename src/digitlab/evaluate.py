"""Scoring a model: accuracy, loss, per-class precision and recall, confusion, and honest confidence.

How a digit is read from the outputs, and the loss, are the task's (tasks.py). Training scores its
model with these, and so do `evaluate`, `compare` and the sweeps.

Honest confidence: temperature scaling (Guo et al., 2017) and the expected calibration error.

A classifier trained with cross-entropy tends to be over-confident: it says 99% where it is
right 95% of the time. Dividing its logits by one number T > 1 (fitted on held-out images,
by minimising their negative log-likelihood) softens every answer alike; the top digit and
so the accuracy do not change. The expected calibration error (ECE) measures the gap: sort
answers into bins by confidence, and average |accuracy - confidence| over the bins,
weighted by how many answers each holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from digitlab.data import NUM_CLASSES, fingerprint, normalize
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.tasks import Task, get_task

# under inference_mode: 250 beat 64, 1000 and 10000 here (benchmarks/cnn_variants.py), and divides 10,000
EVAL_BATCH = 250


def predicted_digits(outputs: torch.Tensor, task: str | Task) -> torch.Tensor:
    """(N, 1) regression outputs or (N, 10) logits -> (N,) digits."""
    return get_task(task).digits(outputs)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true digit, column = predicted digit."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def precision_recall(confusion: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per class: precision = TP / predicted as that class, recall = TP / truly that class.

    A class that was never predicted (or never present) gets 0.0, not NaN.
    """
    tp = confusion.diag().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    return precision.tolist(), recall.tolist()


@dataclass
class Evaluation:
    accuracy: float  # a fraction, 0 to 1
    mean_loss: float
    labels: torch.Tensor  # (N,)
    predictions: torch.Tensor  # (N,)
    outputs: torch.Tensor  # (N, 1) or (N, 10), raw model outputs
    seconds: float
    task: Task

    @cached_property
    def confusion(self) -> torch.Tensor:
        return confusion_matrix(self.labels, self.predictions)

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds else 0.0

    def worst(self, n: int) -> torch.Tensor:
        """Indices of the n most confidently wrong answers: the highest softmax probability
        on a wrong digit, or for regression the output farthest from the truth."""
        order = self.task.wrongness(self.outputs, self.labels).argsort(descending=True)
        return order[: min(n, int((self.predictions != self.labels).sum()))]

    def as_dict(self) -> dict:
        precision, recall = precision_recall(self.confusion)
        return {
            "accuracy": self.accuracy,
            "mean_loss": self.mean_loss,
            "images": len(self.labels),
            "precision": precision,
            "recall": recall,
            "confusion": self.confusion.tolist(),
            "images_per_second": self.images_per_second,
        }


def model_outputs(model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH,
                  normalization: dict | None = None) -> torch.Tensor:
    """Raw outputs for uint8 images (N, 28, 28), in eval mode and without autograd.

    normalization: a checkpoint's {"center", "scale"}; None means the chapter's.
    """
    norm = normalization or {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        outputs = torch.cat([
            model(normalize(images[i:i + batch_size], **norm).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ])
    model.train(was_training)
    if not bool(torch.isfinite(outputs).all()):  # a diverged or damaged model answers NaN for every digit
        raise UserError("the model's outputs are NaN or infinite: its weights are broken (from a run that "
                        "diverged?); train it again, with a lower --lr")
    return outputs


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, task: str | Task,
             batch_size: int = EVAL_BATCH, normalization: dict | None = None) -> Evaluation:
    """Score a model on uint8 images (N, 28, 28) and their labels (N,)."""
    start = time.perf_counter()
    outputs = model_outputs(model, images, batch_size, normalization)
    seconds = time.perf_counter() - start
    labels, task = labels.long(), get_task(task)
    predictions = task.digits(outputs)
    accuracy = (predictions == labels).double().mean().item()
    return Evaluation(accuracy, task.loss(outputs, labels).item(), labels, predictions, outputs, seconds, task)


SAMPLE_WORDS = "the 5,000-digit offline sample (4,000 train / 1,000 test)"


def data_note(meta, data, allow_overlap: bool = False) -> str | None:
    """What a reader of the score must know about the data, or None; refuses a misleading score.

    The offline sample's 5,000 digits are MNIST *training* images. A model trained on the full
    set has seen them, so scoring it on them measures memory, not accuracy: refused unless
    `allow_overlap`. Other mismatches are scored with a note.
    """
    trained = meta.data
    if trained is None:
        return "note: this checkpoint does not record its training data; the score may not be comparable"
    if trained.get("fingerprint") == fingerprint(data):
        return f"note: figures from {SAMPLE_WORDS}, not comparable with full-MNIST figures" if data.is_sample else None
    if data.is_sample and not trained.get("sample"):
        if not allow_overlap:
            # data.is_sample: no --data-dir, no DIGITLAB_DATA_DIR, and no full set in the cache or online
            raise UserError("no --data-dir and no full MNIST set found, so this evaluation would use the offline "
                            "sample's 5,000 digits, which are among the training images of "
                            f"{one_line(str(trained.get('source')))}, the data this model was trained on: the score "
                            "would measure memory, not accuracy; pass --data-dir with the full MNIST set (or "
                            "--allow-overlap to score it anyway)")
        return "warning: scored on digits this model was trained on (--allow-overlap): the figure is not a test score"
    if trained.get("sample"):
        return f"note: this model was trained on {SAMPLE_WORDS} and is scored on {one_line(data.source)}"
    return f"note: this model was trained on other data ({one_line(str(trained.get('source')))})"


# ---------------------------------------------------------------------------- calibrated confidence

ECE_BINS = 15
T_RANGE = (0.05, 20.0)  # a temperature outside this says the held-out logits are degenerate
MIN_HELD_OUT = 200  # fewer held-out answers than this (or all of them right) cannot fit a temperature


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The T that minimises the mean NLL of softmax(logits / T) on these (held-out) answers, or None
    when they cannot tell: too few, all right (the fit would sharpen without end), or a T outside
    T_RANGE."""
    if len(labels) < MIN_HELD_OUT or bool((logits.argmax(1) == labels).all()):
        return None
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if T_RANGE[0] <= t <= T_RANGE[1] else None


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width confidence bins: sum of |accuracy - confidence| x share of answers."""
    confidence, guess = probs.max(-1)
    correct = (guess == labels.long()).double()
    confidence = confidence.double()
    which = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    gap = torch.bincount(which, weights=correct - confidence, minlength=bins)
    return float(gap.abs().sum() / count.sum())


def ece_change(before: float, after: float) -> str:
    """The test set's expected calibration error before and after dividing by a temperature, in words that
    say plainly when the temperature made it worse: '0.18% before, 0.30% after (worse: ...)'.

    The temperature is kept even then: it was fitted on held-out images, and dropping it because of the
    test set's figure would tune on the test set."""
    words = f"{before:.2%} before, {after:.2%} after"
    if f"{after:.2%}" != f"{before:.2%}" and after > before:
        words += " (worse: the temperature fitted on the validation split does not carry over to the test set)"
    return words
