"""Training on several processes for real: torchrun and `--nproc` on 127.0.0.1 with gloo, against
the single-process run, a two-node rendezvous, a resumed distributed run, and the bad set-ups.

The workers are always real processes. The `--nproc` launcher runs in-process (`cli`) where
only its answer matters, and in a process of its own where a signal or a killed worker is the
point; the stopped runs resume for one more epoch, not to their end."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, call_main, one_error_line, popen_cli

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
    """The single-process runs the distributed ones must reproduce: 100 steps, 2 epochs of 50 batches
    (in-process, on one thread as each of two processes would be)."""
    runs = {}
    for model in ("mlp", "lenet5"):
        out = tmp_path_factory.mktemp("single") / model
        result = call_main(None, *_train(digits_dir, out, model, "--epochs", "2", "--batches", "50"), threads=1)
        assert result.returncode == 0, "the single-process run failed: see its output above"
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
    from digitlab.checkpoint import read_checkpoint

    meta = read_checkpoint(out / "model.safetensors")[1]
    assert meta.world_size == 2 and meta.backend == "gloo"
    alone = json.loads((single["mlp"] / "history.json").read_text())
    assert alone["world_size"] == 1 and alone["backend"] is None


def test_nproc_two_reproduces_one_and_resumes(digits_dir, tmp_path, single, cli):
    out = tmp_path / "lenet5"
    first = cli(*_train(digits_dir, out, "lenet5", "--epochs", "1", "--batches", "50", "--nproc", "2"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("epoch 0 done") == 1 and first.stderr.count("\n") <= 1, first.stderr
    assert first.stdout.startswith("digitlab: starting 2 training processes on this machine\n")
    assert first.stdout.count("training lenet5 (classify): 1 epoch, sgd lr 0.05, batch 64, 50 batches an epoch") == 1
    again = cli("train", "--resume", str(out), "--epochs", "2", "--nproc", "2", "--data-dir", str(digits_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("lenet5: resuming after step 50 of 100") == 1
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


def test_a_rendezvous_nobody_joins_times_out_in_one_line(digits_dir, tmp_path, cli):
    start = time.monotonic()
    result = cli(*_train(digits_dir, tmp_path / "never", "mlp", "--nproc", "1", "--nnodes", "2",
                         "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-timeout", "2"))
    assert result.returncode == 2 and time.monotonic() - start < 90  # a hang, not a speed
    assert "did not meet at 127.0.0.1" in result.stderr and "within 2 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists(), result.stderr


@pytest.mark.parametrize("endpoint, fragment", [
    ("host:notaport", "the port must be a number from 1 to 65535"),
    ("127.0.0.1:99999", "the port must be a number from 1 to 65535"),
    ("127.0.0.1:-5", "the port must be a number from 1 to 65535"),
    (":", "give HOST:PORT"),
    ("[::1", "an IPv6 address goes in brackets"),
    ("no-such-host.invalid", "cannot find the host"),  # torch itself aborts with a C++ stack trace here
])
def test_a_bad_rendezvous_endpoint_gets_one_line(endpoint, fragment, tmp_path, cli):
    result = cli("train", "mlp", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                 "--rdzv-timeout", "5", "--out", str(tmp_path / "never"))
    one_error_line(result, fragment)
    assert not (tmp_path / "never").exists()


@pytest.fixture
def silent_port():
    """A port held by a listener that accepts connections and never answers (another program's port)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held = []
        thread = threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(8)], daemon=True)
        thread.start()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("extra, sent", [
    (("--rdzv-timeout", "3"), None),  # torch would wait there for good, deaf to signals
    (("--nnodes", "2"), signal.SIGINT),
    (("--nnodes", "1"), signal.SIGTERM),
])
def test_a_port_that_never_answers_times_out_and_hears_signals(silent_port, extra, sent, tmp_path):
    process = popen_cli("train", "mlp", "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{silent_port}", *extra,
                        "--out", str(tmp_path / "never"))
    if sent:
        time.sleep(3)  # python and torch are up, waiting at the endpoint
        process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)  # a hang, not a speed
    expected = {None: 2, signal.SIGINT: 130, signal.SIGTERM: 143}[sent]
    assert process.returncode == expected and len(stderr.strip().splitlines()) == 1, stderr
    assert ("did not answer as a rendezvous within 3 s" if sent is None else "interrupted") in stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("options, fragment", [
    (("--device", "cuda"), "--device cuda with --nproc 2, but PyTorch sees"),
    (("--batch-size", "63"), "--batch-size 63 does not split evenly over 2 processes"),
    (("--data-dir", "/nowhere/mnist"), "/nowhere/mnist"),  # every process fails alike: one line, rank 0's
])
def test_bad_set_ups_get_one_line(digits_dir, tmp_path, options, fragment, cli):
    import torch

    if "cuda" in options and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    data = options[1] if options[0] == "--data-dir" else str(digits_dir)
    options = options if options[0] != "--data-dir" else ()
    result = cli("train", "mlp", "--nproc", "2", *options, "--data-dir", data, "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_the_launcher_leaves_the_process_as_it_found_it(tmp_path):
    # through the API: the environment its workers need and the signals the elastic agent takes are
    # set for the launch only
    from digitlab.options import LaunchOptions
    from digitlab.training.launch import launch

    def handlers() -> dict:
        numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
        return {number: signal.getsignal(number) for number in numbers}

    environment, before = dict(os.environ), handlers()
    code = launch(["train", "mlp", "--data-dir", "/nowhere/mnist", "--out", str(tmp_path / "never")],
                  LaunchOptions(nproc=2))
    assert code == 2  # both workers said why, in a line each: the data is not there
    assert dict(os.environ) == environment and handlers() == before


def test_a_rank_that_dies_stops_the_others_and_the_run_resumes(digits_dir, tmp_path, cli):
    out = tmp_path / "run"  # far more epochs than the test waits for: the kill lands mid-run on any machine
    launcher = popen_cli(*_train(digits_dir, out, "mlp", "--epochs", "30", "--batches", "40", "--nproc", "2"),
                         start_new_session=True)  # a session of its own: cleared up at once if the test fails
    _wait_for_file(launcher, out / "state.safetensors")  # an epoch is saved
    os.kill(_workers(launcher.pid)[-1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # the other process did not wait for its collective's timeout
    assert launcher.returncode == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "died (killed by SIGKILL)" in stderr, stderr
    from digitlab.training.run_folder import read_state

    done = read_state(out, tensors=False)[0]["position"]["epoch"]
    assert 1 <= done < 30
    # on one process, even; one more epoch is enough to show the saved state carries on
    resumed = cli("train", "--resume", str(out), "--epochs", str(done + 1), "--data-dir", str(digits_dir))
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == done + 1 and len(history["batch_loss"]) == (done + 1) * 40


def test_the_launcher_names_the_failure_that_caused_the_others():
    """Exits recorded in one second: a killed process before the survivor that the agent's SIGTERM stopped
    (143), whatever their ranks; an error a process said before a crash; a lost peer last."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from digitlab.training.launch import _first_failure

    def exits(*codes: int, seconds=(0, 0)) -> dict:
        failures = {rank: ProcessFailure(rank, 1000 + rank, code, "/nonexistent") for rank, code in enumerate(codes)}
        for rank, failure in failures.items():
            failure.timestamp = 1_800_000_000 + seconds[rank]
        return failures

    assert _first_failure(exits(143, -signal.SIGKILL)) == (1, -signal.SIGKILL)
    assert _first_failure(exits(-signal.SIGKILL, 143)) == (0, -signal.SIGKILL)
    assert _first_failure(exits(143, 2)) == (1, 2)  # rank 1 said the error rank 0 was stopped before reaching
    assert _first_failure(exits(1, 2)) == (1, 2) and _first_failure(exits(3, 1)) == (1, 1)
    assert _first_failure(exits(3, 1, seconds=(0, 1))) == (0, 3)  # the earlier second first


def test_a_process_tells_a_dead_sibling_from_a_user_signal():
    """What the previous test relies on when the launcher's SIGTERM outruns the broken collective (a busy
    machine): this process stands in for the launcher, with two children as its two training processes."""
    ask = ("import os; os.environ['LOCAL_WORLD_SIZE'] = '2'; "
           "from digitlab.training.distributed import sibling_gone; print(sibling_gone())")
    def said() -> str:
        return subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True).stdout

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert said() == "False\n"
        sibling.kill()
        time.sleep(0.2)  # dead and not yet reaped (a zombie), then reaped
        assert said() == "True\n"
        sibling.wait()
        assert said() == "True\n"
    finally:
        sibling.kill()
        sibling.wait()


def test_ctrl_c_stops_every_process_after_the_same_step(digits_dir, tmp_path, cli):
    out = tmp_path / "run"  # far more epochs than the test waits for: the signal lands mid-run on any machine
    launcher = popen_cli(*_train(digits_dir, out, "mlp", "--epochs", "100", "--batches", "40", "--nproc", "2"),
                         start_new_session=True)
    _wait_for_file(launcher, out / "state.safetensors")  # epoch 0 is saved: epoch 1 is under way
    os.killpg(launcher.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the launcher and every worker
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("digitlab: interrupted (SIGINT): stopped after the last complete batch")
    assert lines[0].endswith(f"nothing scored; continue with --resume {out}") and not (out / "history.json").exists()
    from digitlab.training.run_folder import read_state

    position = read_state(out, tensors=False)[0]["position"]
    assert position["stopped"] == "SIGINT" and 1 <= position["epoch"] < 100
    # the epoch it stopped in, finished on one process: every step of it taken once
    epochs = position["epoch"] + 1
    resumed = cli("train", "--resume", str(out), "--epochs", str(epochs), "--data-dir", str(digits_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "history.json").read_text())["batch_loss"]) == epochs * 40


def _wait_for_file(process, path: Path, timeout: float = 120) -> None:
    """Until `path` exists; fails (stopping the process first) if the process ends or the time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL) if os.getpgid(process.pid) == process.pid else process.kill()
            _, stderr = process.communicate(timeout=60)
            raise AssertionError(f"no {path.name} within {timeout} s (exit code {process.returncode}): {stderr}")
        time.sleep(0.1)


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
