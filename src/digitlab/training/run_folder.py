"""The run folder: its files, claiming it for one run, the saved state, the history, and resuming.

A run folder holds config.toml, the model's checkpoints, state.safetensors (everything needed to go on:
weights, optimiser, generators, position, history), history.json and the plots. `claim` makes a folder
one run's own (a lock, no overwriting by accident, no half-written run left behind); `save_state` and
`read_state` write and read the state with every field checked; `check_resumable` and `restore` decide
whether a saved run can go on as asked, and put it back.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from digitlab.checkpoint import BEST_FILE, WEIGHTS_FILE, read_checkpoint
from digitlab.config import CONFIG_FILE, FIELDS, TrainConfig, check_value, read_config_file
from digitlab.errors import UserError
from digitlab.files import PART_SUFFIX, one_line, prepare_out_dir, regular_file, write_safetensors
from digitlab.models import knobs, model_for
from digitlab.options import MAX_THREADS
from digitlab.signals import SIGNALS
from digitlab.structures import structure_label
from digitlab.training.loop import EPOCH_COLUMNS, History, TrainState
from digitlab.training.optim import make_optimizer

STATE_FILE = "state.safetensors"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
# Everything a run (and `evaluate` on it) writes into its folder; --overwrite removes these.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, BEST_FILE, STATE_FILE, HISTORY_FILE, METRICS_FILE, "loss.png", "loss.svg",
             "confusion.png", "confusion.svg", "worst.png", "worst.svg", TENSORBOARD_DIR)


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds (part of) a run already, or a comparison's results."""
    return any((folder / name).exists() for name in (*RUN_FILES, "results.json"))


def holds_training(folder: Path) -> bool:
    """Whether `folder` is a training run's own (its state, weights or history), not a comparison's."""
    return any((folder / name).exists() for name in (STATE_FILE, WEIGHTS_FILE, HISTORY_FILE))


def fresh_run_dir(base: str | os.PathLike) -> Path:
    """`base` if it holds no run yet, else the first of base-2, base-3, ... that holds none."""
    base = Path(base)
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@contextlib.contextmanager
def claim(out_dir: Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Make `out_dir` this run's own for as long as the block runs.

    Refuses a folder that holds another run (unless `overwrite`, which removes that run's
    files first) and one that another process is training into (a lock), sweeps stale
    temporary files a killed run left, and if the block fails before a state was saved,
    removes what it wrote (and the folder, if it made it): no half-written run is left.
    """
    created = not out_dir.exists()
    out_dir = prepare_out_dir(out_dir)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"'{one_line(str(out_dir))}' is in use: another digitlab run is writing into it; wait "
                        "for it to finish or choose another --out") from None
    try:
        if not resume and holds_run(out_dir):
            if not overwrite:
                raise UserError(f"'{one_line(str(out_dir))}' holds a run already; pass --overwrite to replace it, "
                                "--resume to continue it, or --out for another folder")
            for name in RUN_FILES:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for litter in out_dir.glob(f".*{PART_SUFFIX}"):  # from a run killed while it saved
            litter.unlink(missing_ok=True)
        try:
            yield out_dir
        except BaseException:
            if not (out_dir / STATE_FILE).exists():
                for name in RUN_FILES:
                    path = out_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise
    finally:
        lock.release()


# ---------------------------------------------------------------------------- the saved state and history

STATE_KEY = "digitlab_state"
STATE_FORMAT = 1


def pack(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure for `obj`, with its tensors moved into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(obj, dict):  # as pairs: the optimiser's state is keyed by int, which JSON would make str
        return {"$dict": [[k, pack(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if isinstance(obj, dict) and "$dict" in obj:
        return {k: unpack(v, tensors) for k, v in obj["$dict"]}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def history_record(history: History) -> dict:
    # A shallow dict: dataclasses.asdict would deep-copy 10,000s of floats at every save.
    return {**{f.name: getattr(history, f.name) for f in fields(History)},
            "epoch_mean_loss": history.epoch_mean_loss, "images_per_second": history.images_per_second}


def history_from(record: Any, source: str | os.PathLike = "history") -> History:
    """A History from a history.json's contents (or a state's), checked: one line if it is not one."""
    def numbers(key: str) -> list:
        values = record.get(key, [])
        if not isinstance(values, list) or not all(type(v) in (int, float) for v in values):
            raise UserError(f"{one_line(str(source))}: '{key}' is not a list of numbers; not a digitlab history")
        return values

    if not isinstance(record, dict) or "loss_list" not in record:
        raise UserError(f"{one_line(str(source))}: not a digitlab training history (no loss_list); pass a run "
                        "folder made by `digitlab train`")
    loss_list, batch_loss, log_steps = numbers("loss_list"), numbers("batch_loss"), numbers("log_steps")
    if not batch_loss:  # an older history: the logged losses are all there is
        batch_loss, log_steps = loss_list, list(range(len(loss_list)))
    epochs = record.get("epochs", [])
    return History(loss_list=loss_list, batch_loss=batch_loss, log_steps=log_steps,
                   log_points=[tuple(p) for p in record.get("log_points", []) if isinstance(p, list)],
                   epochs=epochs if isinstance(epochs, list) else [],
                   images=record.get("images", 0), seconds=record.get("seconds", 0.0))


def history_label(record: Any) -> str:
    """A history's model and what its structure changes ('mlp hidden=100'); its model's name alone where
    its config says no more (a hand-made or older history)."""
    model = str(record.get("model")) if isinstance(record, dict) else "?"
    config = record.get("config") if isinstance(record, dict) else None
    if isinstance(config, dict) and isinstance(config.get("structure"), dict):
        try:
            return structure_label(model, config["structure"], knobs(model))
        except (UserError, TypeError, ValueError):  # a model this digitlab does not know
            pass
    return model


def saved_history(record: dict) -> History:
    """The History a state file holds, field by field, exactly as it was."""
    history = History(**{f.name: record[f.name] for f in fields(History)})
    history.log_points = [(p[0], p[1]) for p in history.log_points]
    return history


def save_state(run_dir: Path, config: TrainConfig, state: TrainState, model, optimizer,
               augment: torch.Generator | None, data_info: dict) -> Path:
    """Everything needed to continue the run, in one file written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    rng = {"shuffle": state.shuffle, "torch": torch.get_rng_state(),
           "augment": augment.get_state() if augment is not None else None}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    record = {
        "format": STATE_FORMAT,
        "config": asdict(config),
        "threads": torch.get_num_threads(),  # a resumed run computes on as many, to repeat its sums exactly
        "data": data_info,
        "position": {k: getattr(state, k) for k in ("epoch", "batch", "step", "best_accuracy", "best_epoch",
                                                     "stopped")},
        "history": history_record(state.history),
        "model": pack(model.state_dict(), "model", tensors),
        "optimizer": pack(optimizer.state_dict(), "optimizer", tensors),
        "rng": pack(rng, "rng", tensors),
    }
    return write_safetensors(run_dir / STATE_FILE, tensors, {STATE_KEY: json.dumps(record, allow_nan=False)})


