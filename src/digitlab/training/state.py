"""A run's saved state (state.safetensors: weights, optimiser, generators, position, history)
and its history.json, written and read with every field checked."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from digitlab.config import TrainConfig
from digitlab.errors import UserError
from digitlab.files import one_line, regular_file, write_safetensors
from digitlab.training.folder import HISTORY_FILE, STATE_FILE
from digitlab.training.loop import History, TrainState

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
        from digitlab.models import knobs
        from digitlab.structures import structure_label

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
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

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
