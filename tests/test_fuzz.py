"""Property-based fuzzing: whatever bytes or metadata arrive, digitlab answers with its own error
(one line for the user) or a result, never another exception.

Budgets are small by default (the "ci" profile, registered in conftest.py: 60 cases a property,
derandomised). For a long local campaign:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py
"""
from __future__ import annotations

import gzip
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from digitlab.reading.checkpoint import load_checkpoint
from digitlab.data import IMAGE_MAGIC, LABEL_MAGIC, read_idx
from digitlab.errors import UserError
from digitlab.models import create_model
from digitlab.reading.image import load_grey
from digitlab.reading.segment import preprocess

SCRATCH = Path(tempfile.mkdtemp(prefix="digitlab-fuzz-"))


def _file(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """`original` with a few bytes flipped, a slice cut out, a tail cut off, or junk appended."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["flip", "cut", "truncate", "append"]))
    if how == "cut" and len(data) > 2:
        i = draw(st.integers(0, len(data) - 2))
        del data[i:i + draw(st.integers(1, 64))]
    elif how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "append":
        data += draw(st.binary(max_size=64))
    return bytes(data)


def _idx(magic: int, dims: tuple[int, ...], body: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + body


VALID_IMAGES = _idx(IMAGE_MAGIC, (3, 28, 28), bytes(range(256)) * 9 + bytes(3 * 784 - 256 * 9))
VALID_LABELS = _idx(LABEL_MAGIC, (5,), bytes([0, 1, 2, 3, 9]))


def _read_idx_only_fails_cleanly(data: bytes, gz: bool) -> None:
    path = _file("fuzz-idx.gz" if gz else "fuzz-idx", gzip.compress(data) if gz else data)
    try:
        out = read_idx(path)
    except UserError:
        return
    assert out.dim() in (1, 3) and len(out) > 0


@given(st.binary(max_size=2000), st.booleans())
def test_idx_reader_on_arbitrary_bytes(data, gz):
    _read_idx_only_fails_cleanly(data, gz)


@given(st.one_of(mutated(VALID_IMAGES), mutated(VALID_LABELS)), st.booleans())
def test_idx_reader_on_mutated_files(data, gz):
    _read_idx_only_fails_cleanly(data, gz)


@given(mutated(gzip.compress(VALID_IMAGES)))
def test_idx_reader_on_mutated_gzip_streams(data):
    path = _file("fuzz-stream.gz", data)
    try:
        read_idx(path)
    except UserError:
        pass


def _picture(fmt: str) -> bytes:
    page = np.full((60, 48), 235, np.uint8)
    page[10:50, 22:28] = 20  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format=fmt)
    return buffer.getvalue()


PICTURES = {fmt: _picture(fmt) for fmt in ("PNG", "JPEG", "GIF", "TIFF")}


@pytest.mark.parametrize("fmt", sorted(PICTURES))
def test_image_loading_and_preparation_on_mutated_files(fmt):
    @given(mutated(PICTURES[fmt]))
    def check(data):
        path = _file(f"fuzz.{fmt.lower()}", data)
        try:
            digit = preprocess(load_grey(path), source=str(path))
        except UserError:
            return
        assert digit.shape == (28, 28) and digit.dtype == np.uint8

    check()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)
# Mostly near-valid metadata (the right keys, some values replaced), and some of anything at all.
META = st.one_of(
    st.fixed_dictionaries({"format": st.sampled_from([1, 1, 2, "1", None]),
                           "model": st.sampled_from(["mlp", "cnn", "vgg", None, 3]),
                           "task": st.sampled_from(["regress", "classify", "", None]),
                           "num_outputs": st.one_of(st.sampled_from([1, 10, 0, -1, 10**8, 1.0, True]), JSON)},
                          optional={"normalization": JSON, "epochs": JSON, "best_epoch": JSON, "val_accuracy": JSON,
                                    "results": JSON}),
    st.fixed_dictionaries({"format": st.sampled_from([2, 2, 3]),
                           "config": st.one_of(st.fixed_dictionaries(
                               {"model": st.sampled_from(["mlp", "cnn", "vgg", None, 3]),
                                "task": st.sampled_from(["regress", "classify", "", None])},
                               optional={"epochs": JSON, "lr": JSON, "seed": JSON, "colour": JSON}), JSON)},
                          optional={"normalization": JSON, "epochs": JSON, "best_epoch": JSON, "temperature": JSON,
                                    "world_size": JSON, "data": JSON, "results": JSON, "extra": JSON}),
    JSON,
)
WEIGHTS = {k: v.contiguous() for k, v in create_model("mlp").state_dict().items()}


@given(META)
def test_checkpoint_metadata_of_any_shape(meta):
    path = SCRATCH / "fuzz.safetensors"
    save_file(WEIGHTS, str(path), metadata={"digitlab": json.dumps(meta)})
    try:
        model, loaded = load_checkpoint(path)
    except UserError:
        return
    assert loaded.task.outputs == 1 and model.fc3.out_features == 1
