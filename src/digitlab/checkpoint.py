"""Checkpoints: weights plus everything needed to rebuild the model, in one safetensors file.

safetensors holds tensors and a string-to-string metadata map, and loading it runs no
pickled code. The metadata holds one JSON document, a `CheckpointMeta`: the training config
(which names the model, the task and the seed), the pixel normalisation, where the weights
stand (epochs, validation accuracy, calibration) and the results of the run. It is checked
whole when read, so a consumer reads its attributes and never a missing key.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from digitlab.config import FIELDS, TrainConfig
from digitlab.data import PIXEL_CENTER, PIXEL_SCALE
from digitlab.errors import UserError
from digitlab.files import one_line, write_safetensors
from digitlab.models import checked_structure, list_models, model_for, place
from digitlab.options import problem
from digitlab.tasks import TASKS, Task, get_task

FORMAT_VERSION = 2  # 2: each fact once (model, task and seed in the config only); format 1 is read too
WEIGHTS_FILE = "model.safetensors"  # a run's last weights
BEST_FILE = "best.safetensors"  # its weights at the best validation accuracy, when it validated
META_KEY = "digitlab"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about its weights."""

    config: TrainConfig  # the run's options: model, task, seed and the recipe
    epochs: int = 0  # epochs behind these weights
    normalization: dict = field(default_factory=lambda: {"center": PIXEL_CENTER, "scale": PIXEL_SCALE})
    final_loss: float | None = None  # the last batch's loss
    best_epoch: int | None = None  # the epoch with the best validation accuracy, and that accuracy
    val_accuracy: float | None = None
    temperature: float | None = None  # calibrated confidence: softmax(logits / temperature)
    data: dict | None = None  # what it was trained on: source, sample, sizes, fingerprint
    world_size: int = 1  # how it was trained: processes, and their backend (None for one)
    backend: str | None = None
    results: dict | None = None  # the run's figures, in its final checkpoints

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def task(self) -> Task:
        return get_task(self.config.task or "")  # read_checkpoint has checked it is one

    def as_json(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, meta: Any, path: str | os.PathLike) -> CheckpointMeta:
        """The metadata, if every value is possible; else one UserError. Checked before anything is
        built, so a tiny file that claims a 10^8-wide output layer costs nothing."""
        def bad(what: str) -> UserError:
            return UserError(f"{path}: impossible checkpoint metadata: {what}; train again to rebuild it")

        if not isinstance(meta, dict):
            raise bad(f"a {type(meta).__name__} instead of a table")
        if meta.get("format") == 1:
            meta = _from_format_1(meta, bad)
        elif meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{path}: checkpoint format {one_line(repr(meta.get('format')))[:40]}, this digitlab "
                            f"reads formats 1 and {FORMAT_VERSION}; train again with this version")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(meta) - known - {"format"})
        if unknown:
            raise bad(f"unknown field {one_line(repr(unknown[0]))[:60]}")
        values = {k: v for k, v in meta.items() if k != "format"}
        values["config"] = _checked_config(meta.get("config"), bad, path)
        _check_values(values, bad)
        return cls(**values)


def _checked_config(config: Any, bad, path: str | os.PathLike) -> TrainConfig:
    """The run's TrainConfig from its JSON table: known options, possible values, a registered model."""
    if not isinstance(config, dict):
        raise bad("config must be a table of training options")
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise bad(f"unknown option {one_line(repr(unknown[0]))[:60]} in config")
    for key, value in config.items():
        wrong = key not in ("model", "task") and problem(key, value, TrainConfig)
        if wrong:
            raise bad(f"{key} {wrong}")
    model = config.get("model")
    if isinstance(model, str) and model not in list_models():
        raise UserError(f"{path}: its model '{one_line(model)[:60]}' is not one of digitlab's "
                        f"({', '.join(list_models())}): a model registered from Python (register_model) is read from "
                        "Python once it is registered again (docs/python.md)")
    if model not in list_models():
        raise bad(f"model {one_line(repr(model))[:60]} is not one of {', '.join(list_models())}")
    task = config.get("task")
    if not isinstance(task, str) or task not in TASKS:
        raise bad(f"task {one_line(repr(task))[:60]} is not one of {', '.join(TASKS)}")
    try:  # an older checkpoint has no structure: the model's defaults, which it was trained with
        structure = checked_structure(model, config.get("structure", {}), TASKS[task].outputs)
    except UserError as e:
        raise bad(f"structure: {e}") from None
    return TrainConfig(**{**config, "structure": structure})


