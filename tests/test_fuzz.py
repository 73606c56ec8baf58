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
import math
import os
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from digitlab.checkpoint import load_checkpoint
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


def _picture(kind: str) -> bytes:
    """A "1" on paper in one of the formats and variants `predict` reads."""
    page = np.full((60, 48), 235, np.uint8)
    page[10:50, 22:28] = 20  # a "1"
    if kind == "PSD":  # Pillow reads PSD but cannot write it: 8-bit grey, raw, no layers
        header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, *page.shape, 8, 1)
        return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + page.tobytes()
    picture, fmt, options = Image.fromarray(page), kind, {}
    if kind == "TIFF-float":
        picture, fmt = Image.fromarray(page.astype(np.float32) / 255), "TIFF"
    elif kind == "PNG-16bit":
        picture, fmt = Image.fromarray(page.astype(np.uint16) * 257), "PNG"
    elif kind == "JPEG-CMYK":
        picture, fmt = picture.convert("CMYK"), "JPEG"
    elif kind == "JPEG-EXIF":  # a phone's photo, stored on its side
        exif = Image.Exif()
        exif[0x0112] = 6
        picture, fmt, options = picture.rotate(90, expand=True).convert("RGB"), "JPEG", {"exif": exif}
    elif kind in ("GIF-animated", "WEBP-animated"):
        fmt = kind.split("-")[0]
        options = {"save_all": True, "append_images": [Image.fromarray(255 - page)], "duration": 100}
    elif kind == "ICO":
        picture = picture.resize((64, 64))
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


PICTURES = {kind: _picture(kind) for kind in ("PNG", "JPEG", "GIF", "TIFF", "TIFF-float", "PNG-16bit", "JPEG-CMYK",
                                             "JPEG-EXIF", "GIF-animated", "WEBP-animated", "ICO", "PSD")}


@pytest.mark.parametrize("kind", sorted(PICTURES))
def test_every_kind_of_picture_in_the_corpus_reads_as_a_one(kind):
    from digitlab.reading.segment import find_digits

    found = find_digits(load_grey(_file(f"corpus.{kind.lower()}", PICTURES[kind])))
    assert len(found) == 1 and found[0].image.max() > 200
    rows, cols = np.nonzero(found[0].image > 128)
    assert np.ptp(rows) > 2 * np.ptp(cols)  # upright and whole: the EXIF turn undone, the first frame read


@pytest.mark.parametrize("kind", sorted(PICTURES))
def test_image_loading_and_preparation_on_mutated_files(kind):
    @given(mutated(PICTURES[kind]))
    def check(data):
        path = _file(f"fuzz.{kind.lower()}", data)
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


# ---------------------------------------------------------------------------- state records, TOML, endpoints

@pytest.fixture(scope="module")
def stopped_state(digits, tmp_path_factory):
    """A real run's state, stopped by a signal in its second epoch: the record and tensors to mutate."""
    from dataclasses import replace

    from digitlab.config import TrainConfig
    from digitlab.training.reporters import Reporter
    from digitlab.training.run import run
    from digitlab.training.run_folder import read_state

    class CtrlCAt(Reporter):  # a real SIGINT to this process after step 15, as a user's Ctrl-C
        def step(self, done_steps, loss):
            if done_steps == 15:
                os.kill(os.getpid(), signal.SIGINT)

    small = replace(digits, train_images=digits.train_images[:960], train_labels=digits.train_labels[:960])
    folder = tmp_path_factory.mktemp("fuzz-state")
    config = TrainConfig(model="lenet5", epochs=3, schedule="none", val_split=96, log_every=5, augment=True)
    run(config, small, folder, reporter=CtrlCAt())
    record, tensors = read_state(folder)
    assert record["position"]["epoch"] == 1 and record["position"]["batch"] > 0
    return folder, record, tensors


BAD_VALUES = st.one_of(st.sampled_from([None, -1, 0, 1, 2, 3, 10**12, -10**12, 0.5, 1.5, float("inf"), "x", "",
                                        True, [], {}, [1, 2], [[0, 0]], "SIGINT", "patience"]), JSON)
POSITION_KEYS = ["epoch", "batch", "step", "best_accuracy", "best_epoch", "stopped"]
HISTORY_KEYS = ["loss_list", "log_points", "log_steps", "batch_loss", "epochs", "images", "seconds"]


