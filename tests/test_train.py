"""Training on the real data, reproducibility, and checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from digitlab.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from digitlab.config import TrainConfig
from digitlab.data import InMemoryLoader, normalize
from digitlab.errors import UserError
from digitlab.files import atomic_path
from digitlab.models import create_model
from digitlab.training.loop import fit, train
from digitlab.training.reporters import Reporter
from digitlab.training.run import run


def _meta(model: str, task: str):
    from digitlab.checkpoint import CheckpointMeta
    from digitlab.config import TrainConfig

    return CheckpointMeta(TrainConfig(model=model, task=task).resolved())


def test_mlp_loss_falls_on_real_data(mnist):
    torch.manual_seed(0)
    model = create_model("mlp")
    loader = InMemoryLoader(mnist.train_images, mnist.train_labels, seed=0)
    history = fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1,
                  max_batches=600).history
    first, last = history.batch_loss[:10], history.batch_loss[-50:]
    # Always guessing the mean digit (4.45) scores about 8.4 (the labels' variance).
    assert sum(first) / 10 > 15
    assert sum(last) / 50 < 6
    assert history.loss_list == [history.batch_loss[0], history.batch_loss[200], history.batch_loss[400]]
    assert history.log_points == [(0, 0), (0, 200), (0, 400)]
    assert history.images == 600 * 64


def test_notebook_style_train_returns_the_loss_list(digits):
    model = create_model("cnn")
    loader = InMemoryLoader(digits.train_images[:3200], digits.train_labels[:3200], seed=0)
    loss_list = train(model, loader, epochs=2, lr=0.001, log_every=25)
    assert len(loss_list) == 2 * 2  # batches 0 and 25 of each 50-batch epoch
    assert all(isinstance(v, float) for v in loss_list)


def _losses(digits, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = create_model("cnn")
    loader = InMemoryLoader(digits.train_images, digits.train_labels, seed=seed)
    return fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.001), epochs=2,
               max_batches=40).history.batch_loss


def test_same_seed_gives_bit_identical_losses(digits):
    a, b = _losses(digits, 3), _losses(digits, 3)
    assert a == b  # exact float equality, not approx
    assert _losses(digits, 4) != a


def test_config_rejects_bad_numbers():
    for bad in (dict(epochs=0), dict(lr=-0.1), dict(lr=float("nan")), dict(batch_size=0),
                dict(model="nope"), dict(task="guess"), dict(device="tpu")):
        with pytest.raises(UserError):
            TrainConfig(**bad).resolved()
    assert TrainConfig(model="mlp").resolved().lr == 0.01
    assert TrainConfig(model="cnn").resolved().lr == 0.001


def test_run_writes_a_checkpoint_that_rebuilds_the_model(digits, tmp_path):
    config = TrainConfig(model="cnn", epochs=1, max_batches=30, seed=1)
    result = run(config, digits, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock")  # the lock stays, hidden
    assert names == ["config.toml", "history.json", "loss.png", "loss.svg", "metrics.csv", "model.safetensors",
                     "state.safetensors"]  # no temporary files

    model, meta = load_checkpoint(tmp_path / "run")  # the folder is enough
    assert meta.model == "cnn" and meta.task.outputs == 1 and meta.config.seed == 1
    assert meta.normalization == {"center": 127.5, "scale": 127.5}
    assert meta.config.max_batches == 30 and meta.epochs == 1
    assert meta.final_loss == result.history.final_loss
    images = normalize(digits.test_images[:100])
    with torch.inference_mode():
        reloaded = model(images)
    assert torch.isfinite(reloaded).all()
    # Same weights as the model that trained: retraining with the same seed reproduces them.
    again, _ = load_checkpoint(run(config, digits, tmp_path / "again").out_dir / "model.safetensors")
    assert torch.equal(again(images), reloaded)

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["loss_list"] == result.history.loss_list
    assert len(history["batch_loss"]) == 30


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    model = create_model("mlp")
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta("mlp", "regress"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cut.safetensors: not a readable checkpoint"):
        read_checkpoint(truncated)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(1)}, str(future), metadata={"digitlab": json.dumps({"format": 99})})
    with pytest.raises(UserError, match="checkpoint format 99, this digitlab reads formats 1 and 2"):
        read_checkpoint(future)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(UserError, match="without digitlab metadata"):
        read_checkpoint(foreign)
    mismatch = save_checkpoint(tmp_path / "x.safetensors", model, _meta("cnn", "regress"))
    with pytest.raises(UserError, match="weights do not fit model 'cnn'"):
        load_checkpoint(mismatch)
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing-here")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    model = create_model("mlp")
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta("mlp", "regress"))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    loaded, meta = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_lr_factor_schedules():
    from digitlab.training.optim import lr_factor

    assert [lr_factor("none", s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("onecycle", 0, 100) == pytest.approx(0.04)
    assert lr_factor("onecycle", 25, 100) == pytest.approx(1.0)  # the peak, after a quarter
    assert lr_factor("onecycle", 12, 100) < lr_factor("onecycle", 13, 100)
    assert lr_factor("onecycle", 60, 100) > lr_factor("onecycle", 90, 100) > 0
    with pytest.raises(UserError, match="unknown schedule 'warp'"):
        lr_factor("warp", 0, 10)


def test_optimizers():
    from digitlab.config import OPTIMIZERS
    from digitlab.training.optim import make_optimizer

    params = list(create_model("mlp").parameters())
    kinds = {name: type(make_optimizer(name, params, 0.1, 0.01)).__name__ for name in OPTIMIZERS}
    assert kinds == {"sgd": "SGD", "momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}
    assert make_optimizer("momentum", params, 0.1).param_groups[0]["nesterov"] is True


def test_adam_betas_are_options_recorded_and_refused_where_unused(digits, tmp_path):
    """beta1 and beta2 (the peer recipe's 0.7 and 0.9) reach Adam's param_groups, are written into the
    run's config.toml, and are refused with an optimizer that has none."""
    from digitlab.config import read_config_file
    from digitlab.training.run_folder import read_state, unpack

    config = TrainConfig(model="mlp", task="classify", optimizer="adam", beta1=0.7, beta2=0.9, epochs=1,
                         max_batches=3).resolved()
    result = run(config, digits, tmp_path / "run", reporter=Reporter())
    assert read_config_file(tmp_path / "run" / "config.toml")["beta1"] == 0.7
    record, tensors = read_state(tmp_path / "run")
    assert list(unpack(record["optimizer"], tensors)["param_groups"][0]["betas"]) == [0.7, 0.9]
    assert "betas 0.7, 0.9" in result.config.recipe()
    with pytest.raises(UserError, match="beta1, beta2: only adam and adamw use them"):
        TrainConfig(model="mlp", beta1=0.7).resolved()


def test_schedule_reaches_the_optimizer(digits):
    torch.manual_seed(0)
    model = create_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = InMemoryLoader(digits.train_images[:3200], digits.train_labels[:3200], seed=0)
    fit(model, loader, opt, epochs=1, schedule="cosine")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))


