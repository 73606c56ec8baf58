"""The `digitlab` command, end to end: in-process through `main(argv)` (the `cli` fixture), and
in a real process where the process is the point (the installed console script, Ctrl-C)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from conftest import copy_run, one_error_line, popen_cli, run_cli, wait_for, write_idx
from digitlab.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from digitlab.data import IMAGE_MAGIC, MIRRORS


def test_help_lists_commands_without_importing_torch():
    script = Path(sys.executable).with_name("digitlab")  # the console script pip installed
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "digitlab"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert result.returncode == 0, result.stderr
    for command in ("summary", "train", "compare", "plot"):
        assert command in result.stdout
    # nor the package metadata (read only for --version), before the signal handlers are set
    check = subprocess.run([sys.executable, "-c", "import sys, digitlab.cli as c; c.build_parser(); "
                            "print('torch' in sys.modules, 'importlib.metadata' in sys.modules)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "False False", check.stderr


def test_version_is_the_installed_packages(cli):
    from importlib.metadata import version

    import digitlab

    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"digitlab {version('digitlab')}\n"
    assert digitlab.__version__ == version("digitlab") and "__version__" in digitlab.__all__


def test_train_help_lists_registered_models(cli):
    result = cli("train", "--help")
    assert result.returncode == 0
    assert "one of: cnn, convnet, convnet_small, convnet_tiny, layers, lenet5, mlp" in " ".join(result.stdout.split())


@pytest.mark.parametrize("model, total, size", [("mlp", "7,971", "0.03"), ("cnn", "11,521", "0.23")])
def test_summary(model, total, size, cli):
    result = cli("summary", model)
    assert result.returncode == 0, result.stderr
    assert f"Total params: {total}" in result.stdout
    assert f"Estimated Total Size (MB): {size}" in result.stdout


def test_train_writes_a_run_folder(digits_dir, tmp_path, cli):
    out = tmp_path / "run"
    result = cli("train", "mlp", "--epochs", "2", "--batches", "60", "--log-every", "50", "--data-dir", str(digits_dir),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    logs = [line for line in result.stdout.splitlines() if line.startswith("epoch: ")]
    assert [line.split(", loss is:")[0] for line in logs] == [
        "epoch: 0, batch: 0", "epoch: 0, batch: 50", "epoch: 1, batch: 0", "epoch: 1, batch: 50"]
    assert float(logs[0].split()[-1]) > float(logs[-1].split()[-1])
    assert "4,000 train / 1,000 test" in result.stdout
    assert f"training mlp (regress): 2 epochs, sgd lr 0.01, batch 64, 60 batches an epoch, seed 0 in {out}\n" \
        in result.stdout  # the recipe as resolved: the preset, the file, the options and the model's defaults
    for name in ("model.safetensors", "history.json", "loss.png", "loss.svg"):
        assert f"wrote {out / name}" in result.stdout
    model, meta = load_checkpoint(out)
    assert meta.epochs == 2 and meta.config.lr == 0.01
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss_list"]) == 4 and len(history["epoch_mean_loss"]) == 2


def test_compare_is_the_chapter_experiment(digits_dir, tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli("compare", "mlp", "cnn", "--epochs", "1", "--batches", "40", "--data-dir", str(digits_dir),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Total params: 7,971" in result.stdout and "Total params: 11,521" in result.stdout
    for path in ("mlp/model.safetensors", "cnn/model.safetensors", "compare.png", "compare.svg",
                 "results.md", "results.json"):
        assert (out / path).is_file(), path
        assert f"wrote {out / path}" in result.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mlp", "cnn"]
    assert [r["params"] for r in rows] == [7971, 11521]
    assert all(r["images/s"] > 0 and r["wall time (s)"] > 0 and r["final loss"] > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert table.startswith("| model | params | training FLOPs | final loss | last-epoch mean loss | test accuracy | "
                            "wall time (s) |")
    assert all(0 < float(r["test accuracy"].rstrip("%")) <= 100 for r in rows)
    assert Image.open(out / "compare.png").size[0] > 500


def test_compare_refuses_a_training_runs_folder(chapter_model, digits_dir, tmp_path, cli):
    run = copy_run(chapter_model, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    for extra in ((), ("--overwrite",)):
        one_error_line(cli("compare", "mlp", "cnn", "--epochs", "1", "--batches", "2", "--data-dir", str(digits_dir),
                           "--out", str(run), *extra), "holds a training run", "choose another --out")
    assert sorted(p.name for p in run.iterdir()) == before  # no mlp/, cnn/ or compare.png inside it


def test_the_comparison_plot_says_what_its_x_axis_counts():
    from digitlab.plots import plot_two_losses

    ax = plot_two_losses([3.0, 2.0], [2.5, 1.0], every=200, title="training loss: mlp and cnn").axes[0]
    assert ax.get_xlabel() == "freq (the loss of batch 0, 200, 400, ... of each epoch)"
    assert ax.get_title() == "training loss: mlp and cnn"
    assert all(float(t).is_integer() for t in ax.get_xticks())  # two points: 0 and 1, not 0.2, 0.4, ...
    assert plot_two_losses([3.0], [2.0]).axes[0].get_xlabel() == "freq"  # the chapter's own label
    from digitlab.plots import plot_compare

    same = plot_compare(("mlp", "cnn"), ([3.0, 2.0], [2.5, 1.0]), (100, 100)).axes[0]
    assert same.get_xlabel() == "freq (the loss of batch 0, 100, 200, ... of each epoch)"
    assert [t.get_text() for t in same.get_legend().get_texts()] == ["Train loss1 (mlp)", "Train loss2 (cnn)"]
    assert plot_compare(("mlp", "cnn"), ([3.0], [2.0]), (100, 200)).axes[0].get_xlabel() == "freq"  # no one step


def test_plot_commands(digits_dir, tmp_path, cli):
    runs = []
    for model in ("mlp", "cnn"):
        runs.append(tmp_path / model)
        assert cli("train", model, "--epochs", "1", "--batches", "5", "--log-every", "1",
                   "--data-dir", str(digits_dir), "--out", str(runs[-1])).returncode == 0
    (runs[0] / "loss.png").unlink()
    assert cli("plot", "loss", str(runs[0])).returncode == 0
    assert Image.open(runs[0] / "loss.png").format == "PNG"
    result = cli("plot", "compare", *map(str, runs), "--out", str(tmp_path / "both.png"))
    assert result.returncode == 0, result.stderr
    width, height = Image.open(tmp_path / "both.png").size
    assert width > 800 and 350 < height < width  # the chapter's 10 x 5 inch figure
    svg = (tmp_path / "both.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "#e4007f" in svg and "#f19ec2" in svg
    result = cli("plot", "sigmoid", "--out", str(tmp_path / "sig"))
    assert result.returncode == 0
    width, height = Image.open(tmp_path / "sig.png").size
    assert width > 300 and height > 200
    one_error_line(cli("plot", "loss", str(tmp_path / "nope")), "no training history")


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, fragment", [
    (["train", "lenet9"], "invalid choice: 'lenet9'"),
    (["summary", "vgg"], "invalid choice: 'vgg'"),
    (["compare", "mlp", "mlp"], "compare got 'mlp' twice"),
    (["train", "mlp", "--epochs", "0"], "--epochs: must be 1 or more, got 0"),
    (["train", "mlp", "--epochs", "-3"], "--epochs: must be 1 or more"),
    (["train", "mlp", "--epochs", "ten"], "--epochs: 'ten' is not a whole number"),
    (["train", "mlp", "--lr", "0"], "--lr: must be a number above 0, got 0"),
    (["train", "mlp", "--lr", "-0.1"], "--lr: must be a number above 0"),
    (["train", "mlp", "--lr", "fast"], "--lr: 'fast' is not a number"),
    (["train", "mlp", "--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["train", "mlp", "--batch-size", "0"], "--batch-size: must be 1 or more"),
])
def test_bad_arguments_get_one_line_and_exit_2(args, fragment, tmp_path, cli):
    result = cli(*args, "--out", str(tmp_path / "out")) if args[0] != "summary" else cli(*args)
    one_error_line(result, fragment)
    assert not (tmp_path / "out").exists()


def test_missing_and_malformed_data_dirs(tmp_path, cli):
    out = tmp_path / "out"
    one_error_line(cli("train", "mlp", "--data-dir", str(tmp_path / "absent"), "--out", str(out)),
                   "absent' does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    one_error_line(cli("train", "mlp", "--data-dir", str(bad), "--out", str(out)), "no train-images")
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        write_idx(bad / f"{stem}.gz", IMAGE_MAGIC, (2, 28, 28), bytes(100))  # truncated on purpose
    one_error_line(cli("train", "mlp", "--data-dir", str(bad), "--out", str(out)),
                   "train-images-idx3-ubyte.gz: truncated")
    one_error_line(cli("train", "mlp", "--out", str(out), env={"DIGITLAB_DATA_DIR": str(bad)}), "truncated",
                   "the folder is DIGITLAB_DATA_DIR's: set DIGITLAB_DATA_DIR to a folder with the four MNIST")
    line = one_error_line(cli("train", "mlp", "--out", str(out), env={"DIGITLAB_DATA_DIR": str(tmp_path / "gone")}),
                          "gone' does not exist; set DIGITLAB_DATA_DIR to a folder with the four MNIST IDX files, "
                          "or unset it")
    assert "--data-dir" not in line  # the user named no --data-dir
    assert not out.exists()


def test_unwritable_output_folder(digits_dir, tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_error_line(cli("train", "mlp", "--data-dir", str(digits_dir), "--out", str(blocker / "run")),
                   "cannot write to output folder", "--out")
    assert blocker.read_text() == "not a folder"


def test_ctrl_c_saves_the_last_complete_state_and_exits_130(digits_dir, tmp_path):
    from digitlab.training.run_folder import read_state

    out = tmp_path / "run"
    process = popen_cli("train", "cnn", "--epochs", "50", "--log-every", "20", "--data-dir", digits_dir, "--out", out)
    wait_for(process, "epoch: 0, batch: 20,")  # training has really started
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    # it stops, says where, and scores nothing: a stopped run is not a finished one
    position = read_state(out, tensors=False)[0]["position"]
    assert position["stopped"] == "SIGINT" and position["epoch"] == 0 and 21 <= position["batch"] < 62
    assert stderr.strip().splitlines() == [
        f"digitlab: interrupted (SIGINT): stopped after the last complete batch (epoch 0, batch {position['batch']}), "
        f"nothing scored; continue with --resume {out}"]
    assert "test accuracy" not in stdout and "wrote" not in stdout
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [  # no history.json: not finished
        "config.toml", "metrics.csv", "model.safetensors", "state.safetensors"]


def _mirror_reachable() -> bool:
    host = MIRRORS[0].split("/")[2]
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_mirror_reachable(), reason="this machine is online: a first run downloads MNIST")
def test_first_run_on_a_fresh_offline_machine_uses_the_sample(tmp_path, cli):
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": "", "DIGITLAB_DATA_DIR": ""}
    result = cli("train", "mlp", "--epochs", "1", "--out", str(tmp_path / "run"), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "5,000-digit MNIST sample" in result.stderr and "--data-dir" in result.stderr
    assert "4,000 train / 1,000 test" in result.stdout
    assert "epoch: 0, batch: 0," in result.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_evaluate_needs_only_the_checkpoint(digits_model, digits_dir, tmp_path, cli):
    run_dir = copy_run(digits_model, tmp_path)  # evaluate writes its figures next to the checkpoint
    temperature = read_checkpoint(run_dir / "best.safetensors")[1].temperature
    # the folder means its best checkpoint, calibrated on the run's validation split ...
    result = cli("evaluate", str(run_dir), "--json", "--data-dir", str(digits_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(run_dir / "best.safetensors")
    assert report["temperature"] == temperature and 0 <= report["calibration_error"] < 0.1
    for name in ("confusion.png", "worst.png"):
        assert Image.open(run_dir / name).format == "PNG"
    # ... the last epoch's weights, calibrated on the same split ...
    last = json.loads(cli("evaluate", str(run_dir / "model.safetensors"), "--json", "--data-dir",
                          str(digits_dir)).stdout)
    assert last["temperature"] == read_checkpoint(run_dir / "model.safetensors")[1].temperature > 0
    # ... and a checkpoint without a temperature (as digitlab wrote the last epoch's before) scored as it is
    model, meta = load_checkpoint(run_dir / "model.safetensors")
    save_checkpoint(tmp_path / "plain.safetensors", model, replace(meta, temperature=None))
    result = cli("evaluate", str(tmp_path / "plain.safetensors"), "--json", "--data-dir", str(digits_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "convnet_small" and report["task"] == "classify" and report["images"] == 1000
    assert 0.85 < report["accuracy"] < 1  # a fraction, not a percentage
    assert report["accuracy"] == last["accuracy"]  # a temperature changes no answer
    assert len(report["precision"]) == len(report["recall"]) == 10
    assert sum(report["confusion"][d][d] for d in range(10)) == round(report["accuracy"] * 1000)
    assert report["temperature"] is None and 0 <= report["calibration_error"] < 0.1  # not calibrated
    text = cli("evaluate", str(tmp_path / "plain.safetensors"), "--data-dir", str(digits_dir),
               "--out", str(tmp_path / "report"))
    assert text.returncode == 0 and f"{report['accuracy']:.2%}" in text.stdout and "precision" in text.stdout
    assert f"expected calibration error {report['calibration_error']:.2%}, not calibrated" in text.stdout
    assert (tmp_path / "report" / "confusion.svg").is_file()


def test_evaluate_a_regression_checkpoint_rounds_its_output(digits_dir, tmp_path, cli):
    run_dir = tmp_path / "mlp"
    assert cli("train", "mlp", "--epochs", "15", "--data-dir", str(digits_dir), "--out", str(run_dir)).returncode == 0
    report = json.loads(cli("evaluate", str(run_dir), "--json", "--data-dir", str(digits_dir)).stdout)
    assert report["task"] == "regress" and 0.2 < report["accuracy"] < 0.7  # rounding a regression is crude


@pytest.mark.parametrize("args, fragment", [
    (["evaluate", "nowhere"], "no checkpoint at 'nowhere'"),
    (["train", "mlp", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["train", "mlp", "--weight-decay", "-1"], "--weight-decay: must be 0 or more"),
    (["train", "--preset", "turbo"], "invalid choice: 'turbo'"),
    (["train", "--model", "convnet"], "unrecognized arguments: --model (see digitlab train --help)"),
    (["train", "mlp", "--val-split", "-2"], "--val-split: must be 0 or more"),
    (["serve", "nowhere", "--port", "70000"], "--port: must be 65,535 or less, got 70000"),
    (["serve", "nowhere", "--threshold", "1.5"], "--threshold: must be 1 or less"),
    (["serve", "nowhere", "--threshold", "inf"], "--threshold: must be a finite number, got inf"),
])
def test_more_bad_arguments(args, fragment, cli):
    one_error_line(cli(*args), fragment)


def test_options_come_back_from_their_own_command_lines():
    """A sweep's workers get their options as a command line (`as_argv`): every options dataclass, and
    values that look like flags, come back whole."""
    import argparse
    from dataclasses import fields

    from digitlab.cli.export import ExportOptions
    from digitlab.cli.read import PredictOptions
    from digitlab.options import LaunchOptions, ServeOptions, SweepOptions, add_options, as_argv, options_from

    for given in (ServeOptions(runs=[Path("-r"), Path("s.onnx")], host="::1", port=9000, threshold=0.5,
                               allow_hosts=["a.example", "b.example"], cors=["http://c.example", "-x"]),
                  SweepOptions(trials=3, workers=2, storage="sqlite:///x.db", sampler="random", seed=4, worker=1,
                               study="--trials", spec=Path("-spec.toml"), data_dir=Path("d")),
                  ExportOptions(run=Path("-run"), out=Path("m.onnx"), opset=18, overwrite=True),
                  PredictOptions(checkpoint=Path("r"), inputs=["-a.png", "b.png"], json=True, threshold=0.5),
                  LaunchOptions(nproc=2, nnodes=2, rdzv_endpoint="127.0.0.1:29500")):
        parser = argparse.ArgumentParser()
        add_options(parser, type(given))
        assert options_from(parser.parse_args(as_argv(given)), type(given)) == given
        needed = {f.name: getattr(given, f.name) for f in fields(given)
                  if f.metadata["flag"] == "" or f.metadata["required"]}
        bare = type(given)(**needed)  # nothing kept from before
        assert options_from(parser.parse_args(as_argv(bare)), type(given)) == bare
    assert ServeOptions().cors == [] and ServeOptions().cors is not ServeOptions().cors


def test_threads_are_chosen_from_the_load_recorded_and_kept_on_resume(digits_dir, tmp_path, cli):
    from digitlab.training.run_folder import read_state

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:  # every core busy: the run takes one thread, and says why
        busy = run_cli("train", "mlp", "--epochs", "1", "--batches", "2", "--data-dir", digits_dir,
                       "--out", tmp_path / "busy", env={"DIGITLAB_THREADS": ""})
    finally:
        for burner in burners:
            burner.kill()
    assert busy.returncode == 0, busy.stderr
    assert "digitlab: the machine is busy (" in busy.stderr
    assert "training on 1 thread; --threads N chooses" in busy.stderr
    assert read_state(tmp_path / "busy", tensors=False)[0]["threads"] == 1
    out = tmp_path / "two"
    assert cli("train", "mlp", "--epochs", "1", "--batches", "3", "--threads", "2", "--data-dir", str(digits_dir),
               "--out", str(out)).returncode == 0
    assert read_state(out, tensors=False)[0]["threads"] == 2
    resumed = cli("train", "--resume", str(out), "--epochs", "2", "--data-dir", str(digits_dir),
                  env={"DIGITLAB_THREADS": "1"})
    assert resumed.returncode == 0 and read_state(out, tensors=False)[0]["threads"] == 2  # its own, not this process's
    one_error_line(cli("train", "mlp", "--threads", "0"), "--threads: must be 1 or more, got 0")
