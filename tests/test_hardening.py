"""Hostile and careless use, reproduced for real: bad numbers, bombs, NaNs, signals at any moment,
a full disk, concurrent runs, kill -9 while saving. Each ends in one line and a clean folder.

Bad input runs in-process (the `cli` fixture); signals, kills and memory are measured on real
processes. The random moments (Ctrl-C, kill -9) are a handful a run; HYPOTHESIS_PROFILE=long
tries many more."""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LONG, one_error_line, popen_cli, wait_for, write_idx
from digitlab.checkpoint import load_checkpoint, save_checkpoint
from digitlab.data import FILES, IMAGE_MAGIC, LABEL_MAGIC
from digitlab.models import create_model
from digitlab.training.run_folder import read_state


def _meta(model: str, task: str):
    from digitlab.checkpoint import CheckpointMeta
    from digitlab.config import TrainConfig

    return CheckpointMeta(TrainConfig(model=model, task=task).resolved())


def _run_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "1e308"], "--lr: must be 100 or less"),
    (["--weight-decay", "1e308"], "--weight-decay: must be 10 or less"),
    (["--seed", "100000000000000000000000"], "--seed: must be 4,294,967,295 or less"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--epochs", "1" + "0" * 400], "--epochs: must be 9,223,372,036,854,775,807 or less"),
    (["--patience", "2"], "early stopping needs validation; give --val-split N"),
])
def test_numbers_out_of_range(args, fragment, tmp_path, cli):
    one_error_line(cli("train", "mlp", *args, "--out", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()


def test_a_billion_epochs_costs_no_memory_up_front(digits_dir, tmp_path):
    process = popen_cli("train", "mlp", "--epochs", "1000000000", "--log-every", "1", "--data-dir", str(digits_dir),
                        "--out", str(tmp_path / "run"))
    wait_for(process, "epoch: 1, batch: 0,")  # a whole epoch done, and its state saved
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) // 1024
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert peak < 1000, f"{peak} MB"


def test_plotting_a_history_that_is_not_one(tmp_path, cli):
    for text in ("[]", "{}", '{"loss_list": "nope"}', '{"loss_list": [1, "x"]}', "{"):
        (tmp_path / "history.json").write_text(text)
        one_error_line(cli("plot", "loss", str(tmp_path)), "history")
    assert not list(tmp_path.glob("loss.*"))


def test_a_nan_model_is_refused_by_evaluate_and_predict(digits_dir, tmp_path, cli):
    model = create_model("cnn", num_outputs=10)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "model.safetensors", model, _meta("cnn", "classify"))
    one_error_line(cli("evaluate", str(tmp_path), "--data-dir", str(digits_dir)), "NaN or infinite")
    page = tmp_path / "seven.png"
    from PIL import Image, ImageDraw

    image = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(image).line([(20, 20), (80, 20), (40, 90)], fill=0, width=8)
    image.save(page)
    one_error_line(cli("predict", str(tmp_path), str(page)), "NaN or infinite")


def test_divergence_stops_at_once_and_keeps_the_last_good_state(digits_dir, tmp_path, cli):
    out = tmp_path / "early"
    result = cli("train", "cnn", "--lr", "5", "--epochs", "2", "--data-dir", str(digits_dir), "--out", str(out))
    one_error_line(result, "diverged at epoch 0, batch", "try a lower --lr (this run's: 5)")
    assert not out.exists()  # nothing good to keep: nothing left behind
    out = tmp_path / "later"  # the one-cycle warm-up takes the learning rate past what the mlp can bear
    result = cli("train", "mlp", "--lr", "2", "--schedule", "onecycle", "--epochs", "8", "--data-dir",
                 str(digits_dir), "--out", str(out))
    line = one_error_line(result, "diverged at epoch", "keeps the state of the last epoch before it")
    epoch = int(line.split("diverged at epoch ")[1].split(",")[0])
    assert epoch >= 1
    record, _ = read_state(out)
    assert record["position"]["epoch"] == epoch and all(map(torch.isfinite, map(torch.tensor,
                                                                                record["history"]["batch_loss"])))
    model, _ = load_checkpoint(out / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "history.json").exists()


def test_a_checkpoint_bomb_is_refused_before_anything_is_built(tmp_path, cli):
    weights = {k: v.contiguous() for k, v in create_model("mlp").state_dict().items()}
    cases = {"10**8 outputs": {"format": 1, "model": "mlp", "task": "regress", "num_outputs": 10**8},
             "10**9 outputs": {"format": 1, "model": "mlp", "task": "regress", "num_outputs": 10**9},
             "negative": {"format": 1, "model": "mlp", "task": "classify", "num_outputs": -10},
             "a string": {"format": 1, "model": "mlp", "task": "regress", "num_outputs": "1"},
             "no task": {"format": 1, "model": "mlp", "num_outputs": 1},
             "null": None, "a list": [1, 2]}
    for name, meta in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(weights, str(path), metadata={"digitlab": json.dumps(meta)})
        assert path.stat().st_size < 40_000
        start = time.perf_counter()
        one_error_line(cli("predict", str(path), str(path)), "impossible checkpoint metadata")
        assert time.perf_counter() - start < 20  # a hang, not a speed: building 10**9 outputs takes minutes


