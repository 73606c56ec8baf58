"""Run folders: exact resume after a real signal, config files, validation, best checkpoints, logs."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import one_error_line, popen_cli, wait_for
from digitlab.checkpoint import load_checkpoint
from digitlab.config import TrainConfig, preset_config, read_config_file
from digitlab.errors import UserError
from digitlab.training.reporters import Reporter
from digitlab.training.run import run
from digitlab.training.run_folder import STATE_FILE


@pytest.fixture(scope="session")
def small(digits):
    """3,200 training images (50 batches of 64), 1,000 test images: epochs of a fraction of a second."""
    return replace(digits, train_images=digits.train_images[:3200], train_labels=digits.train_labels[:3200],
                   source="subset")


@pytest.fixture(scope="session")
def tiny(digits):
    """960 training images (15 batches of 64), 1,000 test images: for the runs that are stopped and resumed."""
    return replace(digits, train_images=digits.train_images[:960], train_labels=digits.train_labels[:960],
                   source="tiny subset")


class SignalAt(Reporter):
    """Sends a real signal to this very process after optimiser step `at`, as a user's Ctrl-C would."""

    def __init__(self, at: int, signum: int = signal.SIGINT):
        self.at, self.signum = at, signum

    def step(self, done_steps, loss):
        if done_steps == self.at:
            os.kill(os.getpid(), self.signum)


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# Representative of what a run's state must carry: the hand-written MLP step; Adam's moments with
# a schedule running across the stop; momentum, BatchNorm, dropout, augmentation's and the non-digits' generator;
# AdamW with weight decay, a step schedule and a validation split; the sprint preset as it ships.
RESUME_CASES = {
    "mlp-sgd-handwritten": TrainConfig(model="mlp", epochs=3, log_every=7),
    "cnn-adam-onecycle": TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.002, schedule="onecycle",
                                     epochs=3, log_every=7),
    "convnet_small-momentum-cosine-augment-reject": TrainConfig(
        model="convnet_small", optimizer="momentum", lr=0.02, schedule="cosine", augment=True, reject=True, epochs=3,
        log_every=7),
    "lenet5-adamw-step-val": TrainConfig(model="lenet5", optimizer="adamw", lr=0.003, weight_decay=0.05,
                                         schedule="step", val_split=96, epochs=3, log_every=7),
    # the sprint preset itself: a layer list, Adam's own betas, label smoothing
    "sprint-preset": preset_config("sprint", epochs=3, batch_size=64, log_every=7),
}


@pytest.fixture(scope="module")
def left_alone_runs(tiny, tmp_path_factory):
    """Each resume case's run left alone, trained once for both stopping points: {case: (result, folder)}."""
    made = {}

    def get(case: str):
        if case not in made:
            out = tmp_path_factory.mktemp("alone") / case
            made[case] = run(RESUME_CASES[case], tiny, out, reporter=Reporter()), out
        return made[case]

    return get


