"""`digitlab sweep` when something goes wrong (issue 19, round two): a diverging trial is a result, a
database that never answers is one line (and Ctrl-C during the wait is 130), a grid or a list too big
is refused before it costs memory, and a storage URL is never shown with its password."""
from __future__ import annotations

import csv
import signal
import socket
import threading
import time
import tracemalloc

import pytest

from conftest import one_error_line, popen_cli

pytest.importorskip("optuna")

# the chapter's regression cnn on plain SGD: lr 5 diverges in the first batches, 0.001 trains
DIVERGING = """
[fixed]
model = "cnn"
epochs = 1
max_batches = 4
val_split = 400
[search]
lr = {lrs}
"""


def _rows(out) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_sweep_goes_on(digits_dir, tmp_path, cli):
    spec = tmp_path / "lr.toml"
    spec.write_text(DIVERGING.format(lrs="[5.0, 0.001]"))
    out = tmp_path / "sweep"
    result = cli("sweep", spec, "--trials", "2", "--out", out, "--data-dir", digits_dir)
    assert result.returncode == 0, result.stderr
    rows = {r["lr"]: r for r in _rows(out)}
    assert rows["5.0"]["state"] == "PRUNED" and rows["5.0"]["error"].startswith("diverged at epoch 0, batch ")
    assert "try a lower --lr" in rows["5.0"]["error"]
    assert rows["0.001"]["state"] == "COMPLETE" and rows["0.001"]["error"] == ""
    assert "pruned: diverged at epoch 0" in result.stdout and "best of 1 finished trials" in result.stdout
    told = cli("sweep", "--report", out)
    assert told.returncode == 0 and "1 finished trials of 2" in told.stdout, told.stderr
    # every trial diverges: the command says so in one line, and the table is there all the same
    spec.write_text(DIVERGING.format(lrs="[5.0]"))
    out = tmp_path / "all-diverge"
    line = one_error_line(cli("sweep", spec, "--trials", "1", "--out", out, "--data-dir", digits_dir),
                          "no trial of the study finished: 1 of 1 pruned or failed; trial 0: diverged at epoch 0",
                          "trials.csv")
    assert line.startswith("digitlab: error: ")
    assert [r["state"] for r in _rows(out)] == ["PRUNED"]


def test_a_grid_or_a_list_too_big_is_refused_before_it_costs_memory(tmp_path, cli):
    spec = tmp_path / "huge.toml"  # 3 lists, 10 KB, 10^8 points: GridSampler's product went past 5 GB
    spec.write_text(f"[search]\nseed = {list(range(500))}\nbatch_size = {list(range(1, 501))}\n"
                    f"epochs = {list(range(1, 401))}\n")
    assert spec.stat().st_size < 10_000
    tracemalloc.start()
    try:
        result = cli("sweep", spec, "--out", tmp_path / "never")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_error_line(result, "the grid has 100,000,000 points (500 seed x 500 batch_size x 400 epochs)",
                   "at most 100,000", "--sampler random or tpe")
    assert peak < 50e6, peak  # it never built the grid
    spec.write_text(f"[search]\nseed = {list(range(20_000))}\n")  # 140 KB: under the 1 MB of a file
    one_error_line(cli("sweep", spec, "--out", tmp_path / "never"),
                   "[search] seed: 20,000 choices; a list holds at most 10,000", "range")
    spec.write_text(f"[search]\nseed = {list(range(200_000))}\n")  # 1.5 MB: refused unread
    one_error_line(cli("sweep", spec, "--out", tmp_path / "never"), "the sweep spec is 1.5 MB; one is at most 1 MB")
    assert not (tmp_path / "never").exists()


def _silent_server():
    """A TCP port that accepts connections and never answers, as a database server behind a firewall
    that drops its replies: (the listening socket, its port, the accepted connections)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed by the test
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1], accepted


def test_a_database_that_never_answers_is_one_line_and_ctrl_c_ends_the_wait(digits_dir, tmp_path, cli):
    pytest.importorskip("psycopg")
    spec = tmp_path / "spec.toml"
    spec.write_text('[fixed]\nepochs = 1\nmax_batches = 2\n[search]\nmodel = ["mlp"]\n')
    server, port, accepted = _silent_server()
    url = f"postgresql+psycopg://digitlab:s3cret@127.0.0.1:{port}/sweeps"
    try:
        started = time.monotonic()
        result = cli("sweep", spec, "--storage", url, "--out", tmp_path / "never", "--data-dir", digits_dir,
                     env={"DIGITLAB_CONNECT_TIMEOUT": "2"})
        line = one_error_line(result, f"cannot open the study at postgresql+psycopg://digitlab:***@127.0.0.1:{port}/"
                                      "sweeps: no answer within 2 s", "DIGITLAB_CONNECT_TIMEOUT")
        assert "s3cret" not in line and time.monotonic() - started < 30 and accepted
        assert not (tmp_path / "never").exists()
        one_error_line(cli("sweep", spec, "--storage", url, env={"DIGITLAB_CONNECT_TIMEOUT": "soon"}),
                       "DIGITLAB_CONNECT_TIMEOUT=soon: must be a whole number of seconds")
        # a real process, waiting on the server (a minute, by its timeout): Ctrl-C ends it at once
        waiting = len(accepted)
        process = popen_cli("sweep", spec, "--storage", url, "--out", tmp_path / "never", "--data-dir", digits_dir,
                            env={"DIGITLAB_CONNECT_TIMEOUT": "60"})
        deadline = time.monotonic() + 120
        while len(accepted) == waiting:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # waiting for the server's answer now
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert stderr.strip().splitlines() == ["digitlab: interrupted (SIGINT)"]
        assert time.monotonic() - stopped < 10
        assert not (tmp_path / "never").exists()
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def test_storage_urls_are_shown_without_their_password(digits_dir, tmp_path, postgres_url, cli):
    spec = tmp_path / "spec.toml"
    spec.write_text('[fixed]\nepochs = 1\nmax_batches = 2\n[search]\nmodel = ["mlp"]\n')
    # the test server trusts any password: the URL works, and no message may show it
    with_password = postgres_url.replace("://digitlab@", "://digitlab:s3cret@")
    wrong_db = with_password.rsplit("/", 1)[0] + "/nosuchdb"
    line = one_error_line(cli("sweep", spec, "--storage", wrong_db, "--out", tmp_path / "never",
                              "--data-dir", digits_dir),
                          "cannot open the study at postgresql+psycopg://digitlab:***@127.0.0.1:", "nosuchdb")
    assert "s3cret" not in line and not (tmp_path / "never").exists()
    line = one_error_line(cli("sweep", "--report", tmp_path, "--storage", with_password, "--study", "nosuchstudy"),
                          "cannot read study 'nosuchstudy' at postgresql+psycopg://digitlab:***@127.0.0.1:")
    assert "s3cret" not in line
    for url in ("nosuchdb://user:s3cret@host/db", "postgresql+psycopg://user:s3c@ret@host/db"):  # no such driver;
        result = cli("sweep", spec, "--storage", url, "--out", tmp_path / "never",  # an '@' not %-encoded
                     "--data-dir", digits_dir)
        assert result.returncode == 2 and "s3c" not in result.stderr and ":***@" in result.stderr, result.stderr