def test_a_signal_wrapped_by_a_library_is_still_a_signal():
    from digitlab import signals as stop

    # what `import torch` did once when Ctrl-C came in the middle of it: a dataclass's __set_name__
    # turned the Interrupted into a RuntimeError
    try:
        try:
            raise stop.Interrupted("SIGTERM")
        except KeyboardInterrupt as k:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from k
    except RuntimeError as wrapped:
        assert stop.cause(wrapped).name == "SIGTERM"
    assert stop.cause(ValueError("a real bug")) is None


def test_a_signal_that_a_library_swallowed_still_stops_the_command():
    # what a Ctrl-C inside numpy's initialisation did: numpy's ImportError, caught by torch, left numpy
    # half-made; the command went on, and failed later in matplotlib with a traceback. The request
    # remembers the signal: the next graceful section and the CLI (once its libraries are loaded)
    # stop there, while an error that has nothing to do with a signal stays itself.
    script = """
import os, signal
from digitlab.cli import main
from digitlab.signals import Interrupted, StopRequest, stopped_by
stop = StopRequest().install()
print(stopped_by(ValueError("a real bug")))
try:
    os.kill(os.getpid(), signal.SIGINT)
except KeyboardInterrupt:
    pass  # a library that swallows it
print(stopped_by(AttributeError("module 'numpy' has no attribute 'void'")))
try:
    with stop.graceful():
        print("trained")
except Interrupted as e:
    print("stopped before training:", e.name)
print("exit", main(["summary", "mlp"], stop=stop))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["None", "None", "stopped before training: SIGINT", "exit 130"], result.stderr
    assert result.stderr.strip() == "digitlab: interrupted (SIGINT)"


def test_a_signal_inside_a_destructor_is_no_traceback_and_still_stops():
    # what a training process printed when the launcher's SIGTERM landed while a file lock was being
    # collected: Python swallowed the Interrupted raised inside the lock's __del__ and printed
    # "Exception ignored in ..." with a traceback; other errors there must still be shown
    script = """
import os, signal, sys
from digitlab.signals import Interrupted, StopRequest
stop = StopRequest().install()
class Lock:
    def __init__(self, error=None):
        self.error = error
    def __del__(self):
        if self.error:
            raise self.error
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # the handler runs in here
Lock(ValueError("a real bug in a destructor"))
Lock()
try:
    stop.check()
except Interrupted as e:
    sys.exit(143 if e.name == "SIGTERM" else 1)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr
    assert "ValueError: a real bug in a destructor" in result.stderr  # shown, as Python shows it
    assert "Interrupted" not in result.stderr and result.stderr.count("Traceback") == 1, result.stderr


def test_ctrl_c_at_any_moment_is_one_line_and_130(digits_dir, tmp_path):
    rng = random.Random(0)
    commands = [["train", "mlp", "--epochs", "3", "--batches", "5", "--data-dir", str(digits_dir)],
                ["summary", "cnn"], ["evaluate", str(tmp_path / "none"), "--data-dir", str(digits_dir)]]
    outcomes = []
    for trial in range(60 if LONG else 6):  # each command, at a few moments
        args = commands[trial % len(commands)]
        extra = ["--out", str(tmp_path / f"run{trial}")] if args[0] == "train" else []
        process = popen_cli(*args, *extra)
        time.sleep(rng.uniform(0.0, 1.2))
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert "Traceback" not in stderr and "RecursionError" not in stderr, stderr
        if process.returncode == 130:
            assert stderr.strip().splitlines()[-1].startswith("digitlab: interrupted"), stderr
            assert len([line for line in stderr.splitlines() if line.startswith("digitlab:")]) == 1, stderr
        elif process.returncode == -signal.SIGINT:
            # Before Python had started, or as it exited: killed by the signal (a shell says 130).
            assert len(stderr.strip().splitlines()) <= 1, stderr
        else:  # it had finished (or failed on its own) before the signal came
            assert process.returncode in (0, 2), stderr
        outcomes.append(process.returncode)
    assert outcomes.count(130) >= len(outcomes) // 2, outcomes  # most signals land while the command runs


# SIGTERM is 143 in one line: tests/test_runs.py::test_a_real_signal_then_resume_gives_the_same_losses