def test_distort_is_seeded_keeps_the_background_and_varies_the_pen(digits):
    from digitlab.data import normalize
    from digitlab.training.augment import Distortion, distort

    images = normalize(digits.train_images[:256])
    moved = distort(images, torch.Generator().manual_seed(0))
    again = distort(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and torch.equal(moved, again)
    assert moved.min() >= -1 and moved.max() <= 1
    assert (moved[:, :, 0, :] == -1).float().mean() > 0.95  # the top row is still background
    assert not torch.equal(distort(images, torch.Generator().manual_seed(1)), moved)
    ys = torch.arange(28.0).view(1, 1, 28, 1)

    def ink(x):
        return (x + 1) / 2

    def centre_row(x):
        return (ink(x) * ys).sum((1, 2, 3)) / ink(x).sum((1, 2, 3))

    shift = (centre_row(moved) - centre_row(images)).abs()
    assert 0.2 < shift.mean() < 3  # moved by about a pixel or two
    # the pen alone: only thicker strokes add ink, only thinner ones remove it
    still = dict(degrees=0, shear=0, scale=(1, 1), aspect=0, shift=0, elastic=0)
    thick = distort(images, torch.Generator().manual_seed(0), Distortion(thicker=0.8, thinner=0, **still))
    thin = distort(images, torch.Generator().manual_seed(0), Distortion(thicker=0, thinner=0.5, **still))
    mass = ink(images).sum((1, 2, 3))
    assert (ink(thick).sum((1, 2, 3)) >= mass - 1e-3).all() and (ink(thick).sum((1, 2, 3)) / mass).max() > 1.5
    assert (ink(thin).sum((1, 2, 3)) <= mass + 1e-3).all() and (ink(thin).sum((1, 2, 3)) / mass).min() < 0.8


def test_non_digits_are_seeded_and_never_a_digit_left_as_it_was(digits):
    from digitlab.data import normalize
    from digitlab.training.augment import non_digits

    images, labels = normalize(digits.train_images[:256]), digits.train_labels[:256]
    made = non_digits(images, labels, torch.Generator().manual_seed(0))
    assert made.shape == images.shape
    assert torch.equal(made, non_digits(images, labels, torch.Generator().manual_seed(0)))
    assert made.min() >= -1 and made.max() <= 1
    assert ((made - images).abs().amax((1, 2, 3)) > 0.5).all()  # every one differs from its digit
    symmetric = (labels == 0) | (labels == 1) | (labels == 8)  # these mirrored or turned would still be digits
    for i in torch.nonzero(symmetric).flatten():
        assert not torch.equal(made[i], images[i].flip(2)) and not torch.equal(made[i], images[i].rot90(1, (1, 2)))


def test_reject_makes_non_digits_unsure_and_keeps_digits_sure(digits, tmp_path):
    import numpy as np

    from digitlab.checkpoint import load_checkpoint
    from digitlab.evaluate import model_outputs
    from digitlab.reading.segment import preprocess
    from digitlab.tasks import probabilities
    from helpers.handwriting import non_digit, on_paper

    rng = np.random.default_rng(0)
    others = []
    for k in range(24):
        picture, _ = on_paper(non_digit(["smiley", "scribble"][k % 2], rng, []), rng, colour=False)
        others.append(preprocess(np.asarray(picture, dtype=np.float32) / 255))
    others = torch.from_numpy(np.stack(others))
    confidence = {}
    for reject in (False, True):
        config = TrainConfig(model="convnet_small", task="classify", optimizer="adam", lr=0.005, epochs=3,
                             augment=True, reject=reject)
        result = run(config, digits, tmp_path / str(reject), reporter=Reporter())
        assert result.test_accuracy > 0.9
        model = load_checkpoint(result.checkpoint)[0]
        confidence[reject] = (probabilities(model_outputs(model, others)).max(1).values.mean(),
                              probabilities(model_outputs(model, digits.test_images)).max(1).values.mean())
    assert confidence[True][0] < confidence[False][0] - 0.15, confidence  # non-digits: much less sure
    assert confidence[True][1] > 0.8, confidence  # digits: still sure
    with pytest.raises(UserError, match="reject: a regression model"):
        TrainConfig(model="cnn", reject=True).resolved()


def test_label_smoothing_caps_the_confidence_it_trains_towards(digits):
    import torch.nn.functional as F

    from digitlab.evaluate import model_outputs
    from digitlab.tasks import probabilities
    from digitlab.training.custom_steps import HandWrittenMLPStep, choose_step

    confidence, first = {}, {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = create_model("convnet_tiny")
        loader, twin = (InMemoryLoader(digits.train_images[:3200], digits.train_labels[:3200], seed=0)
                        for _ in range(2))
        images, labels = next(twin.batches())  # the batch fit starts with
        with torch.no_grad():
            first[smoothing] = F.cross_entropy(model(images), labels, label_smoothing=smoothing).item()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        step = choose_step(model, optimizer, "classify", smoothing=smoothing)  # None: the loop's own step
        history = fit(model, loader, optimizer, epochs=2, task="classify", smoothing=smoothing, step=step).history
        assert history.batch_loss[0] == pytest.approx(first[smoothing], rel=1e-5)  # the step's loss is the smoothed one
        confidence[smoothing] = probabilities(model_outputs(model.eval(), digits.test_images)).max(1).values.mean()
    # one-hot targets push the right digit towards 1; smoothed ones towards 1 - 0.2 + 0.02 = 0.82
    assert confidence[0.0] > 0.9 and confidence[0.2] < 0.82, confidence  # measured: 0.95 and 0.75
    mlp = create_model("mlp", num_outputs=10)
    sgd = torch.optim.SGD(mlp.parameters(), lr=0.01)
    assert isinstance(choose_step(mlp, sgd, "classify"), HandWrittenMLPStep)
    assert choose_step(mlp, sgd, "classify", smoothing=0.1) is None  # the loop's own step: its gradient is one-hot's
    with pytest.raises(UserError, match="label smoothing: a regression model"):
        TrainConfig(model="cnn", label_smoothing=0.1).resolved()


def test_presets_and_overrides():
    from digitlab.config import preset_config

    fast = preset_config("fast")
    assert fast.model == "convnet_small" and fast.task == "classify" and fast.schedule == "onecycle"
    assert preset_config("fast", epochs=5, seed=3).epochs == 5
    assert preset_config("best").recipe() == ("convnet (classify): 20 epochs, adamw lr 0.003, batch 128, onecycle "
                                             "schedule, augmented, validating on 5,000, seed 0")
    assert "onecycle schedule, augmented, bf16 autocast, validating" in preset_config("best", precision="bf16").recipe()
    assert preset_config("chapter", "mlp").lr == 0.01 and preset_config("chapter", "mlp").task == "regress"
    assert preset_config("chapter", "lenet5").task == "classify"
    sprint = preset_config("sprint")  # a layer list: the peer's network, narrowed
    assert sprint.model == "layers" and [layer["type"] for layer in sprint.structure["layers"]][:3] == [
        "conv", "maxpool", "relu"]
    assert (sprint.beta1, sprint.beta2, sprint.label_smoothing) == (0.7, 0.9, 0.1)
    # the preset's structure belongs to its own model: another model keeps its own
    assert preset_config("sprint", "convnet_tiny").structure == preset_config("chapter", "convnet_tiny").structure
    assert preset_config("sprint", "layers").structure == sprint.structure
    with pytest.raises(UserError, match="unknown preset 'turbo'"):
        preset_config("turbo")


def test_classification_run_validates_each_epoch_and_keeps_the_best(digits, tmp_path):
    small = type(digits)(digits.train_images[:3200], digits.train_labels[:3200], digits.test_images,
                        digits.test_labels, source="subset")
    config = TrainConfig(model="lenet5", epochs=2, optimizer="adam", lr=0.002, val_split=320, augment=True)
    result = run(config, small, tmp_path, reporter=Reporter())
    rows = result.history.epochs
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["val_accuracy"] > 0.5 and r["val_loss"] > 0 and r["seconds"] > 0 for r in rows)
    assert result.history.images == 2 * (2880 // 64) * 64  # 320 of the 3,200 held out
    best = max(range(2), key=lambda e: (rows[e]["val_accuracy"], -e))
    assert result.state.best_epoch == best and result.checkpoint.name == "best.safetensors"
    model, meta = load_checkpoint(tmp_path)  # the folder means its best checkpoint
    assert meta.best_epoch == best and meta.val_accuracy == rows[best]["val_accuracy"]
    assert meta.task.name == "classify" and meta.task.outputs == 10
    assert meta.results["test_accuracy"] == result.test_accuracy > 0.8
    assert meta.data["val"] == 320 and meta.data["train"] == 2880


@pytest.mark.parametrize("task", ["regress", "classify"])
def test_hand_written_mlp_gradients_match_autograd(digits, task):
    from digitlab.tasks import get_task
    from digitlab.training.custom_steps import mlp_gradients

    torch.manual_seed(0)
    model = create_model("mlp", num_outputs=get_task(task).outputs)
    images, labels = normalize(digits.train_images[:64]), digits.train_labels[:64].long()
    loss, grads = mlp_gradients(model, images, labels, task)
    reference = get_task(task).loss(model(images), labels)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads):
        assert g.shape == p.shape, name
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_fit_with_the_hand_written_mlp_step_trains_as_autograd_does(digits, weight_decay):
    """fit() handed the hand-written step (and taking it: every step is counted) trains to autograd's
    losses and weights over the same 50 batches, with and without weight decay."""
    from digitlab.training.custom_steps import HandWrittenMLPStep

    def train(hand_written: bool):
        torch.manual_seed(0)
        model = create_model("mlp")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=weight_decay)
        hand, calls = HandWrittenMLPStep.for_model(model, optimizer, "regress"), []

        def counted(images, labels):
            calls.append(len(labels))
            return hand(images, labels)

        loader = InMemoryLoader(digits.train_images[:3200], digits.train_labels[:3200], seed=0)
        step = counted if hand_written else None
        losses = fit(model, loader, optimizer, epochs=1, step=step).history.batch_loss
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()]), calls

    fast, fast_weights, calls = train(hand_written=True)
    slow, slow_weights, none = train(hand_written=False)
    assert calls == [64] * 50 and none == []  # the hand-written step did every step, autograd none of them
    assert len(fast) == len(slow) == 50 and fast[0] == pytest.approx(slow[0], rel=1e-6)
    assert max(abs(a - b) / b for a, b in zip(fast, slow)) < 1e-4
    torch.testing.assert_close(fast_weights, slow_weights, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    untrained = torch.cat([p.detach().flatten() for p in create_model("mlp").parameters()])
    assert (fast_weights - untrained).abs().max() > 1e-3  # the weights moved: the comparison means something


def test_load_checkpoint_places_the_model_as_training_does(tmp_path):
    model = create_model("cnn", num_outputs=10)
    save_checkpoint(tmp_path / "m.safetensors", model, _meta("cnn", "classify"))
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout
    assert not loaded.training


SPY = """
import sys, traceback
import torch
from digitlab.__main__ import main
seen = []
backward = torch.Tensor.backward
def spy(self, *args, **kwargs):
    if not seen:
        seen.append([f for f in traceback.extract_stack()[:-1] if "/digitlab/" in f.filename])
    return backward(self, *args, **kwargs)
torch.Tensor.backward = spy
sys.argv = ["digitlab", *sys.argv[1:]]
try:
    main()
finally:
    print("frames", len(seen[0]), [f.name for f in seen[0]])
"""


def test_the_training_step_is_seven_frames_from_the_command(digits_dir, tmp_path):
    """`digitlab train cnn` calls backward() in loop.fit, at most 7 digitlab frames below the command's entry
    point (as ../shared/tools/loop_depth.py counts them): a learner finds the step where they look for it."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SPY, "train", "cnn", "--epochs", "1", "--batches", "2",
                             "--data-dir", str(digits_dir), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    line = result.stdout.strip().splitlines()[-1]
    count, names = int(line.split()[1]), line.split(" ", 2)[2]
    assert count <= 7 and names.endswith("'fit']"), line


def test_fit_takes_any_iterable_of_batches(digits):
    """A torch DataLoader over a TensorDataset trains through fit as InMemoryLoader does."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    images = (digits.train_images[:640].float().unsqueeze(1) - 127.5) / 127.5
    loader = DataLoader(TensorDataset(images, digits.train_labels[:640]), batch_size=64, shuffle=True)
    model = create_model("cnn", num_outputs=10, init="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = fit(model, loader, optimizer, epochs=3, task="classify", log_every=5).history
    assert len(history.batch_loss) == 30 and history.images == 3 * 640
    assert sum(history.batch_loss[-10:]) < sum(history.batch_loss[:10])  # it learns
