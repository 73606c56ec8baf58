"""Structures as data: every model's knobs, layer lists, and the commands that take them.

- generated structures (Hypothesis: random knobs of every registered model, random valid layer
  lists) build, train a step with a finite gradient for every parameter, export to ONNX that
  onnxruntime runs to within 1e-4, and resume bit for bit;
- the chapter's mlp and cnn given their own defaults through --structure are today's runs;
- every kind of bad structure gets its one line, before any weights exist;
- a structure is recorded in the run and rebuilt from the folder by every command.
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LONG, one_error_line
from digitlab.config import TrainConfig, read_config_file
from digitlab.errors import UserError
from digitlab.models import checked_structure, create_model, knobs, model_for
from digitlab.structures import ACTIVATIONS, plan_layers
from digitlab.training.reporters import Reporter
from digitlab.training.run import run

EXAMPLES = 400 if LONG else 5


@pytest.fixture(scope="module")
def tiny(digits):
    """320 training images (5 batches of 64) and 1,000 test images: a run of a second."""
    return replace(digits, train_images=digits.train_images[:320], train_labels=digits.train_labels[:320],
                   source="tiny subset")


# ---------------------------------------------------------------------------- generated structures

sizes = st.lists(st.integers(1, 24), min_size=1, max_size=3)
KNOB_VALUES = {
    "mlp": st.fixed_dictionaries({}, optional={"hidden": st.lists(st.integers(1, 40), max_size=3),
                                               "activation": st.sampled_from(ACTIVATIONS)}),
    "cnn": st.fixed_dictionaries({}, optional={"channels": sizes, "kernel": st.sampled_from([1, 3, 5]),
                                               "pool": st.sampled_from(["max", "avg"]),
                                               "activation": st.sampled_from(ACTIVATIONS)}),
    "lenet5": st.fixed_dictionaries({}, optional={"channels": st.lists(st.integers(1, 12), min_size=1, max_size=2),
                                                  "hidden": st.lists(st.integers(1, 40), max_size=2),
                                                  "activation": st.sampled_from(ACTIVATIONS),
                                                  "pool": st.sampled_from(["max", "avg"])}),
    "convnet_tiny": st.fixed_dictionaries({}, optional={"widths": sizes, "dropout": st.sampled_from([0.0, 0.3]),
                                                        "norm": st.sampled_from(["batch", "none"])}),
}


@st.composite
def layer_lists(draw):
    """A valid list: convolutions and pools while the picture is at least 4 wide, then maybe flat layers."""
    layers, side = [], 28
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["conv", "maxpool", "avgpool", "batchnorm", "relu", "gelu", "tanh"]))
        if kind == "conv":
            layers.append({"type": "conv", "channels": draw(st.integers(1, 8)),
                           "kernel": draw(st.sampled_from([1, 3, 5]))})
        elif kind.endswith("pool") and side >= 4:
            layers.append({"type": kind})
            side //= 2
        elif not kind.endswith("pool"):
            layers.append(kind)
    if draw(st.booleans()):
        layers.append("flatten")
        for _ in range(draw(st.integers(0, 2))):
            layers.append({"type": "linear", "size": draw(st.integers(1, 32))})
            layers.append(draw(st.sampled_from(["relu", "sigmoid", {"type": "dropout", "p": 0.1}, "batchnorm"])))
    return layers or ["flatten"]


structures = st.one_of(
    *[st.tuples(st.just(name), knob) for name, knob in KNOB_VALUES.items()],
    st.tuples(st.just("layers"), layer_lists().map(lambda layers: {"layers": layers})),
)


@settings(max_examples=EXAMPLES)
@given(case=structures, task=st.sampled_from(["regress", "classify"]))
def test_a_generated_structure_builds_trains_and_every_parameter_learns(case, task):
    name, structure = case
    config = TrainConfig(model=name, structure=structure, task=task).resolved()
    torch.manual_seed(0)
    model = model_for(config, init=config.init)
    model.train()
    from digitlab.tasks import get_task

    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    get_task(task).loss(model(images), labels).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} {structure}: {pname}"


@settings(max_examples=EXAMPLES)
@given(case=structures)
def test_a_generated_structure_exports_and_resumes_bit_for_bit(case, tiny, tmp_path_factory):
    """Two epochs left alone equal one epoch, then --resume for the second; the run folder's model exports to
    ONNX, and onnxruntime agrees with PyTorch within 1e-4."""
    name, structure = case
    folder = tmp_path_factory.mktemp("generated")
    config = TrainConfig(model=name, structure=structure, task="classify", optimizer="adam", lr=0.001, epochs=2,
                         log_every=2)
    alone = run(config, tiny, folder / "alone", reporter=Reporter())
    run(replace(config, epochs=1), tiny, folder / "resumed", reporter=Reporter())
    resumed = run(config, tiny, folder / "resumed", resume=True, reporter=Reporter())
    assert resumed.history.batch_loss == alone.history.batch_loss
    saved = read_config_file(folder / "resumed" / "config.toml")["structure"]
    assert saved == config.resolved().structure  # recorded whole, as TOML

    ort = pytest.importorskip("onnxruntime")
    from digitlab.checkpoint import load_checkpoint
    from digitlab.serving.export import export_onnx

    out = export_onnx(folder / "alone", folder / "model.onnx")
    model, meta = load_checkpoint(folder / "alone")
    pixels = tiny.test_images[:50].float().unsqueeze(1)
    with torch.inference_mode():
        expected = model((pixels - meta.normalization["center"]) / meta.normalization["scale"]).numpy()
    got = ort.InferenceSession(str(out)).run(None, {"image": pixels.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


@settings(max_examples=EXAMPLES)
@given(st.lists(st.integers(1, 30), max_size=3), st.sampled_from(["sigmoid", "tanh", "relu"]),
       st.sampled_from(["regress", "classify"]))
def test_the_hand_written_mlp_step_is_autograds_for_any_hidden_sizes(hidden, activation, task):
    """The fast mlp step's gradients, for any depth and its three activations, equal autograd's."""
    from digitlab.tasks import get_task
    from digitlab.training.custom_steps import mlp_gradients

    torch.manual_seed(1)
    model = create_model("mlp", num_outputs=get_task(task).outputs, hidden=hidden, activation=activation)
    images, labels = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    loss, grads = mlp_gradients(model, images, labels, task)
    get_task(task).loss(model(images), labels).backward()
    assert torch.allclose(loss, get_task(task).loss(model(images), labels))
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- the chapter's defaults

@pytest.mark.parametrize("model, structure, params", [
    ("mlp", ["hidden=10,10", "activation=sigmoid"], 7_971),
    ("cnn", ["channels=20,20", "kernel=5", "pool=max", "activation=relu"], 11_521),
])
def test_the_chapters_models_through_structure_are_todays_runs(model, structure, params, digits_dir, tmp_path, cli):
    """Given through --structure with their own defaults, the chapter's models start from the same weights
    and take the same losses, bit for bit, as with no --structure at all (today's runs)."""
    common = ["--epochs", "1", "--batches", "25", "--log-every", "10", "--data-dir", digits_dir]
    plain = cli("train", model, *common, "--out", tmp_path / "plain")
    spelled = cli("train", model, *common, *[a for s in structure for a in ("--structure", s)],
                  "--out", tmp_path / "spelled")
    assert plain.returncode == 0 and spelled.returncode == 0, spelled.stderr
    histories = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("plain", "spelled")]
    assert histories[0]["batch_loss"] == histories[1]["batch_loss"]
    assert histories[0]["results"]["params"] == histories[1]["results"]["params"] == params
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("plain", "spelled")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert read_config_file(tmp_path / "plain" / "config.toml")["structure"] == knobs(model)