@pytest.fixture
def tiny_disk(tmp_path):
    """A real file system of a few kB (tmpfs); needs root, as CI has."""
    mounted = []

    def make(kilobytes: int) -> Path:
        where = tmp_path / f"disk{kilobytes}k"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("kilobytes", [8, 24, 40, 60])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(digits_dir, tiny_disk, kilobytes, cli):
    disk = tiny_disk(kilobytes)
    result = cli("train", "mlp", "--epochs", "2", "--batches", "5", "--data-dir", str(digits_dir),
                 "--out", str(disk / "run"))
    line = one_error_line(result, "no space left on device")
    assert str(disk / "run") in line
    assert not list(disk.rglob("*.part"))
    if (disk / "run" / "state.safetensors").exists():  # an epoch was saved before the disk filled up
        assert read_state(disk / "run")[0]["position"]["epoch"] >= 1  # complete and resumable
    else:
        assert not (disk / "run").exists()  # nothing worth keeping: nothing left


def test_a_run_folder_is_never_mixed_or_shared(digits_dir, tmp_path, cli):
    common = ["--epochs", "1", "--batches", "3", "--data-dir", str(digits_dir)]
    # No --out: the same command twice keeps both runs, in numbered folders.
    for _ in range(2):
        assert cli("train", "mlp", *common, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mlp", "mlp-2"]
    # An explicit folder that holds a run: refused, untouched, unless --overwrite.
    out = tmp_path / "runs" / "mlp"
    before = (out / "model.safetensors").read_bytes()
    one_error_line(cli("train", "cnn", *common, "--out", str(out)), "holds a run already", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    (out / ".model.safetensors.dead.part").write_bytes(b"left by a killed run")
    assert cli("train", "cnn", *common, "--out", str(out), "--overwrite").returncode == 0
    assert load_checkpoint(out)[1].model == "cnn" and not list(out.glob("*.part"))
    # Two trainings into one folder at once: the second is told the folder is in use.
    busy = tmp_path / "busy"
    first = popen_cli("train", "cnn", "--epochs", "50", "--log-every", "5", "--data-dir", str(digits_dir),
                      "--out", str(busy))
    wait_for(first, "epoch: 0, batch: 5,")
    one_error_line(cli("train", "mlp", *common, "--out", str(busy), "--overwrite"), "is in use")
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert first.returncode == 130 and load_checkpoint(busy)[1].model == "cnn"


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_complete_or_resumable_folder(digits_dir, tmp_path, cli):
    """Epochs of two batches spend most of their time saving, so kills land inside saves too.

    Each kill lands at a random moment of the run (a few a test run; HYPOTHESIS_PROFILE=long: many): in
    a random epoch, at a random point of it; the run left alone, in this process, says how long one takes."""
    epochs = 16
    args = ["train", "mlp", "--epochs", str(epochs), "--batches", "2", "--log-every", "1",
            "--data-dir", str(digits_dir)]
    reference = tmp_path / "alone"
    started = time.monotonic()
    assert cli(*args, "--out", str(reference)).returncode == 0
    epoch_seconds = (time.monotonic() - started) / epochs  # at most: the run's set-up and final files count too
    expected = json.loads((reference / "history.json").read_text())["batch_loss"]
    rng = random.Random(1)
    states = {"none": 0, "resumable": 0, "complete": 0}
    trials = 40 if LONG else 5
    for trial in range(trials):
        out = tmp_path / f"kill{trial}"
        process = popen_cli(*args, "--out", str(out))
        wait_for(process, f"epoch: {rng.randrange(epochs)}, batch: 0,")
        time.sleep(rng.uniform(0.0, 2 * epoch_seconds))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        if (out / "history.json").exists():  # the last file written: all the others are there
            states["complete"] += 1
            assert all((out / name).is_file() for name in ("model.safetensors", "metrics.csv", "loss.png", "loss.svg"))
            continue
        if not (out / "state.safetensors").exists():
            states["none"] += 1  # killed before its first save: nothing to resume, nothing mixed
            assert not (out / "model.safetensors").exists()
            continue
        states["resumable"] += 1
        read_state(out)  # a complete state, never half of one
        resumed = cli("train", "--resume", str(out), "--data-dir", str(digits_dir))
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads((out / "history.json").read_text())["batch_loss"] == expected
        assert not list(out.glob("*.part")) and not list(out.glob(".*.part"))
    assert states["resumable"] >= trials // 2, states


def test_evaluating_a_model_on_its_own_training_digits_is_refused(digits, tmp_path, cli):
    # A model trained on a set that holds the offline sample's digits (here: all but 100 of them) ...
    folder = tmp_path / "bigger"
    folder.mkdir()
    for key, stem in FILES.items():
        tensor = getattr(digits, key)[100:] if key.startswith("train") else getattr(digits, key)
        write_idx(folder / f"{stem}.gz", IMAGE_MAGIC if tensor.dim() == 3 else LABEL_MAGIC, tuple(tensor.shape),
                  tensor.numpy().tobytes())
    out = tmp_path / "run"
    assert cli("train", "lenet5", "--epochs", "1", "--batches", "5", "--data-dir", str(folder),
               "--out", str(out)).returncode == 0
    # ... scored offline, on the sample itself: refused, unless the user insists.
    offline = {"HOME": str(tmp_path), "XDG_CACHE_HOME": "", "DIGITLAB_DATA_DIR": ""}
    if (Path.home() / ".cache" / "digitlab" / "mnist").exists():
        shutil.rmtree(tmp_path / ".cache", ignore_errors=True)
    result = cli("evaluate", str(out), env=offline)
    if "offline" not in result.stderr:
        pytest.skip("this machine is online: evaluate downloads the full set")
    lines = [line for line in result.stderr.splitlines() if line.startswith("digitlab: error")]
    assert result.returncode == 2 and len(lines) == 1 and "measure memory, not accuracy" in lines[0]
    insisted = cli("evaluate", str(out), "--allow-overlap", "--json", env=offline)
    assert insisted.returncode == 0 and "not a test score" in json.loads(insisted.stdout)["note"]


def test_libtiff_complaints_do_not_reach_the_terminal(digits_model, tmp_path, cli):
    import io

    import numpy as np
    from PIL import Image

    page = np.full((60, 48), 235, np.uint8)
    page[10:50, 22:28] = 20
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="TIFF", compression="tiff_lzw")
    data = buffer.getvalue()
    damaged = bytearray(data)
    damaged[8:40] = bytes(32)  # the LZW strip: libtiff writes "LZWDecode: ..." to descriptor 2 itself
    (tmp_path / "damaged.tiff").write_bytes(bytes(damaged))
    (tmp_path / "cut.tiff").write_bytes(data[: len(data) // 3])
    for name in ("damaged.tiff", "cut.tiff"):  # libtiff's own lines would reach file descriptor 2
        result = cli("predict", str(digits_model), str(tmp_path / name))
        assert result.returncode == 2
        assert [line for line in result.stderr.splitlines() if not line.startswith("digitlab: error")] == []


def test_a_closed_pipe_stops_the_output_not_the_command(digits_dir, digits_model, tmp_path):
    # `digitlab predict ... --json | head -c 100`: the reader goes after 100 bytes
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    from PIL import Image, ImageDraw

    for i in range(40):
        page = Image.new("L", (120, 120), 255)
        ImageDraw.Draw(page).line([(40, 20), (80, 20), (55, 100)], fill=0, width=10)
        page.save(pictures / f"{i:02d}.png")
    for args in (("predict", str(digits_model), str(pictures), "--json"),
                 ("train", "mlp", "--epochs", "1", "--batches", "30", "--log-every", "1", "--data-dir", str(digits_dir),
                  "--out", str(tmp_path / "run"))):
        process = popen_cli(*args)
        process.stdout.read(100)
        process.stdout.close()  # as `| head -c 100` does
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 0, (args[0], stderr)
        assert "Traceback" not in stderr and "Error" not in stderr and len(stderr.splitlines()) <= 1, stderr
    assert (tmp_path / "run" / "history.json").is_file()  # the run went on to its end, and was kept


def test_a_full_disk_for_the_output_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "digitlab", "summary", "cnn"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    one_error_line(result, "cannot write the output: no space left on device")


def test_toml_files_of_any_shape_are_read_or_get_one_short_line(digits_dir, tmp_path, cli):
    bom = tmp_path / "bom.toml"  # a byte-order mark, as some editors write
    bom.write_bytes(b"\xef\xbb\xbf" + b'model = "mlp"\nepochs = 1\n')
    result = cli("train", "--config", str(bom), "--batches", "5", "--data-dir", str(digits_dir),
                 "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    cases = {"deep-lists.toml": "a = " + "[" * 5000 + "]" * 5000,
             "deep-tables.toml": "a = " + "{b = " * 3000 + "1" + "}" * 3000,
             "huge.toml": "# a comment\n" * 200_000,
             "long-key.toml": "k" * 100_000 + " = 1\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        line = one_error_line(cli("train", "--config", str(tmp_path / name), "--out", str(tmp_path / "never")))
        # short, whatever the file held; the file's own path (long under pytest -n) is not the file's doing
        assert len(line.replace(str(tmp_path), "")) < 350 and not (tmp_path / "never").exists(), line
    one_error_line(cli("train", "--config", str(tmp_path), "--out", str(tmp_path / "never")),
                   "is a folder; give a file")
    # a sweep spec is read the same way
    one_error_line(cli("sweep", str(tmp_path / "deep-lists.toml"), "--out", str(tmp_path / "never")), "too deeply")
