"""Honest confidence: temperature scaling (Guo et al., 2017) and the expected calibration error.

A classifier trained with cross-entropy tends to be over-confident: it says 99% where it is
right 95% of the time. Dividing its logits by one number T > 1 (fitted on held-out images,
by minimising their negative log-likelihood) softens every answer alike; the top digit and
so the accuracy do not change. The expected calibration error (ECE) measures the gap: sort
answers into bins by confidence, and average |accuracy - confidence| over the bins,
weighted by how many answers each holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