def test_knob_defaults_are_the_chapters_structures():
    assert knobs("mlp") == {"hidden": [10, 10], "activation": "sigmoid"}
    assert knobs("cnn") == {"channels": [20, 20], "kernel": 5, "pool": "max", "activation": "relu"}
    assert sum(p.numel() for p in create_model("mlp").parameters()) == 7_971
    assert sum(p.numel() for p in create_model("cnn").parameters()) == 11_521
    assert sum(p.numel() for p in create_model("mlp", hidden=[]).parameters()) == 785  # a linear model
    layer_cnn = create_model("layers", num_outputs=1)
    assert sum(p.numel() for p in layer_cnn.parameters()) == 11_521  # the chapter's cnn, written as layers


# ---------------------------------------------------------------------------- bad structures

BAD = [
    (["mlp", "--structure", "hidden=0"], "mlp structure hidden: a size must be from 1 to 1,000,000, got 0"),
    (["mlp", "--structure", "hidden=-3"], "a size must be from 1 to 1,000,000, got -3"),
    (["mlp", "--structure", "hidden=2.5"], "a size must be a whole number, got 2.5"),
    (["mlp", "--structure", "hiden=100"], "mlp has no structure key 'hiden'; did you mean 'hidden'?"),
    (["mlp", "--structure", "activation=relux"], "unknown activation 'relux'; did you mean 'relu'?"),
    (["cnn", "--structure", "kernel=15", "--structure", "channels=4,4"],
     "cnn: conv2 (Conv2d): its kernel (15x15) is larger than its 14x14 input"),
    (["cnn", "--structure", "channels=4,4,4,4,4"], "the network is too deep for 28x28"),
    (["convnet", "--structure", "widths=4,4,4,4,4"], "the network is too deep for 28x28"),
    (["mlp", "--structure", "hidden=100000,100000"], "mlp: its weights would take 40.3 GB (10,078,700,001 parameters)"),
    (["cnn", "--structure", "channels=100000,100000"], "its weights would take"),
    (["mlp", "--structure", "hidden"], "write KEY=VALUE"),
    (["mlp", "--structure", "hidden=1,,2"], "an empty item in the list"),
    (["mlp:hiden=3"], "did you mean 'hidden'?"),
    (["cnn", "--structure", "pool=min"], "unknown pool 'min' (choose from max, avg)"),
    (["convnet", "--structure", "dropout=1.5"], "must be a number from 0 to below 1"),
]


