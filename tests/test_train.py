"""Training on the real data, reproducibility, and checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from digitlab.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from digitlab.data import InMemoryLoader, normalize
from digitlab.errors import UserError
from digitlab.files import atomic_path
from digitlab.models import create_model
from digitlab.train import TrainConfig, fit, run, train


def test_mlp_loss_falls_on_real_data(mnist):
    torch.manual_seed(0)
    model = create_model("mlp")
    loader = InMemoryLoader(mnist.train_images, mnist.train_labels, seed=0)
    history = fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1,
                  max_batches=600, progress=False)
    first, last = history.batch_loss[:10], history.batch_loss[-50:]
    # Always guessing the mean digit (4.45) scores about 8.4 (the labels' variance).
    assert sum(first) / 10 > 15
    assert sum(last) / 50 < 6
    assert history.loss_list == [history.batch_loss[0], history.batch_loss[200], history.batch_loss[400]]
    assert history.log_points == [(0, 0), (0, 200), (0, 400)]
    assert history.images == 600 * 64


def test_notebook_style_train_returns_the_loss_list(mnist):
    model = create_model("cnn")
    loader = InMemoryLoader(mnist.train_images[:6400], mnist.train_labels[:6400], seed=0)
    loss_list = train(model, loader, epochs=2, lr=0.001, log_every=50)
    assert len(loss_list) == 2 * 2  # batches 0 and 50 of each 100-batch epoch
    assert all(isinstance(v, float) for v in loss_list)


def _losses(mnist, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = create_model("cnn")
    loader = InMemoryLoader(mnist.train_images, mnist.train_labels, seed=seed)
    return fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.001), epochs=2,
               max_batches=40, progress=False).batch_loss


def test_same_seed_gives_bit_identical_losses(mnist):
    a, b = _losses(mnist, 3), _losses(mnist, 3)
    assert a == b  # exact float equality, not approx
    assert _losses(mnist, 4) != a


def test_config_rejects_bad_numbers():
    for bad in (dict(epochs=0), dict(lr=-0.1), dict(lr=float("nan")), dict(batch_size=0),
                dict(model="nope"), dict(task="guess"), dict(device="tpu")):
        with pytest.raises(UserError):
            TrainConfig(**bad).resolved()
    assert TrainConfig(model="mlp").resolved().lr == 0.01
    assert TrainConfig(model="cnn").resolved().lr == 0.001


def test_run_writes_a_checkpoint_that_rebuilds_the_model(mnist, tmp_path):
    config = TrainConfig(model="cnn", epochs=1, max_batches=30, seed=1)
    result = run(config, mnist, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["history.json", "loss.png", "loss.svg", "model.safetensors"]  # no temporary files

    model, meta = load_checkpoint(tmp_path / "run")  # the folder is enough
    assert meta["model"] == "cnn" and meta["num_outputs"] == 1 and meta["seed"] == 1
    assert meta["normalization"] == {"center": 127.5, "scale": 127.5}
    assert meta["config"]["max_batches"] == 30 and meta["epochs"] == 1
    assert meta["final_loss"] == result.history.final_loss
    images = normalize(mnist.test_images[:100])
    with torch.inference_mode():
        reloaded = model(images)
    assert torch.isfinite(reloaded).all()
    # Same weights as the model that trained: retraining with the same seed reproduces them.
    again, _ = load_checkpoint(run(config, mnist, tmp_path / "again").out_dir / "model.safetensors")
    assert torch.equal(again(images), reloaded)

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["loss_list"] == result.history.loss_list
    assert len(history["batch_loss"]) == 30


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    model = create_model("mlp")
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model": "mlp", "num_outputs": 1})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cut.safetensors: not a readable checkpoint"):
        read_checkpoint(truncated)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(future), metadata={"digitlab": json.dumps({"format": 99})})
    with pytest.raises(UserError, match="checkpoint format 99, this digitlab reads format 1"):
        read_checkpoint(future)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(UserError, match="without digitlab metadata"):
        read_checkpoint(foreign)
    mismatch = save_checkpoint(tmp_path / "x.safetensors", model, {"model": "cnn", "num_outputs": 1})
    with pytest.raises(UserError, match="weights do not fit model 'cnn'"):
        load_checkpoint(mismatch)
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing-here")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    model = create_model("mlp")
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model": "mlp", "num_outputs": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    loaded, meta = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