# Epochs are 15 batches (13 with the validation split): step 20 is mid-epoch; step 26 is mid-epoch or,
# with validation, an epoch's very last step.
@pytest.mark.parametrize("stop_at", [20, 26])
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_interrupted_and_resumed_equals_left_alone(tiny, tmp_path, case, stop_at, left_alone_runs):
    config = RESUME_CASES[case]
    alone, alone_dir = left_alone_runs(case)
    stopped = run(config, tiny, tmp_path / "resumed", reporter=SignalAt(stop_at))
    assert stopped.state.interrupted and stopped.state.stopped == "SIGINT"
    assert len(stopped.history.batch_loss) == stop_at
    resumed = run(config, tiny, tmp_path / "resumed", resume=True, reporter=Reporter())
    assert resumed.history.batch_loss == alone.history.batch_loss  # bit for bit
    assert resumed.history.loss_list == alone.history.loss_list
    assert resumed.history.log_points == alone.history.log_points
    assert [r["val_accuracy"] for r in resumed.history.epochs] == [r["val_accuracy"] for r in alone.history.epochs]
    assert resumed.test_accuracy == alone.test_accuracy
    a, _ = load_checkpoint(alone_dir / "model.safetensors")
    b, _ = load_checkpoint(tmp_path / "resumed" / "model.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_extending_a_finished_run_equals_training_longer(small, tmp_path):
    config = TrainConfig(model="cnn", epochs=2, log_every=7)
    run(config, small, tmp_path / "two", reporter=Reporter())
    extended = run(replace(config, epochs=3), small, tmp_path / "two", resume=True, reporter=Reporter())
    three = run(replace(config, epochs=3), small, tmp_path / "three", reporter=Reporter())
    assert len(extended.history.epochs) == 3
    assert extended.history.batch_loss == three.history.batch_loss


def test_what_cannot_be_resumed_says_so_and_leaves_the_folder_alone(small, tmp_path):
    run_dir = tmp_path / "run"
    config = TrainConfig(model="cnn", task="classify", optimizer="adam", schedule="onecycle", epochs=1, log_every=7)
    run(config, small, run_dir, reporter=Reporter())
    before = _folder_digest(run_dir)
    cases = [
        (replace(config, epochs=2), "onecycle schedule was planned over 1"),
        (config, "has finished all 1 epochs; pass --epochs N"),
        (replace(config, model="mlp"), "with model = 'mlp': the run was trained with 'cnn'"),
        (replace(config, task="regress"), "with task = 'regress'"),
        (replace(config, lr=0.5), "with lr = 0.5"),
    ]
    for changed, message in cases:
        with pytest.raises(UserError, match=message):
            run(changed, small, run_dir, resume=True, reporter=Reporter())
    stopped = run(replace(config, epochs=3, schedule="none"), small, tmp_path / "part", reporter=SignalAt(60))
    assert (stopped.state.epoch, stopped.state.batch) == (1, 10)
    with pytest.raises(UserError, match="already trained 1 epoch and part of another; give --epochs 2 or more"):
        run(replace(config, epochs=1, schedule="none"), small, tmp_path / "part", resume=True)
    with pytest.raises(UserError, match="other data"):
        run(config, replace(small, train_labels=small.train_labels.roll(1)), run_dir, resume=True)
    assert _folder_digest(run_dir) == before
    with pytest.raises(UserError, match="holds no state.safetensors"):
        run(config, small, tmp_path, resume=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / STATE_FILE).write_bytes((run_dir / STATE_FILE).read_bytes()[:500])
    with pytest.raises(UserError, match="state.safetensors is corrupt"):
        run(config, small, corrupt, resume=True)
    assert [p.name for p in corrupt.iterdir()] == [STATE_FILE]


def test_patience_stops_early_and_the_best_checkpoint_is_kept(small, tmp_path):
    # A learning rate too small to change any answer: validation never improves after epoch 0.
    config = TrainConfig(model="lenet5", epochs=6, lr=1e-9, val_split=320, patience=2)
    result = run(config, small, tmp_path, reporter=Reporter())
    assert result.state.stopped == "patience" and result.state.best_epoch == 0
    assert [r["epoch"] for r in result.history.epochs] == [0, 1, 2]
    _, meta = load_checkpoint(tmp_path)
    assert meta.best_epoch == 0 and meta.epochs == 1
    with pytest.raises(UserError, match="stopped early after epoch 2"):
        run(config, small, tmp_path, resume=True)
    more = run(replace(config, patience=3), small, tmp_path, resume=True, reporter=Reporter())
    assert [r["epoch"] for r in more.history.epochs] == [0, 1, 2, 3] and more.state.stopped == "patience"


def test_the_last_epochs_weights_get_a_temperature_of_their_own(small, tmp_path):
    from digitlab.evaluate import fit_temperature, model_outputs
    from digitlab.training.run import split_data

    # A learning rate high enough that validation accuracy soon falls back: patience stops the run on an
    # epoch worse than the best one, so the last weights are not the best ones.
    config = TrainConfig(model="convnet_tiny", epochs=30, optimizer="adam", lr=0.05, val_split=320, patience=1)
    result = run(config, small, tmp_path, reporter=Reporter())
    assert result.state.stopped == "patience" and result.state.best_epoch < len(result.history.epochs) - 1
    split, _ = split_data(small, config)
    temperatures = {}
    for name in ("best.safetensors", "model.safetensors"):  # each fitted to its own weights on the split
        model, meta = load_checkpoint(tmp_path / name)
        outputs = model_outputs(model, split.val_images, normalization=meta.normalization)
        assert meta.temperature == pytest.approx(fit_temperature(outputs, split.val_labels), rel=1e-4)
        temperatures[name] = meta.temperature
    assert temperatures["best.safetensors"] != temperatures["model.safetensors"]


def test_validation_split_is_stratified_seeded_and_disjoint(digits):
    from digitlab.data import stratified_split

    labels = digits.train_labels
    kept, held = stratified_split(labels, 400, seed=0)
    assert len(held) == 400 and len(kept) == 3600
    assert len(set(kept.tolist()) | set(held.tolist())) == 4000
    share = torch.bincount(labels[held].long(), minlength=10).float() / 400
    overall = torch.bincount(labels.long(), minlength=10).float() / 4000
    assert (share - overall).abs().max() <= 1 / 400  # each digit in its share, to within an image
    assert torch.equal(stratified_split(labels, 400, seed=0)[1], held)
    assert not torch.equal(stratified_split(labels, 400, seed=1)[1], held)


def test_metrics_csv_tensorboard_and_a_plot_for_a_short_run(small, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digitlab.plots import plot_run_loss

    config = TrainConfig(model="convnet_small", epochs=2, max_batches=6, val_split=320, tensorboard=True)
    result = run(config, small, tmp_path, reporter=Reporter())
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "images_per_second"]
    assert all(float(r["val_accuracy"]) > 0 and float(r["images_per_second"]) > 0 for r in rows)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/batch_loss", "epoch/train_loss", "epoch/val_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [0, 1]
    # 12 batches, one logged (log_every 200): the plot still draws every batch.
    ax = plot_run_loss(result.history).axes[0]
    assert len(ax.lines[0].get_xdata()) == 12 and len(ax.lines[-1].get_xdata()) == 2


def test_config_file_reproduces_a_run_and_bad_files_name_the_key(small, tmp_path):
    config = TrainConfig(model="cnn", task="classify", optimizer="adam", lr=0.002, epochs=1, max_batches=20,
                         augment=True, seed=5)
    first = run(config, small, tmp_path / "first", reporter=Reporter())
    saved = read_config_file(tmp_path / "first" / "config.toml")
    assert saved["model"] == "cnn" and saved["seed"] == 5 and saved["init"] == "paddle"
    again = run(TrainConfig(**saved), small, tmp_path / "again", reporter=Reporter())
    assert again.history.batch_loss == first.history.batch_loss

    for text, fragment in [("epochz = 3", r"unknown option 'epochz'; did you mean 'epochs'\?"),
                           ('epochs = "three"', "epochs: must be a whole number, got 'three'"),
                           ("lr = -1.0", "lr: must be a number above 0"),
                           ('optimizer = "rmsprop"', "optimizer: invalid choice: 'rmsprop'"),
                           ("augment = 1", "augment: must be true or false"),
                           ("epochs = [", "not valid TOML")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text + "\n")
        with pytest.raises(UserError, match=fragment):
            read_config_file(bad)


# ---------------------------------------------------------------------------- the real command, real signals

TRAIN = ["train", "cnn", "--task", "classify", "--optimizer", "adam", "--lr", "0.002", "--schedule", "cosine",
         "--augment", "--epochs", "3", "--batches", "20", "--log-every", "1", "--val-split", "400"]


def _start(digits_dir: Path, out: Path):
    return popen_cli(*TRAIN, "--data-dir", digits_dir, "--out", out)


@pytest.fixture(scope="module")
def _alone_history() -> dict:
    return {}


@pytest.fixture
def left_alone(digits_dir, tmp_path_factory, cli, _alone_history):
    """The run the signalled ones must reproduce, trained once (in-process) for the module."""
    if not _alone_history:
        out = tmp_path_factory.mktemp("alone") / "run"
        result = cli(*TRAIN, "--data-dir", str(digits_dir), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "cnn ━" in result.stdout  # the progress bar names the run's model
        _alone_history.update(json.loads((out / "history.json").read_text()))
    return _alone_history


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_real_signal_then_resume_gives_the_same_losses(digits_dir, tmp_path, left_alone, signum, code, cli):
    out = tmp_path / "run"
    process = _start(digits_dir, out)
    wait_for(process, "epoch 0 done")  # the state of epoch 0 is on disk ...
    wait_for(process, "epoch: 1, batch: 6,")  # ... and epoch 1 is under way
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    with safe_open(str(out / STATE_FILE), "pt") as f:
        state = json.loads(f.metadata()["digitlab_state"])
    if signum == signal.SIGKILL:  # no chance to save: the state is the end of epoch 0
        assert (state["position"]["epoch"], state["position"]["batch"]) == (1, 0)
    else:
        lines = stderr.strip().splitlines()  # one line: what stopped it, and how to go on
        assert len(lines) == 1 and lines[0].startswith(f"digitlab: interrupted ({signal.Signals(signum).name})"), stderr
        assert state["position"]["epoch"] == 1 and 7 <= state["position"]["batch"] < 20
    resumed = cli("train", "--resume", str(out), "--data-dir", str(digits_dir))
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["batch_loss"]) == 60
    assert history["batch_loss"] == left_alone["batch_loss"]  # bit for bit
    assert history["epochs"][-1]["val_accuracy"] == left_alone["epochs"][-1]["val_accuracy"]


def test_resume_errors_on_the_command_line(digits_dir, tmp_path, cli):
    one_error_line(cli("train", "--resume", str(tmp_path)), "holds no state.safetensors")
    one_error_line(cli("train", "--resume", str(tmp_path / "absent")), "not a folder")
    out = tmp_path / "run"
    assert cli("train", "mlp", "--epochs", "1", "--batches", "5", "--data-dir", str(digits_dir),
               "--out", str(out)).returncode == 0
    before = _folder_digest(out)
    one_error_line(cli("train", "cnn", "--resume", str(out), "--data-dir", str(digits_dir)),
                   "with model = 'cnn': the run was trained with 'mlp'")
    one_error_line(cli("train", "--resume", str(out), "--lr", "0.1", "--data-dir", str(digits_dir)),
                   "--resume may change only epochs, patience, device, tensorboard")
    one_error_line(cli("train", "--resume", str(out), "--data-dir", str(digits_dir)), "finished all 1 epochs")
    assert _folder_digest(out) == before
    more = cli("train", "--resume", str(out), "--epochs", "2", "--data-dir", str(digits_dir))
    assert more.returncode == 0, more.stderr
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 2
    config = tmp_path / "c.toml"
    config.write_text('model = "mlp"\nepochs = 1\nmax_batches = 5\nlr = 0.5\n')
    again = cli("train", "--config", str(config), "--lr", "0.02", "--data-dir", str(digits_dir),
                "--out", str(tmp_path / "from-file"))
    assert again.returncode == 0, again.stderr
    saved = read_config_file(tmp_path / "from-file" / "config.toml")
    assert saved["lr"] == 0.02 and saved["max_batches"] == 5  # the command line wins over the file
    config.write_text("epochs = 0\n")
    one_error_line(cli("train", "--config", str(config)), "c.toml: epochs: must be 1 or more, got 0")


def _rewrite_state(folder: Path, change) -> None:
    """Edits a run folder's state record as a person (or a damaged disk) might: change(record, tensors)."""
    from safetensors.torch import load_file, save_file

    path = folder / STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["digitlab_state"])
    tensors = load_file(str(path))
    change(record, tensors)
    save_file(tensors, str(path), metadata={"digitlab_state": json.dumps(record)})