def read_state(run_dir: str | os.PathLike, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of a run folder's state, with one clear line for anything wrong.

    tensors=False reads the JSON record alone (and returns no tensors): enough to check a resume.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.is_dir():
        raise UserError(f"cannot resume '{run_dir}': not a folder; pass a run folder made by `digitlab train`")
    if not path.is_file():
        raise UserError(f"cannot resume '{run_dir}': it holds no {STATE_FILE}; pass a run folder made by "
                        "`digitlab train`")
    broken = f"cannot resume '{run_dir}': {STATE_FILE} is corrupt"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
        loaded = load_file(str(path)) if tensors else {}
        if raw is None:
            raise TypeError("no record")
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError("the record is not a table")
        if record.get("format") != STATE_FORMAT:
            raise UserError(f"cannot resume '{run_dir}': state format {record.get('format')!r}, this digitlab "
                            f"reads format {STATE_FORMAT}; train it again")
        TrainConfig(**record["config"]).resolved()
        missing = [k for k in ("data", "position", "history", "model", "optimizer", "rng") if k not in record]
        if missing:
            raise KeyError(missing[0])
        position, data = record["position"], record["data"]
        if not (isinstance(position, dict) and isinstance(data, dict) and "stopped" in position
                and all(isinstance(position.get(k), int) for k in ("epoch", "batch", "step"))):
            raise ValueError("no valid epoch, batch, step and data")
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise UserError(f"{broken} ({type(e).__name__}: {one_line(str(e))[:100]}); train it again into a new "
                        "folder") from None
    return record, loaded


def read_history(path: str | Path) -> dict:
    """A run's history.json, from the file or its run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise UserError(f"no training history at '{one_line(str(path))}'; pass a run folder made by "
                        "`digitlab train`")
    try:
        return json.loads(regular_file(path, "history").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{one_line(str(path))}: not a readable history file ({one_line(str(e))[:100]})") from None


# ---------------------------------------------------------------------------- resuming

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
    k = next((k for k in FIELDS if k not in RESUMABLE and getattr(config, k) != getattr(saved, k)), None)
    if k is not None:
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
        optimizer = make_optimizer(saved.optimizer, model.parameters(), saved.lr, saved.weight_decay,
                                   (saved.beta1, saved.beta2))
        try:
            restore(record, tensors, model, optimizer, None, torch.device("cpu"))
        except UserError as e:
            why = str(e).split("(", 1)[-1][:100]
            raise _damaged(run_dir, f"its weights or optimiser state do not fit a {saved.model}: {why}") from None


def _check_own_files(run_dir: Path, saved: TrainConfig) -> None:
    """The state must be the folder's own run: its config.toml and its model checkpoint say the same run
    (a state copied in from another run would train that run here)."""
    for name in (WEIGHTS_FILE, CONFIG_FILE):  # both differ: a state copied in; the toml alone: edited
        path = run_dir / name
        if not path.is_file():
            continue  # written again from the state
        try:
            other = (TrainConfig(**read_config_file(path)).resolved() if name == CONFIG_FILE
                     else read_checkpoint(path)[1].config)
        except (UserError, TypeError):
            other = None
        k = next((k for k in FIELDS if k not in RESUMABLE and getattr(other, k, None) != getattr(saved, k)), None)
        if k is not None:
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
