"""Checkpoints: weights plus everything needed to rebuild the model, in one safetensors file.

safetensors holds tensors and a string-to-string metadata map, and loading it runs no
pickled code. The metadata holds one JSON document: the training config, the model
name and output width, the pixel normalisation, and the results of the run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_path

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
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, **meta}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


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
    except json.JSONDecodeError:
        raise UserError(f"{path}: corrupt digitlab metadata; train again to rebuild it") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {meta.get('format')!r}, this digitlab reads format {FORMAT_VERSION}; "
            "train again with this version"
        )
    return state, meta


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild the model from a checkpoint alone: returns (model in eval mode, meta)."""
    import torch

    from .models import create_model, place

    state, meta = read_checkpoint(path)
    try:
        model = create_model(meta["model"], num_outputs=meta["num_outputs"])
    except (KeyError, TypeError):
        raise UserError(f"{resolve(path)}: checkpoint metadata lacks the model name or output width") from None
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
