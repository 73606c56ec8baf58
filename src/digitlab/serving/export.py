"""`digitlab export`: a run's model as an ONNX file that needs nothing of digitlab to use.

The graph takes `image`, float32 (N, 1, 28, 28) in pixel units 0-255, white ink on black
as MNIST stores it (and as `preprocess` returns it), for any batch size N. The model's own
normalisation is part of the graph, so a user needs no constants. The output is `logits`
(N, 10) for a classifier, or `value` (N, 1) for the chapter's regression models. A
calibrated classifier's temperature T is in the file's metadata (`temperature`): its
calibrated probabilities are softmax(logits / T). The model's facts (name, parameters, test
accuracy, what it was trained on) are there too, as JSON under `digitlab`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from digitlab.checkpoint import load_checkpoint
from digitlab.errors import UserError
from digitlab.files import file_target, one_line, sweep_parts, write_atomic
from digitlab.serving.backends import ONNX_FACTS, model_facts


class PixelInput(nn.Module):
    """The model behind its normalisation: pixels 0-255 in, the model's outputs out."""

    def __init__(self, model: nn.Module, center: float, scale: float):
        super().__init__()
        self.model, self.center, self.scale = model, center, scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.center) / self.scale)  # (N, 1, 28, 28) pixels -> the model's range


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, opset: int = 17, overwrite: bool = False) -> Path:
    """Write the run's model (its best checkpoint where it has one) to `out` as ONNX; returns `out`.
    An existing `out` is replaced only with `overwrite`, as `train` reuses a folder only with it."""
    try:
        import onnx
    except ImportError:
        raise UserError("export needs the onnx extra: pip install -e '.[onnx]' in digitlab's folder "
                        "(or make setup)") from None
    out = file_target(out)  # before any work: a folder, a device or a used name is refused at once
    if out.parent != Path("") and not out.parent.is_dir():
        raise UserError(f"cannot write '{one_line(str(out))}': its folder does not exist")
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"'{one_line(str(out))}' exists; add --overwrite to replace it, or choose another --out")
    model, meta = load_checkpoint(run)
    # Eval mode fixes the graph: dropout off, BatchNorm's running statistics, the index-free pool.
    wrapped = PixelInput(model.to(memory_format=torch.contiguous_format), **meta.normalization).eval()
    output = meta.task.onnx_output

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter: the torch.export-based one would need onnxscript as
            # well, for the same graph of these small models.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=[output],
                              dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}})
        graph = onnx.load(str(tmp))
        props = {ONNX_FACTS: json.dumps(model_facts(model, meta))}  # what `digitlab serve MODEL.onnx` shows
        if meta.temperature is not None:  # calibrated confidence: softmax(logits / temperature)
            props["temperature"] = repr(meta.temperature)
        onnx.helper.set_model_props(graph, props)
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(graph)

    sweep_parts(out)  # what an export killed while it wrote left beside `out`
    return write_atomic(out, write)
