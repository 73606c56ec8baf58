"""Resuming a run: which options may change, whether the saved state fits this run, and putting
the saved weights, optimiser state and generators back."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from digitlab.config import (
    CONFIG_FILE,
    FIELDS,
    TrainConfig,
    check_value,
    read_config_file,
)
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.signals import SIGNALS
from digitlab.training.folder import HISTORY_FILE, STATE_FILE, WEIGHTS_FILE
from digitlab.training.loop import EPOCH_COLUMNS, History, TrainState
from digitlab.training.state import read_state, saved_history, unpack
from digitlab.training.threads import MAX_THREADS

# What `--resume` may change: how long the run goes on, and where it runs. Anything else
# would make the resumed run a different run.
RESUMABLE = ("epochs", "patience", "device", "tensorboard")


def resume_config(run_dir: str | os.PathLike, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the options a user gave on top; only RESUMABLE ones may differ."""
    record, _ = read_state(run_dir, tensors=False)
    saved = TrainConfig(**record["config"]).resolved()  # an older run's: its structure's defaults filled in
    for key, value in given.items():
        if key not in FIELDS:
            raise UserError(f"unknown option '{key}'")
        if key not in RESUMABLE and value != getattr(saved, key):
            raise UserError(
                f"cannot resume '{run_dir}' with {key} = {value!r}: the run was trained with {getattr(saved, key)!r}; "
                f"--resume may change only {', '.join(RESUMABLE)} (start a new run to change the rest)")
    return replace(saved, **{k: check_value(k, v) for k, v in given.items() if k in RESUMABLE})


