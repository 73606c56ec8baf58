"""Optimisers and learning-rate schedules.

A schedule is a pure function of the step: `lr_factor(schedule, step, total)`. Its
position in a run is the step count alone, which is what makes a resumed run take the
same learning rates as one left alone.
"""
from __future__ import annotations

import math

import torch

from digitlab.config import ADAM_BETAS, OPTIMIZERS, SCHEDULES
from digitlab.errors import UserError


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = ADAM_BETAS) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


ONECYCLE_WARMUP = 0.25  # fraction of the steps spent warming up
ONECYCLE_START = 0.04  # warm-up starts at lr / 25, as torch's OneCycleLR does


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier on the base learning rate at `step` of `total` (a pure function).

    step: x0.1 at 50% and again at 75% of training; cosine: half a cosine from 1 to 0;
    onecycle: linear warm-up from 0.04 to 1 over the first quarter, then cosine to 0.
    """
    t = min(step / max(total, 1), 1.0)
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        if t < ONECYCLE_WARMUP:
            return ONECYCLE_START + (1 - ONECYCLE_START) * t / ONECYCLE_WARMUP
        return 0.5 * (1 + math.cos(math.pi * (t - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)))
    raise UserError(f"unknown schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
