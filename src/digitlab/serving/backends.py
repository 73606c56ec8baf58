"""The models a server reads with: a run's PyTorch model, or an exported ONNX file run by onnxruntime.

Both take prepared digits, uint8 (N, 28, 28) as `find_digits` makes them, and give the model's
outputs as a float (N, outputs) array, which the task turns into answers. Neither PyTorch nor
onnxruntime is imported until a model of its kind is loaded: a server of ONNX files runs without
PyTorch (`pip install -e '.[serve-onnx]'`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.tasks import TASKS, Task

MAX_MAPS = 32  # feature maps drawn per layer: enough to see what a layer does, small enough to send
ONNX_FACTS = "digitlab"  # the metadata key under which `digitlab export` writes the model's facts


class ServedModel:
    """One loaded model: its name on the page, its task and calibration, and what the page shows of it."""

    name: str
    task: Task
    temperature: float | None
    facts: dict  # model, params, test_accuracy, val_accuracy, trained_on, checkpoint, conv_layers

    def outputs(self, digits: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> float (N, outputs)."""
        raise NotImplementedError

    def feature_maps(self, digit: np.ndarray) -> list[dict]:
        """Each conv layer's maps for one digit (28, 28), as pictures; none where the model has no layers to show."""
        return []

    def info(self) -> dict:
        return {"name": self.name, "task": self.task.name, **self.facts}


class TorchModel(ServedModel):
    """A run folder's (or checkpoint's) model, on PyTorch. Feature maps come from a copy of its own,
    so that drawing them never holds up the batched readings."""

    def __init__(self, name: str, path: str | os.PathLike):
        import copy

        import torch
        from torch import nn

        from digitlab.checkpoint import describe, load_checkpoint

        model, meta = load_checkpoint(path)
        # Serving, not training: each model's batches run on one thread, the other cores read pictures.
        torch.set_num_threads(1)
        self.name, self.task, self.temperature = name, meta.task, meta.temperature
        self.model, self.norm = model.eval(), meta.normalization
        self.convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        self.facts = {**model_facts(model, meta), "checkpoint": describe(path, meta), "conv_layers": self.convs}
        self._maps_model, self._maps_lock = copy.deepcopy(self.model), threading.Lock()

    def _forward(self, model, digits: np.ndarray):
        import torch

        from digitlab.data import normalize

        with torch.inference_mode():
            return model(normalize(torch.from_numpy(digits), **self.norm)).float()

    def outputs(self, digits: np.ndarray) -> np.ndarray:
        outputs = self._forward(self.model, digits).numpy()
        if not np.isfinite(outputs).all():  # a diverged or damaged model answers NaN for every digit
            raise UserError("the model's outputs are NaN or infinite: its weights are broken (from a run that "
                            "diverged?); train it again, with a lower --lr")
        return outputs

    def feature_maps(self, digit: np.ndarray) -> list[dict]:
        captured: dict[str, Any] = {}
        modules = dict(self._maps_model.named_modules())
        with self._maps_lock:
            hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out[0]))
                     for n in self.convs]
            try:
                self._forward(self._maps_model, digit[None])
            finally:
                for h in hooks:
                    h.remove()
        return [{"layer": n, "shape": list(captured[n].shape), "shown": min(len(captured[n]), MAX_MAPS),
                 "grid": png_data_url(feature_grid(captured[n].numpy()))} for n in self.convs]