def check_resumable(run_dir: Path, config: TrainConfig, record: dict, tensors: dict, data_info: dict) -> None:
    """Whether the run in `run_dir` (its state's `record` and `tensors`) can go on as `config` on this data: one
    line saying why not. Called before the folder is touched."""
    saved = TrainConfig(**record["config"]).resolved()
    different = [k for k in FIELDS if k not in RESUMABLE and getattr(config, k) != getattr(saved, k)]
    if different:
        k = different[0]
        raise UserError(f"cannot resume '{run_dir}' with {k} = {getattr(config, k)!r}: the run was trained with "
                        f"{getattr(saved, k)!r}")
    if any(data_info[k] != record["data"].get(k) for k in ("train", "val", "test", "fingerprint")):
        raise UserError(f"cannot resume '{run_dir}': it was trained on other data ({record['data'].get('source')}, "
                        f"{record['data'].get('train')} training images); pass the same --data-dir")
    check_record(run_dir, record, saved, data_info["train"] // saved.batch_size)
    check_tensors(run_dir, record, tensors, saved)
    _check_own_files(run_dir, saved)
    position = record["position"]
    done, stopped = position["epoch"], position["stopped"]
    if config.epochs < done or (config.epochs == done and position["batch"] > 0):
        trained = f"{done} epoch{'s' * (done != 1)}" + (" and part of another" if position["batch"] else "")
        if saved.schedule != "none":  # its schedule was planned over its epochs: only those go
            accepted = f"--epochs {saved.epochs}"
        else:
            accepted = f"--epochs {done + (position['batch'] > 0 or _finished(run_dir, done))} or more"
        raise UserError(f"cannot resume '{run_dir}' with --epochs {config.epochs}: it has already trained {trained}; "
                        f"give {accepted}")
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


def _damaged(run_dir: Path, what: str) -> UserError:
    return UserError(f"cannot resume '{one_line(str(run_dir))}': {STATE_FILE} is damaged or edited ({what}); "
                     "train it again into a new folder")


def check_record(run_dir: Path, record: dict, saved: TrainConfig, batches: int) -> None:
    """Every field of a state's position and history, by type and range, before anything uses them (a
    hand-edited or damaged state file). `batches`: the batches in one of its epochs."""
    def count(value, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    def number(value) -> bool:
        return type(value) in (int, float) and math.isfinite(value)

    position, history = record["position"], record["history"]
    batches = max(1, min(saved.max_batches or batches, batches))
    epoch, batch, step = position["epoch"], position["batch"], position["step"]
    if not count(epoch, 0, saved.epochs):
        raise _damaged(run_dir, f"epoch {epoch!r} is not from 0 to its {saved.epochs} epochs")
    if not count(batch, 0, batches - 1) or (epoch == saved.epochs and batch):
        raise _damaged(run_dir, f"batch {batch!r} is not from 0 to {batches - 1}" if epoch < saved.epochs
                       else f"batch {batch!r} after the last epoch")
    if not isinstance(history, dict) or any(f not in history for f in History.__dataclass_fields__):
        raise _damaged(run_dir, "its history is not a digitlab history")
    for key in ("loss_list", "batch_loss"):
        if not isinstance(history[key], list) or not all(number(v) for v in history[key]):
            raise _damaged(run_dir, f"'{key}' is not a list of numbers")
    if not count(step, 0, 2**62) or step != len(history["batch_loss"]) or step != epoch * batches + batch:
        raise _damaged(run_dir, f"step {step!r} does not match epoch {epoch}, batch {batch} and its "
                                f"{len(history['batch_loss'])} batch losses")
    if not isinstance(history["log_steps"], list) or not all(count(v, 0, step) for v in history["log_steps"]) \
            or len(history["log_steps"]) != len(history["loss_list"]):
        raise _damaged(run_dir, "'log_steps' do not match its losses")
    if not isinstance(history["log_points"], list) or not all(
            isinstance(p, list) and len(p) == 2 and all(count(v, 0, 2**62) for v in p) for p in history["log_points"]):
        raise _damaged(run_dir, "'log_points' are not (epoch, batch) pairs")
    rows = history["epochs"]
    if not isinstance(rows, list) or len(rows) != epoch or not all(
            isinstance(r, dict) and set(r) <= set(EPOCH_COLUMNS) and "train_loss" in r
            and all(v is None or number(v) for v in r.values()) for r in rows):
        raise _damaged(run_dir, f"its {len(rows) if isinstance(rows, list) else 'missing'} epoch rows do not match "
                                f"epoch {epoch}, or hold other than {', '.join(EPOCH_COLUMNS)}")
    if not (count(history["images"], 0, 2**62) and number(history["seconds"]) and history["seconds"] >= 0):
        raise _damaged(run_dir, "'images' or 'seconds' is not a count")
    best, best_epoch = position.get("best_accuracy"), position.get("best_epoch")
    if (best is None) != (best_epoch is None) or (best is not None and not (
            number(best) and 0 <= best <= 1 and count(best_epoch, 0, max(0, epoch - 1)))):
        raise _damaged(run_dir, f"best accuracy {best!r} at epoch {best_epoch!r} is not an accuracy of an epoch done")
    if position["stopped"] not in (None, "patience", *SIGNALS):
        raise _damaged(run_dir, f"stopped {position['stopped']!r}")
    if record.get("threads") is not None and not count(record["threads"], 1, MAX_THREADS):
        raise _damaged(run_dir, f"threads {record['threads']!r} is not from 1 to {MAX_THREADS}")


def check_tensors(run_dir: Path, record: dict, tensors: dict, saved: TrainConfig) -> None:
    """The state's weights and optimiser state fit its model (put back into a scratch copy of it), and its
    generators' states are generators' states."""
    from digitlab.models import model_for
    from digitlab.training.optim import make_optimizer

    try:
        rng = unpack(record["rng"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _damaged(run_dir, f"{type(e).__name__}: {one_line(str(e))[:80]}") from None
    generator = torch.get_rng_state()
    for key in ("shuffle", "torch", "augment"):
        value = rng.get(key) if isinstance(rng, dict) else None
        if (key == "augment" and value is None and not (saved.augment or saved.reject)) or (
                isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == generator.shape):
            continue
        raise _damaged(run_dir, f"the {key} generator's state is not one")
    with torch.random.fork_rng(devices=[]):  # the scratch model's weights are drawn, then forgotten
        model = model_for(saved)
        assert saved.lr is not None  # a saved config is a resolved one
        optimizer = make_optimizer(saved.optimizer, model.parameters(), saved.lr, saved.weight_decay)
        try:
            restore(record, tensors, model, optimizer, None, torch.device("cpu"))
        except UserError as e:
            why = str(e).split("(", 1)[-1][:100]
            raise _damaged(run_dir, f"its weights or optimiser state do not fit a {saved.model}: {why}") from None


def _check_own_files(run_dir: Path, saved: TrainConfig) -> None:
    """The state must be the folder's own run: its config.toml and its model checkpoint say the same run
    (a state copied in from another run would train that run here)."""
    from digitlab.reading.checkpoint import read_checkpoint

    for name in (WEIGHTS_FILE, CONFIG_FILE):  # both differ: a state copied in; the toml alone: edited
        path = run_dir / name
        if not path.is_file():
            continue  # written again from the state
        try:
            other = (TrainConfig(**read_config_file(path)).resolved() if name == CONFIG_FILE
                     else read_checkpoint(path)[1].config)
        except (UserError, TypeError):
            other = None
        differ = [k for k in FIELDS if k not in RESUMABLE and getattr(other, k, None) != getattr(saved, k)]
        if differ:
            k = differ[0]
            theirs, ours, where = getattr(other, k, None), getattr(saved, k), one_line(str(run_dir))
            raise UserError(f"cannot resume '{where}': its {name} says {k} = {theirs!r} but {STATE_FILE} has "
                            f"{ours!r}; the state is what --resume continues: put {name} back as it was, or start a "
                            f"new run (--config {one_line(str(path))})" if name == CONFIG_FILE else
                            f"cannot resume '{where}': its {STATE_FILE} is from another run ({k} = {ours!r}, its "
                            f"{name} has {theirs!r}); train it again into a new folder")


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
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
        raise UserError(f"cannot resume: {STATE_FILE} does not fit this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); train it again into a new folder") from None
