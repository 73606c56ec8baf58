"""Resuming a run: which options may change, whether the saved state fits this run, and putting
the saved weights, optimiser state and generators back."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from digitlab.config import FIELDS, TrainConfig, check_value
from digitlab.errors import UserError
from digitlab.training.folder import HISTORY_FILE, STATE_FILE
from digitlab.training.loop import TrainState
from digitlab.training.state import read_state, saved_history, unpack

# What `--resume` may change: how long the run goes on, and where it runs. Anything else
# would make the resumed run a different run.
RESUMABLE = ("epochs", "patience", "device", "tensorboard")


def resume_config(run_dir: str | os.PathLike, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the options a user gave on top; only RESUMABLE ones may differ."""
    record, _ = read_state(run_dir, tensors=False)
    saved = TrainConfig(**record["config"])
    for key, value in given.items():
        if key not in FIELDS:
            raise UserError(f"unknown option '{key}'")
        if key not in RESUMABLE and value != getattr(saved, key):
            raise UserError(
                f"cannot resume '{run_dir}' with {key} = {value!r}: the run was trained with {getattr(saved, key)!r}; "
                f"--resume may change only {', '.join(RESUMABLE)} (start a new run to change the rest)")
    return replace(saved, **{k: check_value(k, v) for k, v in given.items() if k in RESUMABLE})


def check_resumable(run_dir: Path, config: TrainConfig, record: dict, data_info: dict) -> None:
    saved = TrainConfig(**record["config"])
    different = [k for k in FIELDS if k not in RESUMABLE and getattr(config, k) != getattr(saved, k)]
    if different:
        k = different[0]
        raise UserError(f"cannot resume '{run_dir}' with {k} = {getattr(config, k)!r}: the run was trained with "
                        f"{getattr(saved, k)!r}")
    if any(data_info[k] != record["data"].get(k) for k in ("train", "val", "test", "fingerprint")):
        raise UserError(f"cannot resume '{run_dir}': it was trained on other data ({record['data'].get('source')}, "
                        f"{record['data'].get('train')} training images); pass the same --data-dir")
    position = record["position"]
    done, stopped = position["epoch"], position["stopped"]
    if config.epochs < done or (config.epochs == done and position["batch"] > 0):
        trained = f"{done} epochs and part of another" if position["batch"] else f"{done} epochs"
        raise UserError(f"cannot resume '{run_dir}' with {config.epochs} epochs: it has already trained {trained}")
    if config.epochs != saved.epochs and saved.schedule != "none":
        raise UserError(f"cannot extend '{run_dir}' from {saved.epochs} to {config.epochs} epochs: its "
                        f"{saved.schedule} schedule was planned over {saved.epochs} and would change the steps "
                        "already taken; start a new run with the epochs you want")
    if not _finished(run_dir, done):
        return  # killed after its last epoch, before its final files: resuming writes them
    if stopped == "patience" and config.patience == saved.patience:
        raise UserError(f"'{run_dir}' stopped early after epoch {done - 1}: no better validation accuracy for "
                        f"{saved.patience} epochs; pass a larger --patience (or 0) to train on")
    if done == config.epochs and stopped != "patience":
        raise UserError(f"'{run_dir}' has finished all {done} epochs; pass --epochs N (more than {done}) "
                        "to train it further")


def _finished(run_dir: Path, epochs_done: int) -> bool:
    """Whether the run wrote its final files (history.json) after the state's last epoch, not on a stop."""
    try:
        results = json.loads((run_dir / HISTORY_FILE).read_text(encoding="utf-8")).get("results") or {}
        return results.get("epochs_completed") == epochs_done and not results.get("interrupted")
    except (OSError, ValueError, AttributeError):
        return False


def restore(record: dict, tensors: dict, model, optimizer, augment, device) -> TrainState:
    """Put the saved weights, optimiser state and random generators back; returns the saved position."""
    try:
        model.load_state_dict(unpack(record["model"], tensors))
        optimizer.load_state_dict(unpack(record["optimizer"], tensors))
        rng = unpack(record["rng"], tensors)
        torch.set_rng_state(rng["torch"])
        if augment is not None:
            augment.set_state(rng["augment"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        position = record["position"]
        return TrainState(epoch=position["epoch"], batch=position["batch"], step=position["step"],
                          shuffle=rng["shuffle"], best_accuracy=position["best_accuracy"],
                          best_epoch=position["best_epoch"], stopped=position["stopped"],
                          history=saved_history(record["history"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot resume: {STATE_FILE} does not fit this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); train it again into a new folder") from None