def _set_rng(key: str, value):
    def change(record, tensors):
        record["rng"]["$dict"] = [[k, value if k == key else v] for k, v in record["rng"]["$dict"]]
    return change


def _position(**values):
    return lambda record, tensors: record["position"].update(values)


def _history(key: str, value):
    return lambda record, tensors: record["history"].__setitem__(key, value)


@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """A run stopped by a signal in its second epoch (13 batches an epoch, stopped after step 15)."""
    config = TrainConfig(model="lenet5", epochs=3, schedule="none", val_split=96, log_every=5)
    folder = tmp_path_factory.mktemp("stopped")
    stopped = run(config, tiny, folder, reporter=SignalAt(15))
    assert (stopped.state.epoch, stopped.state.batch, stopped.state.best_epoch) == (1, 2, 0)
    return config, folder


@pytest.mark.parametrize("change, message", [
    (_position(best_epoch=10**6), "best accuracy .* at epoch 1000000 is not an accuracy of an epoch done"),
    (_position(best_accuracy="x"), "best accuracy 'x'"),
    (_position(epoch=-3), "epoch -3 is not from 0 to its 3 epochs"),
    (_position(batch=-7), "batch -7 is not from 0 to 12"),
    (_position(batch=10**12), "batch 1000000000000 is not from 0 to 12"),
    (_position(epoch=2), "step 15 does not match epoch 2, batch 2"),
    (_history("batch_loss", "abc"), "'batch_loss' is not a list of numbers"),
    (lambda r, t: r["history"]["epochs"][0].update(bogus=1), "epoch rows do not match epoch 1, or hold other than"),
    (lambda r, t: r["history"]["epochs"].append(r["history"]["epochs"][0]), "its 2 epoch rows do not match epoch 1"),
    (_set_rng("shuffle", {"$tensor": "model.conv1.weight"}), "the shuffle generator's state is not one"),
    (_set_rng("shuffle", 5), "the shuffle generator's state is not one"),
    (lambda r, t: t.__setitem__("model.conv1.weight", torch.zeros(2, 2)),
     "its weights or optimiser state do not fit a lenet5"),
])
def test_an_edited_state_is_refused_before_the_folder_is_touched(change, message, stopped_run, tiny, tmp_path):
    config, folder = stopped_run
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    _rewrite_state(tmp_path, change)
    before = _folder_digest(tmp_path)
    with pytest.raises(UserError, match="state.safetensors is damaged or edited .*" + message):
        run(config, tiny, tmp_path, resume=True, reporter=Reporter())
    assert _folder_digest(tmp_path) == before