def _check_values(values: dict, bad) -> None:
    norm = values.get("normalization", {"center": PIXEL_CENTER, "scale": PIXEL_SCALE})
    if not (isinstance(norm, dict) and set(norm) == {"center", "scale"} and all(
            type(v) in (int, float) and _finite(v) for v in norm.values()) and norm["scale"] > 0):
        raise bad("normalization must be {center, scale} with a scale above 0")
    for key, kinds in (("epochs", (int,)), ("best_epoch", (int,)), ("world_size", (int,)),
                       ("val_accuracy", (int, float)), ("final_loss", (int, float))):
        if values.get(key) is not None and (type(values[key]) not in kinds or not _finite(values[key])):
            raise bad(f"{key} {one_line(repr(values[key]))[:60]}")
    t = values.get("temperature")
    if t is not None and (type(t) not in (int, float) or not _finite(t) or t <= 0):
        raise bad(f"temperature {one_line(repr(t))[:60]} (a number above 0)")
    for key in ("results", "data"):
        if values.get(key) is not None and not isinstance(values[key], dict):
            raise bad(f"{key} must be a table")
    if values.get("backend") is not None and not isinstance(values["backend"], str):
        raise bad(f"backend {one_line(repr(values['backend']))[:60]}")


def _from_format_1(meta: dict, bad) -> dict:
    """A format-1 table (model, task, num_outputs and seed also at the top) as format 2's fields. Its
    output width must be its task's, as format 2's is by construction."""
    saved = meta.get("config")
    config = {**(saved if isinstance(saved, dict) else {}), "model": meta.get("model"), "task": meta.get("task")}
    task = meta.get("task")
    if isinstance(task, str) and task in TASKS:
        outputs = meta.get("num_outputs")
        if type(outputs) is not int or outputs != TASKS[task].outputs:
            raise bad(f"num_outputs {one_line(repr(outputs))[:60]}; a {task} model has {TASKS[task].outputs}")
    dropped = ("format", "model", "task", "num_outputs", "seed", "config")
    return {"format": FORMAT_VERSION, **{k: v for k, v in meta.items() if k not in dropped}, "config": config}


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder's: its best checkpoint where it has one, else its last."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file() and not (path / BEST_FILE).is_file():
            raise UserError(f"no checkpoint at '{one_line(str(path))}': the folder holds no {WEIGHTS_FILE}; pass a run "
                            "folder (runs/NAME) or its checkpoint file")
        path = path / BEST_FILE if (path / BEST_FILE).is_file() else path / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at '{one_line(str(path))}'; pass a run folder or its {WEIGHTS_FILE}")
    return path


def save_checkpoint(path: str | os.PathLike, model, meta: CheckpointMeta) -> Path:
    """Write weights and metadata atomically: a crash leaves the old file or none, never half."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_safetensors(path, tensors, {META_KEY: json.dumps(meta.as_json(), allow_nan=False)})


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, CheckpointMeta]:
    """(state_dict, meta) from a checkpoint file or run folder, with clear errors for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        state = load_file(str(path))
    except OSError as e:  # the file is there but cannot be read (permissions, a failing disk)
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (SafetensorError, ValueError) as e:
        if path.suffix.lower() == ".onnx":
            raise UserError(f"{path}: an exported ONNX model, which digitlab serve runs; give this command a run "
                            f"folder or its {WEIGHTS_FILE}") from None
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{path}: not a checkpoint; give a run folder (runs/NAME) or its {WEIGHTS_FILE}") from None
        raise UserError(f"{path}: not a readable checkpoint ({one_line(str(e))}); it is damaged: train again to "
                        "rebuild it") from None
    if raw is None:
        raise UserError(f"{path}: a safetensors file without digitlab metadata; it was not written by digitlab")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, and ints too long to convert, are ValueErrors
        raise UserError(f"{path}: corrupt digitlab metadata; train again to rebuild it") from None
    return state, CheckpointMeta.from_json(meta, path)


def _finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)  # isfinite() overflows on a huge int


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild the model from a checkpoint alone: returns (model in eval mode, meta)."""
    import torch

    state, meta = read_checkpoint(path)
    model = model_for(meta.config)  # the model, its structure and its task, checked by read_checkpoint
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{resolve(path)}: weights do not fit model '{meta.model}' ({first})") from None
    return place(model, torch.device(device)).eval(), meta


def describe(path: str | os.PathLike, meta: CheckpointMeta) -> str:
    """Which checkpoint this is, in words: 'runs/x/best.safetensors (best validation accuracy 99.12%, epoch 3)'."""
    path = resolve(path)
    if path.name == BEST_FILE and meta.val_accuracy is not None:
        return f"{path} (best validation accuracy {meta.val_accuracy:.2%}, epoch {meta.best_epoch})"
    return f"{path} (the last epoch's weights, {meta.epochs} epochs)"
