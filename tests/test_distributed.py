"""Training on several processes for real: torchrun and `--nproc` on 127.0.0.1 with gloo, against
the single-process run, a two-node rendezvous, a resumed distributed run, and the bad set-ups."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes on two cores


def _losses(run: Path) -> list[float]:
    return json.loads((run / "history.json").read_text())["batch_loss"]


def _max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(digits_dir, out, *options: str) -> list[str]:
    return ["train", *options, "--data-dir", str(digits_dir), "--out", str(out), "--log-every", "20"]


@pytest.fixture(scope="module")
def single(digits_dir, tmp_path_factory):
    """The single-process runs the distributed ones must reproduce: 100 steps, 2 epochs of 50 batches."""
    runs = {}
    for model in ("mlp", "lenet5"):
        out = tmp_path_factory.mktemp("single") / model
        result = run_cli(*_train(digits_dir, out, model, "--epochs", "2", "--batches", "50"), env=ONE_THREAD)
        assert result.returncode == 0, result.stderr
        runs[model] = out
    return runs


def test_torchrun_on_two_processes_reproduces_one(digits_dir, tmp_path, single):
    # the mlp: one process takes the hand-written step, two take autograd's all-reduced gradients
    out = tmp_path / "mlp"
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "digitlab",
                             *_train(digits_dir, out, "mlp", "--epochs", "2", "--batches", "50")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ONE_THREAD}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _max_relative_difference(_losses(out), _losses(single["mlp"])) < 1e-4
    assert result.stdout.count("epoch: 0, batch: 0, loss is:") == 1  # rank 0 alone prints
    assert result.stdout.count("data: ") == 1 and "test accuracy" in result.stdout
    history = json.loads((out / "history.json").read_text())
    assert history["world_size"] == 2 and history["backend"] == "gloo"
    from digitlab.reading.checkpoint import read_checkpoint

    meta = read_checkpoint(out / "model.safetensors")[1]
    assert meta["world_size"] == 2 and meta["backend"] == "gloo"
    alone = json.loads((single["mlp"] / "history.json").read_text())
    assert alone["world_size"] == 1 and alone["backend"] is None


def test_nproc_two_reproduces_one_and_resumes(digits_dir, tmp_path, single):
    out = tmp_path / "lenet5"
    first = run_cli(*_train(digits_dir, out, "lenet5", "--epochs", "1", "--batches", "50", "--nproc", "2"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("epoch 0 done") == 1 and first.stderr.count("\n") <= 1, first.stderr
    again = run_cli("train", "--resume", str(out), "--epochs", "2", "--nproc", "2", "--data-dir", str(digits_dir))
    assert again.returncode == 0, again.stderr
    # one epoch on two processes, then one more after a resume: the single process's 100 steps
    assert _max_relative_difference(_losses(out), _losses(single["lenet5"])) < 1e-4


def test_two_nodes_meet_at_a_c10d_rendezvous(digits_dir, tmp_path, single):
    port = _free_port()
    out = tmp_path / "two-nodes"
    command = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "digitlab-test", "-m", "digitlab",
               *_train(digits_dir, out, "mlp", "--epochs", "2", "--batches", "50")]
    nodes = [subprocess.Popen(command, cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr
    assert sum(stdout.count("epoch: 0, batch: 0, loss is:") for stdout, _ in outputs) == 1
    assert json.loads((out / "history.json").read_text())["world_size"] == 2
    assert _max_relative_difference(_losses(out), _losses(single["mlp"])) < 1e-4


def test_a_rendezvous_nobody_joins_times_out_in_one_line(digits_dir, tmp_path):
    start = time.monotonic()
    result = run_cli(*_train(digits_dir, tmp_path / "never", "mlp", "--nproc", "1", "--nnodes", "2",
                             "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-timeout", "5"))
    assert result.returncode == 2 and time.monotonic() - start < 90
    assert "did not meet at 127.0.0.1" in result.stderr and "within 5 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists(), result.stderr


@pytest.mark.parametrize("options, fragment", [
    (("--device", "cuda"), "--device cuda with --nproc 2, but PyTorch sees"),
    (("--batch-size", "63"), "--batch-size 63 does not split evenly over 2 processes"),
    (("--data-dir", "/nowhere/mnist"), "/nowhere/mnist"),  # every process fails alike: one line, rank 0's
])
def test_bad_set_ups_get_one_line(digits_dir, tmp_path, options, fragment):
    import torch

    if "cuda" in options and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    data = options[1] if options[0] == "--data-dir" else str(digits_dir)
    options = options if options[0] != "--data-dir" else ()
    result = run_cli("train", "mlp", "--nproc", "2", *options, "--data-dir", data, "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_a_rank_that_dies_stops_the_others_and_the_run_resumes(digits_dir, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "digitlab",
                                 *_train(digits_dir, out, "mlp", "--epochs", "30", "--batches", "40", "--nproc", "2")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.safetensors").exists():  # an epoch is saved
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.1)
    os.kill(_workers(launcher.pid)[-1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # the other process did not wait for its collective's timeout
    assert launcher.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "died (killed by SIGKILL)" in stderr, stderr
    from digitlab.training.state import read_state

    done = read_state(out, tensors=False)[0]["position"]["epoch"]
    assert 1 <= done < 30
    resumed = run_cli("train", "--resume", str(out), "--data-dir", str(digits_dir))  # on one process, even
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 30 and len(history["batch_loss"]) == 30 * 40


def test_ctrl_c_stops_every_process_after_the_same_step(digits_dir, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "digitlab",
                                 *_train(digits_dir, out, "mlp", "--epochs", "100", "--batches", "40", "--nproc", "2")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "state.safetensors").exists():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the launcher and every worker
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines() == [
        "digitlab: interrupted (SIGINT): saved the state after the last complete batch; continue with --resume"]
    from digitlab.training.state import read_state

    position = read_state(out, tensors=False)[0]["position"]
    assert position["stopped"] == "SIGINT" and position["epoch"] < 100
    resumed = run_cli("train", "--resume", str(out), "--data-dir", str(digits_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "history.json").read_text())["batch_loss"]) == 100 * 40


def _workers(parent: int) -> list[int]:
    """The digitlab worker processes under `parent` (the launcher), oldest first."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return sorted(children)