def test_a_state_from_another_run_or_an_edited_config_is_refused(tiny, tmp_path):
    config = TrainConfig(model="lenet5", epochs=2, schedule="none", log_every=5)
    run(config, tiny, tmp_path / "ours", reporter=SignalAt(5))
    run(replace(config, model="mlp"), tiny, tmp_path / "theirs", reporter=SignalAt(5))
    ours = tmp_path / "ours"
    (ours / STATE_FILE).write_bytes((tmp_path / "theirs" / STATE_FILE).read_bytes())  # copied over by mistake
    before = _folder_digest(ours)
    with pytest.raises(UserError, match="state.safetensors is from another run \\(model = 'mlp', its "
                                        "model.safetensors has 'lenet5'\\)"):
        run(replace(config, model="mlp"), tiny, ours, resume=True, reporter=Reporter())
    assert _folder_digest(ours) == before
    theirs = tmp_path / "theirs"
    toml = (theirs / "config.toml").read_text().replace('model = "mlp"', 'model = "lenet5"')
    (theirs / "config.toml").write_text(toml)  # edited by hand: the state decides, and says so
    before = _folder_digest(theirs)
    with pytest.raises(UserError, match="its config.toml says model = 'lenet5' but state.safetensors has 'mlp'; "
                                        "the state is what --resume continues"):
        run(replace(config, model="mlp"), tiny, theirs, resume=True, reporter=Reporter())
    assert _folder_digest(theirs) == before
