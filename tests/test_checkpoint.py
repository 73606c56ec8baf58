"""Checkpoint metadata is one typed record (CheckpointMeta), checked once when read, each fact stored
once; checkpoints of the previous format (1) are still read."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import safe_open, save_file

from digitlab.checkpoint import FORMAT_VERSION, CheckpointMeta, load_checkpoint, save_checkpoint
from digitlab.config import TrainConfig
from digitlab.errors import UserError
from digitlab.models import create_model


def _raw_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["digitlab"])


def _write(path, model, meta: dict) -> None:
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"digitlab": json.dumps(meta)})


def test_each_fact_is_stored_once_and_read_back_as_attributes(tmp_path):
    config = TrainConfig(model="lenet5", task="classify", seed=7).resolved()
    meta = CheckpointMeta(config, epochs=3, best_epoch=2, val_accuracy=0.97, temperature=1.2,
                          data={"train": 100}, world_size=2, backend="gloo", results={"test_accuracy": 0.96})
    path = save_checkpoint(tmp_path / "m.safetensors", create_model("lenet5"), meta)
    raw = _raw_meta(path)
    assert raw["format"] == FORMAT_VERSION == 2
    assert not {"model", "task", "num_outputs", "seed"} & set(raw)  # they live in the config, once
    assert raw["config"]["model"] == "lenet5" and raw["config"]["seed"] == 7
    model, read = load_checkpoint(path)
    assert read == meta and read.model == "lenet5" and read.task.name == "classify" and read.task.outputs == 10
    assert not model.training and read.temperature == 1.2 and read.results["test_accuracy"] == 0.96


def test_a_format_1_checkpoint_is_still_read(tmp_path):
    config = asdict(TrainConfig(model="cnn", task="regress", seed=3).resolved())
    old = {"format": 1, "model": "cnn", "task": "regress", "num_outputs": 1, "seed": 3,
           "normalization": {"center": 127.5, "scale": 127.5}, "epochs": 10, "final_loss": 0.5,
           "best_epoch": None, "val_accuracy": None, "config": config, "data": {"train": 60000},
           "world_size": 1, "backend": None, "results": {"test_accuracy": 0.55}}
    torch.manual_seed(0)
    model = create_model("cnn")
    _write(tmp_path / "old.safetensors", model, old)
    loaded, meta = load_checkpoint(tmp_path / "old.safetensors")
    assert meta.model == "cnn" and meta.task.name == "regress" and meta.config.seed == 3 and meta.epochs == 10
    assert meta.results == {"test_accuracy": 0.55}
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


@pytest.mark.parametrize("change, message", [
    ({"format": 1, "model": "cnn", "task": "classify", "num_outputs": 10**8},
     "num_outputs 100000000; a classify model has 10"),
    ({"format": 3}, "checkpoint format 3, this digitlab reads formats 1 and 2"),
    ({"extra": 1}, "unknown field 'extra'"),
    ({"config": {"model": "vgg", "task": "classify"}}, "model 'vgg' is not one of"),
    ({"config": {"model": "cnn", "task": "sort"}}, "task 'sort' is not one of regress, classify"),
    ({"config": {"model": "cnn", "task": "classify", "epochs": "ten"}}, "epochs must be a whole number"),
    ({"config": {"model": "cnn", "task": "classify", "colour": "red"}}, "unknown option 'colour' in config"),
    ({"temperature": -1}, "temperature -1 (a number above 0)"),
    ({"normalization": {"center": 0, "scale": 0}}, "normalization must be {center, scale} with a scale above 0"),
    ({"results": [1, 2]}, "results must be a table"),
])
def test_impossible_metadata_is_one_line(tmp_path, change, message):
    good = CheckpointMeta(TrainConfig(model="cnn", task="classify").resolved()).as_json()
    meta = {**good, **change}
    if meta["format"] == 1:
        meta["config"] = {**good["config"], "model": "cnn", "task": "classify"}
    _write(tmp_path / "bad.safetensors", create_model("cnn", num_outputs=10), meta)
    with pytest.raises(UserError, match="^.*$") as error:
        load_checkpoint(tmp_path / "bad.safetensors")
    assert message in str(error.value) and "\n" not in str(error.value)