class OnnxModel(ServedModel):
    """An ONNX file from `digitlab export`, run by onnxruntime: no PyTorch needed."""

    def __init__(self, name: str, path: str | os.PathLike):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("serving an .onnx file needs onnxruntime: pip install -e '.[serve-onnx]' in "
                            "digitlab's folder") from None
        options = ort.SessionOptions()
        # Serving, not training, as for PyTorch above: one thread; the other cores read pictures. (One
        # thread per core served 15% fewer requests: its pool's threads spin while they wait.)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # its warnings are not the user's to read
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own kinds for a broken or foreign file
            raise UserError(f"{one_line(str(path))}: not an ONNX model onnxruntime can run "
                            f"({one_line(str(e))[:160]}); export one with digitlab export RUN --out FILE") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        task = next((t for t in TASKS.values() if [o.name for o in outputs] == [t.onnx_output]), None)
        if [i.name for i in inputs] != ["image"] or task is None:
            raise UserError(f"{one_line(str(path))}: not an ONNX file from digitlab export (it takes "
                            f"{[i.name for i in inputs]} and gives {[o.name for o in outputs]}, not 'image' "
                            "and 'logits' or 'value')")
        props = self.session.get_modelmeta().custom_metadata_map
        facts = _facts(props.get(ONNX_FACTS))
        temperature = props.get("temperature")
        self.name, self.task = name, task
        self.temperature = float(temperature) if temperature and np.isfinite(float(temperature)) else None
        structure = facts.get("structure")  # an older export has none; a file's text is shown cut, as text
        self.facts = {"model": facts.get("model", Path(path).stem), "params": facts.get("params"),
                      "structure": structure[:200] if isinstance(structure, str) else None,
                      "test_accuracy": facts.get("test_accuracy"), "val_accuracy": facts.get("val_accuracy"),
                      "trained_on": facts.get("trained_on"), "checkpoint": f"{Path(path).resolve()} (ONNX)",
                      "conv_layers": []}

    def outputs(self, digits: np.ndarray) -> np.ndarray:
        pixels = digits.astype(np.float32)[:, None]  # (N, 1, 28, 28), 0-255: the graph normalises
        return self.session.run(None, {"image": pixels})[0].astype(np.float64)


def _facts(text: str | None) -> dict:
    try:
        facts = json.loads(text) if text else {}
    except ValueError:
        return {}
    return facts if isinstance(facts, dict) else {}


def model_facts(model, meta) -> dict:
    """What the page shows of a checkpoint's model (and `digitlab export` writes into an ONNX file):
    its name, its structure ('mlp hidden=100 activation=relu'; the layers of a layer list), parameter
    count, test and validation accuracy, and what it was trained on."""
    results = meta.results or {}
    return {"model": meta.model, "structure": meta.config.label, "params": sum(p.numel() for p in model.parameters()),
            "test_accuracy": results.get("test_accuracy"), "val_accuracy": meta.val_accuracy,
            "trained_on": trained_on(meta.data)}


def trained_on(data: dict | None) -> str | None:
    """What a model was trained on, in a few words for the page: '55,000 MNIST digits' or 'the offline
    sample's 4,000 digits'."""
    if not isinstance(data, dict) or not isinstance(data.get("train"), int):
        return None
    if data.get("sample"):
        return f"the offline sample's {data['train']:,} digits"
    return f"{data['train']:,} MNIST digits"


def load_models(paths: list[str | os.PathLike]) -> list[ServedModel]:
    """Run folders, checkpoints and .onnx files, in the order given, each with a name of its own."""
    if not paths:
        raise UserError("serve needs at least one run folder, checkpoint or .onnx file")
    loaded: list[ServedModel] = []
    names: set[str] = set()
    for path in map(Path, paths):
        name = path.name if path.is_dir() else (path.stem if path.suffix == ".onnx" else path.parent.name)
        while name in names:  # two folders of one name in different places
            name += "'"
        names.add(name)
        if path.suffix == ".onnx":
            if not path.is_file():
                raise UserError(f"no such file: '{one_line(str(path))}'")
            loaded.append(OnnxModel(name, path))
        else:
            try:
                loaded.append(TorchModel(name, path))
            except ImportError as e:
                raise UserError(f"serving a run folder needs PyTorch ({e.name} is missing): pip install -e '.[serve]' "
                                "in digitlab's folder, or serve an exported .onnx file") from None
    return loaded


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W) grey -> a PNG data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def feature_grid(maps: np.ndarray) -> np.ndarray:
    """(C, H, W) activations -> one uint8 picture of up to MAX_MAPS maps in a grid, each map scaled to
    its own range, with a one-pixel gap."""
    maps = np.asarray(maps[:MAX_MAPS], dtype=np.float32)
    c, h, w = maps.shape
    low = maps.min((1, 2), keepdims=True)
    span = np.maximum(maps.max((1, 2), keepdims=True) - low, 1e-6)
    scaled = np.round((maps - low) / span * 255).astype(np.uint8)
    cols = min(c, 8)
    rows = -(-c // cols)
    grid = np.zeros((rows * (h + 1) - 1, cols * (w + 1) - 1), np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = scaled[k]
    return grid