@pytest.mark.parametrize("args, fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_structure_is_one_line_before_anything_is_built(args, fragment, tmp_path, cli):
    result = cli("train", *args, "--out", tmp_path / "run")
    one_error_line(result, fragment)
    assert not (tmp_path / "run").exists()


LAYER_BAD = [
    ([{"type": "conv", "channels": 8}, {"type": "linear", "size": 10}],
     "layer 2 (linear10): its input is a picture (8x28x28); put \"flatten\" before it"),
    (["flatten", {"type": "conv", "channels": 8}], "layer 2 (conv8/3): needs a picture"),
    (["maxpool", "maxpool", "maxpool", "maxpool", "maxpool"], "layer 5 (maxpool2): its 1x1 input is smaller than"),
    ([{"type": "conv", "channels": 4, "kernel": 31}], "the kernel (31x31) is larger than its 28x28 input"),
    (["reul"], "layer 1 has unknown type 'reul'; did you mean 'relu'?"),
    ([{"type": "linear"}], "needs its size"),
    ([{"type": "conv", "channels": 8, "kernal": 3}], "has no key 'kernal'; did you mean 'kernel'?"),
    ([{"type": "conv", "channels": 0}], "channels must be a whole number from 1 to 1,000,000, got 0"),
    ([{"type": "dropout", "p": 2}], "p must be a number from 0 to below 1"),
    (["flatten", {"type": "linear", "size": 1_000_000}, {"type": "linear", "size": 1_000_000}],
     "its weights would take 4,003.1 GB"),
    ([], "must be a list of layers"),
    ([7], "layer 1 is 7; a layer is a name"),
]


@pytest.mark.parametrize("layers, fragment", LAYER_BAD, ids=[str(i) for i in range(len(LAYER_BAD))])
def test_a_layer_list_that_does_not_fit_names_the_layer(layers, fragment, tmp_path, cli):
    import tomli_w

    spec = tmp_path / "net.toml"
    spec.write_text(tomli_w.dumps({"model": "layers", "structure": {"layers": layers}}))
    for args in (["train", "--config", spec, "--out", tmp_path / "run"], ["summary", spec]):
        one_error_line(cli(*args), fragment)
    assert not (tmp_path / "run").exists()


def test_a_huge_structure_costs_no_memory():
    """A network of terabytes is refused from its shapes alone, in milliseconds."""
    import resource
    import time

    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(UserError, match="weights would take"):
        checked_structure("mlp", {"hidden": [1_000_000] * 3})
    with pytest.raises(UserError, match="weights would take"):
        plan_layers(["flatten", {"type": "linear", "size": 1_000_000}, {"type": "linear", "size": 1_000_000}])
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB


# ---------------------------------------------------------------------------- everywhere

def test_a_variant_is_recorded_and_every_command_rebuilds_it(digits_dir, tmp_path, cli):
    """A run of `mlp --structure hidden=32 --structure activation=tanh` records its structure; evaluate,
    predict, export and --resume rebuild it from the folder alone; summary shows it."""
    out = tmp_path / "run"
    common = ["--data-dir", digits_dir, "--batches", "20"]
    trained = cli("train", "mlp", "--structure", "hidden=32", "--structure", "activation=tanh", "--epochs", "1",
                  "--out", out, *common)
    assert trained.returncode == 0, trained.stderr
    assert "mlp hidden=32 activation=tanh (regress)" in trained.stdout
    assert read_config_file(out / "config.toml")["structure"] == {"hidden": [32], "activation": "tanh"}
    assert "[structure]" in (out / "config.toml").read_text()
    evaluated = cli("evaluate", out, "--data-dir", digits_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    resumed = cli("train", "--resume", out, "--epochs", "2", *common)
    assert resumed.returncode == 0, resumed.stderr
    again = cli("train", "--config", out / "config.toml", "--epochs", "2", "--out", tmp_path / "again", *common)
    assert again.returncode == 0
    assert json.loads((tmp_path / "again" / "history.json").read_text())["batch_loss"] == \
        json.loads((out / "history.json").read_text())["batch_loss"]
    from digitlab.checkpoint import load_checkpoint

    model, meta = load_checkpoint(out)
    assert [layer.out_features for layer in model.layers] == [32, 1] and model.activation == "tanh"
    assert meta.config.label == "mlp hidden=32 activation=tanh"
    from digitlab.serving.backends import load_models

    assert load_models([out])[0].info()["structure"] == "mlp hidden=32 activation=tanh"  # what the page shows
    if importlib.util.find_spec("onnxruntime"):
        exported = cli("export", out, "--out", tmp_path / "variant.onnx")
        assert exported.returncode == 0, exported.stderr
        assert load_models([tmp_path / "variant.onnx"])[0].info()["structure"] == "mlp hidden=32 activation=tanh"


def test_compare_takes_three_models_and_variants(digits_dir, tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli("compare", "mlp", "mlp:hidden=20", "mlp:activation=relu:hidden=20,20", "--epochs", "1",
                 "--batches", "15", "--log-every", "5", "--data-dir", digits_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["mlp", "mlp_hidden=20", "mlp_hidden=20,20_activation=relu"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mlp", "mlp hidden=20", "mlp hidden=20,20 activation=relu"]
    assert [r["params"] for r in rows] == [7_971, 784 * 20 + 20 + 21, 784 * 20 + 20 + 20 * 20 + 20 + 21]
    assert all(float(r["training FLOPs"]) > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "training FLOPs" in table and "mlp hidden=20,20 activation=relu" in table
    assert (out / "compare.png").is_file()
    twice = cli("compare", "mlp", "mlp:hidden=10,10", "--data-dir", digits_dir, "--out", tmp_path / "twice")
    one_error_line(twice, "compare got 'mlp' twice")
    one_error_line(cli("compare", "mlp", "--data-dir", digits_dir), "compare needs two models or more")


def test_a_structure_that_diverges_is_a_row_and_the_comparison_goes_on(digits_dir, tmp_path, cli):
    """ReLU at a rate the sigmoid mlp takes: its loss overflows. That is an answer, so compare records where
    it diverged and trains the rest."""
    out = tmp_path / "cmp"
    result = cli("compare", "mlp:activation=relu:hidden=100,100", "mlp", "--lr", "0.3", "--epochs", "1",
                 "--batches", "30", "--data-dir", digits_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["model"] == "mlp hidden=100,100 activation=relu"
    assert rows[0]["test accuracy"].startswith("diverged at epoch 0, batch ")
    assert rows[0]["params"] == 784 * 100 + 100 + 100 * 100 + 100 + 101 and rows[0]["final loss"] is None
    assert rows[1]["model"] == "mlp" and rows[1]["test accuracy"].endswith("%")


def test_the_comparison_plot_draws_a_curve_for_each():
    from digitlab.plots import plot_compare

    ax = plot_compare(["mlp", "cnn", "lenet5"], [[3.0, 2.0], [2.5, 1.0], [2.0, 0.5]], (200, 200, 200)).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == [
        "Train loss1 (mlp)", "Train loss2 (cnn)", "Train loss3 (lenet5)"]
    assert ax.get_title() == "training loss: mlp, cnn and lenet5"


def test_summary_takes_a_structure_and_lists_the_keys(cli, tmp_path):
    result = cli("summary", "cnn", "--structure", "kernel=3", "--structure", "channels=8,16")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Total params: 2,033" in text  # 1*8*9+8 + 8*16*9+16 + 16*7*7*1+1
    assert "Training FLOPs per image" in text
    assert "kernel │ 3 │ 5" in text and "channels │ 8,16 │ 20,20" in text
    same = cli("summary", "cnn:kernel=3:channels=8,16")
    assert "Total params: 2,033" in " ".join(same.stdout.split())
    spec = tmp_path / "net.toml"
    spec.write_text('model = "layers"\nepochs = 3\n[structure]\nlayers = ["flatten", { type = "linear", size = 5 }, '
                    '"relu"]\n')
    listed = cli("summary", spec, "--task", "regress")
    assert listed.returncode == 0 and "Total params: 3,931" in " ".join(listed.stdout.split())  # 784*5+5 + 5+1
    assert "only its model and [structure] are read" in listed.stderr


def test_the_examples_shipped_with_the_docs_build():
    root = Path(__file__).resolve().parents[1] / "docs" / "examples"
    small = read_config_file(root / "small-cnn.toml")
    config = TrainConfig(**small).resolved()
    assert sum(p.numel() for p in model_for(config).parameters()) == 16 * 9 + 16 + 32 + 16 * 32 * 9 + 32 + \
        32 * 49 * 64 + 64 + 65 * 10
    from digitlab.studies.spec import read_spec

    spec = read_spec(root / "structure-sweep.toml")
    assert spec.search == {"structure.hidden": ["10,10", "100"], "structure.activation": ["sigmoid", "relu"]}


def test_a_python_registered_models_run_says_how_it_is_read(digits, tmp_path, cli):
    """A model registered from Python trains with run(); the command line says what to do with its folder
    instead of calling it impossible and asking to train again (which cannot help)."""
    from torch import nn

    from digitlab import models

    @models.register_model(lr=0.05, description="a test's own")
    def tiny_net(num_outputs: int = 10, hidden: int = 8) -> nn.Module:  # `hidden` as a whole number, not mlp's list
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

    try:
        small = replace(digits, train_images=digits.train_images[:256], train_labels=digits.train_labels[:256])
        config = TrainConfig(model="tiny_net", structure={"hidden": 12}, epochs=1)
        result = run(config, small, tmp_path / "mine", reporter=Reporter())
        assert result.params == 784 * 12 + 12 + 13 * 10
        from digitlab.checkpoint import load_checkpoint

        model, meta = load_checkpoint(tmp_path / "mine")  # in this process the model is registered
        assert meta.config.structure == {"hidden": 12}
        with pytest.raises(UserError, match="a size must be a whole number, got 'wide'"):
            create_model("tiny_net", hidden="wide")
    finally:
        del models._REGISTRY["tiny_net"]
    line = one_error_line(cli("evaluate", tmp_path / "mine"), "its model 'tiny_net' is not one of digitlab's")
    assert "register_model" in line and "docs/python.md" in line and "train again" not in line


def test_old_run_folders_have_the_default_structure(chapter_model, tmp_path):
    """A checkpoint written before structures (no structure in its config) loads as the model's defaults."""
    from safetensors.torch import load_file, save_file

    from digitlab.checkpoint import META_KEY, load_checkpoint

    path = chapter_model / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    del meta["config"]["structure"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    model, loaded = load_checkpoint(old)
    assert loaded.config.structure == knobs("cnn")
    assert math.isclose(sum(p.numel() for p in model.parameters()), 11_521)


# ---------------------------------------------------------------------------- the docs page

@pytest.fixture(scope="module")
def few_digits_dir(digits, tmp_path_factory) -> Path:
    """1,280 of the small set's training digits and 500 of its test digits, as the four IDX files: the page's
    dozen trainings in seconds."""
    from conftest import write_idx
    from digitlab.data import FILES, IMAGE_MAGIC, LABEL_MAGIC

    folder = tmp_path_factory.mktemp("few-digits")
    for key, stem in FILES.items():
        tensor = getattr(digits, key)[:1280 if key.startswith("train") else 500]
        magic = IMAGE_MAGIC if tensor.dim() == 3 else LABEL_MAGIC
        write_idx(folder / f"{stem}.gz", magic, tuple(tensor.shape), tensor.numpy().tobytes())
    return folder


def test_every_command_on_the_structures_page_runs(few_digits_dir, tmp_path, monkeypatch, capsys):
    """docs/structures.md's commands, in order, as written, in an empty folder beside a copy of the docs'
    examples, on 1,780 real digits; serve blocks, so it is parsed only (test_serve runs one)."""
    import importlib.util
    import shutil

    from test_docs import block_commands, blocks

    from digitlab.cli import build_parser, main

    page = Path(__file__).resolve().parents[1] / "docs" / "structures.md"
    commands = [c for b in blocks(page) if b.lang == "sh" for c in block_commands(b)]
    assert len(commands) >= 12 and {c.args[0] for c in commands} >= {"summary", "train", "compare", "sweep",
                                                                        "evaluate", "predict", "export", "serve"}
    shutil.copytree(page.parent / "examples", tmp_path / "docs" / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIGITLAB_DATA_DIR", str(few_digits_dir))
    for command in commands:
        args = command.args
        if args[0] == "serve" or (args[0] == "export" and not importlib.util.find_spec("onnxruntime")):
            build_parser().parse_args(args)
            continue
        code = main(list(args))
        out = capsys.readouterr()
        assert code == 0, f"{command} exited with {code}\n{out.out[-2000:]}\n{out.err[-2000:]}"
    rows = json.loads((tmp_path / "runs" / "blocks" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["cnn channels=20", "cnn", "cnn channels=20,20,20"]
    trials = (tmp_path / "runs" / "structure-sweep" / "trials.csv").read_text()
    assert "structure.hidden" in trials.splitlines()[0] and "10,10" in trials


SPEC_BAD = [
    ('[fixed]\nmodel = "mlp"\n[search.structure]\nhiden = [[10], [20]]\n', "structure hiden: not a key of mlp"),
    ('[fixed]\nmodel = "mlp"\n[search.structure]\nhidden = [[10], [0]]\n',
     "mlp structure hidden: a size must be from 1"),
    ('[search]\nmodel = ["mlp", "cnn"]\n[search.structure]\nwidths = [[8], [16]]\n', "not a key of mlp or cnn"),
    ('[fixed]\nmodel = "cnn"\n[fixed.structure]\npool = "min"\n[search]\nlr = [0.1, 0.01]\n', "unknown pool 'min'"),
    ('[fixed.structure]\nkernel = 3\n[search.structure]\nkernel = [3, 5]\n', "in both [fixed.structure] and"),
    ('[search.structure]\nkernel = []\n', "must be a non-empty list of choices"),
    ('[search]\nstructure = 3\n', "[search.structure] must be a table"),
]


@pytest.mark.parametrize("text, fragment", SPEC_BAD, ids=[str(i) for i in range(len(SPEC_BAD))])
def test_a_sweep_spec_with_a_bad_structure_is_one_line(text, fragment, tmp_path):
    from digitlab.studies.spec import read_spec

    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        read_spec(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_sweep_searches_structure_keys_and_names_each_trial(digits, tmp_path):
    """[search.structure] lists of sizes come back to each trial as lists; trials.csv and the Pareto
    plot's labels name them."""
    from digitlab.options import SweepOptions
    from digitlab.studies.spec import read_spec
    from digitlab.studies.sweep import run_sweep

    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('[fixed]\nmodel = "mlp"\nepochs = 1\nmax_batches = 5\nval_split = 200\n'
                         '[fixed.structure]\nactivation = "tanh"\n[search.structure]\nhidden = [[6], [7, 5]]\n')
    study = run_sweep(read_spec(spec_file), digits, SweepOptions(trials=2, out=tmp_path / "sweep"), bar=False)
    assert sorted(t.params["structure.hidden"] for t in study.trials) == ["6", "7,5"]
    for t in study.trials:
        structure = read_config_file(Path(t.user_attrs["run"]) / "config.toml")["structure"]
        assert structure == {"hidden": [int(h) for h in t.params["structure.hidden"].split(",")], "activation": "tanh"}
    header, *rows = (tmp_path / "sweep" / "trials.csv").read_text().splitlines()
    assert header.startswith("trial,state,structure.hidden,") and len(rows) == 2
    assert (tmp_path / "sweep" / "pareto.png").is_file()
