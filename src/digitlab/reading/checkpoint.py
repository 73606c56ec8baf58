"""Checkpoints: weights plus everything needed to rebuild the model, in one safetensors file.

safetensors holds tensors and a string-to-string metadata map, and loading it runs no
pickled code. The metadata holds one JSON document: the training config, the model
name and output width, the pixel normalisation, and the results of the run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from digitlab.errors import UserError
from digitlab.files import one_line, write_safetensors
from digitlab.models import create_model, list_models, place
from digitlab.tasks import TASKS

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"  # a run's last weights
BEST_FILE = "best.safetensors"  # its weights at the best validation accuracy, when it validated
META_KEY = "digitlab"


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder's: its best checkpoint where it has one, else its last."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST_FILE if (path / BEST_FILE).is_file() else path / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}'; pass a run folder or its {WEIGHTS_FILE}")
    return path


def save_checkpoint(path: str | os.PathLike, model, meta: dict[str, Any]) -> Path:
    """Write weights and metadata atomically: a crash leaves the old file or none, never half."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, **meta}
    return write_safetensors(path, tensors, {META_KEY: json.dumps(meta, allow_nan=False)})


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(state_dict, meta) from a checkpoint file or run folder, with clear errors for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e}); train again to rebuild it") from None
    if raw is None:
        raise UserError(f"{path}: a safetensors file without digitlab metadata; it was not written by digitlab")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, and ints too long to convert, are ValueErrors
        raise UserError(f"{path}: corrupt digitlab metadata; train again to rebuild it") from None
    return state, checked_meta(meta, path)


def checked_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The metadata, if every value that rebuilding and reporting use is possible; else one UserError.

    Checked before anything is built, so a tiny file that claims a 10^8-wide output layer
    costs nothing: the output width must be the one its task has.
    """
    def bad(what: str) -> UserError:
        return UserError(f"{path}: impossible checkpoint metadata: {what}; train again to rebuild it")

    if not isinstance(meta, dict):
        raise bad(f"a {type(meta).__name__} instead of a table")
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {one_line(repr(meta.get('format')))[:40]}, this digitlab reads "
                        f"format {FORMAT_VERSION}; train again with this version")
    if meta.get("model") not in list_models():
        raise bad(f"model {one_line(repr(meta.get('model')))[:60]} is not one of {', '.join(list_models())}")
    task = meta.get("task")
    if not isinstance(task, str) or task not in TASKS:
        raise bad(f"task {one_line(repr(task))[:60]} is not one of {', '.join(TASKS)}")
    outputs = meta.get("num_outputs")
    if type(outputs) is not int or outputs != TASKS[task].outputs:
        raise bad(f"num_outputs {one_line(repr(outputs))[:60]}; a {task} model has {TASKS[task].outputs}")
    norm = meta.get("normalization")
    if norm is not None and not (isinstance(norm, dict) and set(norm) == {"center", "scale"} and all(
            type(v) in (int, float) and _finite(v) for v in norm.values()) and norm["scale"] > 0):
        raise bad("normalization must be {center, scale} with a scale above 0")
    for key, kinds in (("epochs", (int,)), ("best_epoch", (int,)), ("val_accuracy", (int, float))):
        if meta.get(key) is not None and (type(meta[key]) not in kinds or not _finite(meta[key])):
            raise bad(f"{key} {one_line(repr(meta[key]))[:60]}")
    t = meta.get("temperature")
    if t is not None and (type(t) not in (int, float) or not _finite(t) or t <= 0):
        raise bad(f"temperature {one_line(repr(t))[:60]} (a number above 0)")
    if meta.get("results") is not None and not isinstance(meta["results"], dict):
        raise bad("results must be a table")
    return meta


def _finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)  # isfinite() overflows on a huge int


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild the model from a checkpoint alone: returns (model in eval mode, meta)."""
    import torch

    state, meta = read_checkpoint(path)
    model = create_model(meta["model"], num_outputs=meta["num_outputs"])  # both checked by read_checkpoint
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{resolve(path)}: weights do not fit model '{meta['model']}' ({first})") from None
    return place(model, torch.device(device)).eval(), meta


def describe(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Which checkpoint this is, in words: 'runs/x/best.safetensors (best validation accuracy 99.12%, epoch 3)'."""
    path = resolve(path)
    if path.name == BEST_FILE and meta.get("val_accuracy") is not None:
        return f"{path} (best validation accuracy {meta['val_accuracy']:.2%}, epoch {meta.get('best_epoch')})"
    return f"{path} (the last epoch's weights, {meta.get('epochs')} epochs)"
