"""`digitlab sweep` for real: Optuna studies in SQLite, trials as run folders, FLOPs counted.

A sweep command runs in-process (`cli`) where its answer is the point; where two commands share
a study, one of them is a real process running beside it; signals and kills go to real processes."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from conftest import one_error_line, popen_cli, wait_for
from digitlab.config import TrainConfig
from digitlab.studies.sweep import training_flops

pytest.importorskip("optuna")

GRID = """
[fixed]
task = "classify"
optimizer = "adam"
epochs = 1
max_batches = 8
val_split = 400
[search]
model = ["mlp", "lenet5"]
lr = [0.001, 0.01]
"""


def _rows(out) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_pareto_front_keeps_what_nothing_beats():
    from digitlab.plots import pareto_front

    points = [(10, 0.05), (1, 0.2), (5, 0.1), (6, 0.12), (5, 0.3), (100, 0.05), (50, 0.01)]
    assert pareto_front(points) == [1, 2, 0, 6]  # cheapest first; (6, 0.12) and the rest are beaten
    assert pareto_front([]) == []


def test_flops_are_counted_not_estimated():
    # the chapter's mlp, 784-10-10-1, batch 64: forward 2*64*(7840+100+10) multiply-adds; backward the
    # weight gradients of all three layers and the input gradients of the last two (the images need none)
    assert training_flops(TrainConfig(model="mlp").resolved()) == 2 * 64 * (7840 * 2 + 100 * 3 + 10 * 3)
    with_rejects = training_flops(TrainConfig(model="mlp", task="classify", reject=True, batch_size=64).resolved())
    assert with_rejects > training_flops(TrainConfig(model="mlp", task="classify", batch_size=64).resolved())


def test_a_grid_sweep_runs_every_combination_once(digits_dir, tmp_path, cli):
    spec = tmp_path / "grid.toml"
    spec.write_text(GRID)
    out = tmp_path / "sweep"
    result = cli("sweep", str(spec), "--trials", "4", "--out", str(out), "--data-dir", str(digits_dir))
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    assert sorted((r["model"], float(r["lr"])) for r in rows) == [("lenet5", 0.001), ("lenet5", 0.01),
                                                                  ("mlp", 0.001), ("mlp", 0.01)]
    assert result.stdout.count("trial ") >= 4 and "best of 4 finished trials" in result.stdout
    for r in rows:
        config = TrainConfig(model=r["model"], task="classify", optimizer="adam", lr=float(r["lr"]), epochs=1,
                             max_batches=8, val_split=400).resolved()
        assert int(r["train_flops"]) == 8 * training_flops(config)  # 8 steps, each counted
        assert 0 < float(r["val_accuracy"]) <= 1 and 0 < float(r["test_accuracy"]) <= 1
        assert (out / "trials" / f"{int(r['trial']):04d}" / "history.json").is_file()
    lenet, mlp = (next(r for r in rows if r["model"] == m) for m in ("lenet5", "mlp"))
    assert int(lenet["params"]) > int(mlp["params"]) and int(lenet["train_flops"]) > 10 * int(mlp["train_flops"])
    from PIL import Image

    assert Image.open(out / "pareto.png").format == "PNG" and (out / "pareto.svg").is_file()
    told = cli("sweep", "--report", str(out))
    assert told.returncode == 0, told.stderr
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert f"4 finished trials of 4; best: trial {best['trial']} " in told.stdout
    assert "Pareto front" in told.stdout and "option importance" in told.stdout
    one_error_line(cli("sweep", "--report", str(tmp_path / "nowhere")), "no study in")
    one_error_line(cli("sweep"), "sweep needs a SPEC.toml")
    # a trial is an ordinary run folder
    evaluated = cli("evaluate", lenet["run"], "--json", "--data-dir", str(digits_dir))
    assert evaluated.returncode == 0, evaluated.stderr


def test_two_commands_join_one_sqlite_study(digits_dir, tmp_path, cli):
    spec = tmp_path / "grid.toml"
    spec.write_text(GRID)
    out = tmp_path / "shared"
    command = ["sweep", str(spec), "--trials", "2", "--out", str(out), "--data-dir", str(digits_dir)]
    out.mkdir()
    other = popen_cli(*command)  # one command in a process of its own, the other in this one, at once:
    wait_for(other, "data: ")  # it has its data and opens the study now, as this one does
    here = cli(*command)
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    assert here.returncode == 0, here.stderr
    rows = _rows(out)  # written by whichever finished last: the whole study
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    # the grid is shared out: each command sees the other's trials (Optuna may still give one point to
    # both when two trials start in the same instant, so one repeat is allowed)
    assert len({(r["model"], r["lr"]) for r in rows}) >= 3


@pytest.mark.parametrize("text, fragment", [
    ('[search]\nmodle = ["mlp"]', "[search] unknown option 'modle'"),
    ('[search]\nlr = { low = 0.1, high = 0.01 }', "[search] lr: low must be below high"),
    ('[search]\nlr = { low = 0, high = 0.1, log = true }', "lr: must be a number above 0"),
    ('[search]\nlr = { low = nan, high = 0.1 }', "[search] lr: must be a finite number, got nan"),
    ('[search]\nlr = { low = 0.001, high = inf }', "[search] lr: must be"),
    ('[search]\nseed = { low = 0, high = 5_000_000_000 }', "[search] seed: must be 4,294,967,295 or less"),
    ('[search]\nweight_decay = { low = -1.0, high = 0.1 }', "[search] weight_decay: must be 0 or more, got -1"),
    ('[search]\nmodel = { low = 1, high = 2 }', "a range needs a number option"),
    ('[search]\noptimizer = ["sgd", "rmsprop"]', "[search] optimizer: invalid choice: 'rmsprop'"),
    ('[search]\nmodel = []', "the list of choices is empty"),
    ('[fixed]\nepochs = 0\n[search]\nmodel = ["mlp"]', "[fixed] epochs: must be 1 or more"),
    ('[fixed]\nmodel = "mlp"\n[search]\nmodel = ["cnn"]', "model is in both [fixed] and [search]"),
    ('[serach]\nmodel = ["mlp"]', "unknown table [serach]"),
    ('[fixed]\nepochs = 1', "[search] is empty"),
    ("[search\n", "not valid TOML"),
])
def test_bad_specs_get_one_line_naming_the_key(tmp_path, text, fragment, cli):
    spec = tmp_path / "bad.toml"
    spec.write_text(text + "\n")
    one_error_line(cli("sweep", str(spec), "--out", str(tmp_path / "never")), fragment)
    assert not (tmp_path / "never").exists()


def test_a_grid_needs_lists(tmp_path, digits_dir, cli):
    spec = tmp_path / "range.toml"
    spec.write_text('[search]\nlr = { low = 0.001, high = 0.1, log = true }\n')
    result = cli("sweep", str(spec), "--sampler", "grid", "--out", str(tmp_path / "never"),
                 "--data-dir", str(digits_dir))
    assert result.returncode == 2 and "--sampler grid needs lists of choices; 'lr' is a range" in result.stderr
    assert not (tmp_path / "never").exists()
    spec.write_text('[search]\nmodel = ["mlp"]\n')
    result = cli("sweep", str(spec), "--storage", "nosuchdb://x", "--out", str(tmp_path / "never"),
                 "--data-dir", str(digits_dir))
    one_error_line(result, "cannot open the study at nosuchdb://x")
    assert not (tmp_path / "never").exists()


def test_ctrl_c_fails_the_running_trial_and_a_second_command_finishes_the_study(digits_dir, tmp_path, cli):
    import signal

    spec = tmp_path / "slow.toml"
    # the grid runs the mlp first (a fraction of a second), then the lenet5 (seconds): the signal,
    # sent as the first trial is reported, finds the second one training on any machine
    spec.write_text('[fixed]\ntask = "classify"\nepochs = 10\nmax_batches = 25\n[search]\nmodel = ["lenet5", "mlp"]\n')
    out = tmp_path / "sweep"
    command = ["sweep", str(spec), "--out", str(out), "--data-dir", str(digits_dir)]
    process = popen_cli(*command, "--trials", "2")
    wait_for(process, "trial 0:")  # the first trial is done: the second one is training
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "digitlab: interrupted (SIGINT)"
    assert "trial 1 stopped: queued to run again when the sweep goes on" in stdout
    assert [r["state"] for r in _rows(out)] == ["COMPLETE", "FAIL", "WAITING"]  # the table is written all the same
    again = cli(*command, "--trials", "1")
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    # the stopped grid point, run again (the signal may have come before trial 1 drew its model)
    assert rows[2]["retry_of"] == "1" and rows[2]["model"] != rows[0]["model"]
    assert rows[1]["model"] in ("", rows[2]["model"])


def test_a_killed_sweep_is_taken_for_dead_after_its_grace_and_retried(digits_dir, tmp_path, cli):
    import signal

    spec = tmp_path / "random.toml"
    spec.write_text('[fixed]\ntask = "classify"\nepochs = 10\nmax_batches = 25\n[search]\n'
                    'model = ["lenet5"]\nlr = { low = 0.0005, high = 0.05, log = true }\n')
    out = tmp_path / "sweep"
    command = ["sweep", str(spec), "--sampler", "random", "--grace", "2", "--out", str(out),
               "--data-dir", str(digits_dir)]
    process = popen_cli(*command, "--trials", "1")
    _wait_for_running(out, 1, process)
    # killed in its first epochs, once the study holds a heartbeat of it (the run has 9 epochs to go)
    _wait_until(lambda: _heartbeats(out) and (out / "trials" / "0000" / "state.safetensors").exists(), process,
                "a heartbeat and the trial's first epoch")
    process.send_signal(signal.SIGKILL)  # no chance to say goodbye: the trial stays RUNNING in the study
    process.communicate(timeout=60)
    time.sleep(3)  # past the grace period
    again = cli(*command, "--trials", "1")
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]
    assert rows[1]["retry_of"] == "0" and rows[1]["lr"] == rows[0]["lr"]  # the same drawn point, run again


def test_two_workers_share_the_trials_and_the_cores(digits_dir, tmp_path, cli):
    spec = tmp_path / "grid.toml"
    spec.write_text(GRID)
    out = tmp_path / "sweep"
    result = cli("sweep", str(spec), "--trials", "4", "--workers", "2", "--out", str(out),
                 "--data-dir", str(digits_dir))
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    assert result.stdout.count("data: ") == 2  # two worker processes, each loading the data once
    assert "best of 4 finished trials" in result.stdout


def test_random_draws_are_new_in_a_continued_study_and_in_each_worker(digits_dir, tmp_path, cli):
    spec = tmp_path / "random.toml"
    spec.write_text('[fixed]\ntask = "classify"\nmodel = "mlp"\nepochs = 1\nmax_batches = 2\nval_split = 400\n'
                    '[search]\nlr = { low = 0.0001, high = 0.1, log = true }\n')

    def lrs(out, *extra) -> list[str]:
        result = cli("sweep", str(spec), "--sampler", "random", "--out", str(out), "--data-dir", str(digits_dir),
                     *extra)
        assert result.returncode == 0, result.stderr
        return [r["lr"] for r in _rows(out)]

    first = lrs(tmp_path / "a", "--trials", "1")
    assert first == lrs(tmp_path / "b", "--trials", "1")  # a new study with the same --seed: the same draw
    continued = lrs(tmp_path / "a", "--trials", "1")
    assert continued[0] == first[0] and continued[1] != first[0]  # not the first command's draw again
    # more workers than cores would only share them, each with its own torch and data: capped, with a notice
    from digitlab.training.threads import usable_cores

    cores = usable_cores()
    capped = cli("sweep", str(spec), "--sampler", "random", "--out", str(tmp_path / "c"), "--data-dir",
                 str(digits_dir), "--trials", "2", "--workers", "256")
    assert capped.returncode == 0, capped.stderr
    if cores < 256:
        assert f"digitlab: --workers 256 is more than the {cores} cores here; using {cores}" in capped.stderr
    assert capped.stdout.count("data: ") == min(cores, 2)  # a worker per core, each loading the data once
    assert len({r["lr"] for r in _rows(tmp_path / "c")}) == 2  # each worker its own draws


def test_ctrl_c_reaches_every_worker_once(digits_dir, tmp_path):
    import signal

    spec = tmp_path / "slow.toml"
    spec.write_text('[fixed]\ntask = "classify"\nepochs = 30\nmax_batches = 25\n[search]\n'
                    'model = ["lenet5", "convnet_small"]\nlr = [0.001, 0.002]\n')
    out = tmp_path / "sweep"
    process = popen_cli("sweep", str(spec), "--trials", "4", "--workers", "2", "--out", str(out),
                        "--data-dir", str(digits_dir))
    _wait_for_running(out, 2, process)  # both workers are training a trial
    # the workers learn the storage URL from their environment: on the command line `ps` would show its password
    workers = [int(p) for t in Path(f"/proc/{process.pid}/task").iterdir()
               for p in (t / "children").read_text().split()]
    assert len(workers) == 2
    for pid in workers:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        assert b"--storage" not in argv and not any(b"study.db" in a for a in argv), argv
        assert environ[b"DIGITLAB_STORAGE"] == f"sqlite:///{(out / 'study.db').resolve()}".encode()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    states = [r["state"] for r in _rows(out)]
    assert "FAIL" in states and "RUNNING" not in states  # every worker stopped its trial, none was left behind


def _heartbeats(out) -> int:
    """How many trials of the study in OUT have a heartbeat recorded (Optuna's table in its database)."""
    import sqlite3

    try:
        with sqlite3.connect(out / "study.db", timeout=10) as db:
            return db.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_until(condition, process, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{what}: not within {timeout} s: {process.communicate()[1]}")
        time.sleep(0.05)


def _wait_for_running(out, count: int, process, timeout: float = 60) -> None:
    """Until `count` trials of the study in OUT are training."""
    import optuna

    deadline = time.monotonic() + timeout
    while True:
        try:
            running = optuna.load_study(study_name="digitlab", storage=f"sqlite:///{out / 'study.db'}").get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 -- not created yet
            running = []
        if len(running) == count:
            return
        assert time.monotonic() < deadline and process.poll() is None, "the trials did not start"
        time.sleep(0.2)


def test_two_machines_join_one_study_through_postgresql(digits_dir, tmp_path, postgres_url, cli):
    import optuna

    spec = tmp_path / "grid.toml"
    spec.write_text(GRID)
    machines = [tmp_path / "machine-a", tmp_path / "machine-b"]  # each its own OUT, one database between them
    commands = [["sweep", str(spec), "--trials", "2", "--storage", postgres_url, "--study", "grid", "--out", str(out),
                 "--data-dir", str(digits_dir)] for out in machines]
    other = popen_cli(*commands[1])  # machine b in a process of its own, machine a in this one, at once
    wait_for(other, "data: ")
    here = cli(*commands[0])
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    assert here.returncode == 0, here.stderr
    trials = optuna.load_study(study_name="grid", storage=postgres_url).trials
    assert len(trials) == 4 and {t.state.name for t in trials} == {"COMPLETE"}
    assert len({(t.params["model"], t.params["lr"]) for t in trials}) >= 3  # shared out, as with SQLite
    ran = {out: sorted(int(p.name) for p in (out / "trials").iterdir()) for out in machines}
    assert sorted(ran[machines[0]] + ran[machines[1]]) == [0, 1, 2, 3]  # each machine ran its own two
    assert all(len(numbers) == 2 for numbers in ran.values())
    last = max(machines, key=lambda out: (out / "trials.csv").stat().st_mtime)
    assert len(_rows(last)) == 4  # the whole study's table, wherever it is written
    told = cli("sweep", "--report", str(tmp_path), "--storage", postgres_url, "--study", "grid")
    assert told.returncode == 0 and "4 finished trials of 4" in told.stdout, told.stderr
    wrong = cli("sweep", str(spec), "--storage", postgres_url.rsplit("/", 1)[0] + "/nosuchdb",
                "--out", str(tmp_path / "never"), "--data-dir", str(digits_dir))
    one_error_line(wrong, "cannot open the study at postgresql+psycopg://")
    assert not (tmp_path / "never").exists()