@st.composite
def near_valid_state(draw, record: dict) -> dict:
    """The record with a few of its fields replaced (position, history, rng, config), or a whole part swapped."""
    record = json.loads(json.dumps(record))
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(["position", "history", "history_item", "rng", "whole"]))
        position, history, rng = (record.get(k) for k in ("position", "history", "rng"))
        if part == "position" and isinstance(position, dict):
            position[draw(st.sampled_from(POSITION_KEYS))] = draw(BAD_VALUES)
        elif part == "history" and isinstance(history, dict):
            history[draw(st.sampled_from(HISTORY_KEYS))] = draw(BAD_VALUES)
        elif part == "history_item" and isinstance(history, dict):
            values = history.get(draw(st.sampled_from(["loss_list", "batch_loss", "epochs", "log_points"])))
            if isinstance(values, list) and values:
                values[draw(st.integers(0, len(values) - 1))] = draw(BAD_VALUES)
        elif part == "rng" and isinstance(rng, dict) and isinstance(rng.get("$dict"), list):
            pairs = rng["$dict"]
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i][1] = draw(st.one_of(BAD_VALUES, st.sampled_from(
                [{"$tensor": "model.conv1.weight"}, {"$tensor": "rng.torch"}, {"$tensor": "nowhere"}])))
        elif part == "whole":
            part = draw(st.sampled_from(["position", "history", "rng", "model", "optimizer", "data"]))
            record[part] = draw(BAD_VALUES)
    return record


def test_state_records_near_valid_are_refused_in_one_line_or_resume(stopped_state, tmp_path):
    import shutil

    from digitlab.config import TrainConfig
    from digitlab.models import create_model
    from digitlab.training.optim import make_optimizer
    from digitlab.training.run_folder import STATE_KEY, check_resumable, read_state, restore

    folder, valid, valid_tensors = stopped_state
    config = TrainConfig(**valid["config"])
    copy = shutil.copytree(folder, tmp_path / "run")

    @given(near_valid_state(valid))
    def resumes_or_says_why(edited):
        save_file(valid_tensors, str(copy / "state.safetensors"), metadata={STATE_KEY: json.dumps(edited)})
        try:  # what --resume does before it touches anything
            record, tensors = read_state(copy)
            check_resumable(copy, config, record, tensors, valid["data"])
        except UserError:
            return
        model = create_model(config.model, num_outputs=10, init="torch")
        optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        state = restore(record, tensors, model, optimizer, torch.Generator(), torch.device("cpu"))
        assert 0 <= state.epoch <= config.epochs and state.step == len(state.history.batch_loss)

    resumes_or_says_why()


TOML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)


def _toml(value) -> str:
    """A value as TOML writes it inline (None, which TOML lacks, as nothing: a syntax error)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@st.composite
def toml_texts(draw) -> str:
    """Config files as people and attackers write them: near-valid options with wrong types, deep nesting,
    huge values, and text that is not TOML at all."""
    from digitlab.config import FIELDS

    kind = draw(st.sampled_from(["options", "deep", "huge", "any"]))
    if kind == "options":
        lines = []
        for key in draw(st.lists(st.sampled_from([*FIELDS, "colour", "model.x"]), max_size=5)):
            value = draw(st.one_of(TOML_VALUES, st.fixed_dictionaries(
                {"low": TOML_VALUES, "high": TOML_VALUES}, optional={"log": TOML_VALUES})))
            lines.append(f"{key} = {_toml(value)}")
        return "\n".join(lines)
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        return "a = " + draw(st.sampled_from(["[", "{b = "])) * depth
    if kind == "huge":
        return f'model = "{"x" * draw(st.integers(0, 2_000_000))}"'
    return draw(st.text(max_size=200))


@given(toml_texts(), st.booleans())
def test_config_files_and_sweep_specs_of_any_shape(text, as_spec):
    from digitlab.config import TrainConfig, read_config_file
    from digitlab.studies.spec import check_sampler, read_spec

    if as_spec:  # the same options under [fixed] or [search], where lists and ranges are choices
        text = draw_free_spec(text)
    path = _file("fuzz.toml", text.encode("utf-8", "replace"))
    try:
        if as_spec:
            check_sampler("grid", read_spec(path))
        else:
            TrainConfig(**read_config_file(path)).resolved()
    except UserError as e:
        assert len(str(e)) < 600 and "\n" not in str(e)


def draw_free_spec(text: str) -> str:
    """A config file's lines as a sweep spec: the first half [fixed], the rest [search]."""
    lines = text.splitlines()
    half = len(lines) // 2
    return "\n".join(["[fixed]", *lines[:half], "[search]", *lines[half:]])


@given(st.one_of(st.text(max_size=40), st.from_regex(r"\[?[0-9a-z:.\-]{0,20}\]?(:-?[0-9]{0,7})?", fullmatch=True)))
def test_rendezvous_endpoints_of_any_shape(text):
    from digitlab.training.launch import parse_endpoint

    try:
        host, port = parse_endpoint(text)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) < 300
        return
    assert host and 1 <= port <= 65535
