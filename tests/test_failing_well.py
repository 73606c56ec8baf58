"""Issue 19, "Nothing breaks, round two": odd file names in predict's table, a predict that read
nothing, one unwritable 28x28 among many, the words of evaluate's and calibration's messages,
matplotlib under an unwritable HOME, what a killed export leaves, and a huge value in a config file."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, one_error_line, run_cli
from digitlab.errors import UserError


def _pictures(digits, folder: Path, names: list[str]) -> list[Path]:
    """Real MNIST test digits as dark ink on a white page, one per name."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        page = np.full((100, 100), 255, np.uint8)
        ink = Image.fromarray(255 - digits.test_images[i * 97].numpy()).resize((56, 56))
        page[20:76, 20:76] = np.asarray(ink)
        Image.fromarray(page).save(folder / name)
        paths.append(folder / name)
    return paths


def _table_rows(stdout: str) -> list[str]:
    """The file column of predict's table, its header left out."""
    return [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│")]


def test_odd_file_names_are_escaped_in_the_table_and_real_in_json(digits_model, digits, tmp_path, cli):
    names = ["two\nlines.png", "evil\u202egnp.png", "[red]x.png", "[nosuchstyle]y.png"]
    _pictures(digits, tmp_path, names)
    result = cli("predict", str(digits_model), ".", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    # A newline or a right-to-left override is shown escaped, as in the error lines; brackets are not markup.
    assert sorted(_table_rows(result.stdout)) == sorted(["two\\nlines.png", "evil\\u202egnp.png", "[red]x.png",
                                                             "[nosuchstyle]y.png"]), result.stdout
    assert "\u202e" not in result.stdout and "two\nlines" not in result.stdout
    answers = json.loads(cli("predict", str(digits_model), ".", "--json", cwd=tmp_path).stdout)
    assert sorted(a["file"] for a in answers) == sorted(names)  # JSON keeps the real names (it escapes itself)


def test_no_table_when_no_picture_was_read(digits_model, digits, tmp_path, cli):
    (tmp_path / "notes.txt").write_text("a shopping list, not a picture")
    result = cli("predict", str(digits_model), str(tmp_path / "notes.txt"))
    one_error_line(result, "notes.txt: not an image")
    assert result.stdout.splitlines() == [result.stdout.splitlines()[0]]  # the checkpoint line, no empty table
    assert result.stdout.startswith("checkpoint: ")
    # --json still answers with its list, the error in it
    answers = json.loads(cli("predict", str(digits_model), str(tmp_path / "notes.txt"), "--json").stdout)
    assert answers == [{"file": str(tmp_path / "notes.txt"), "error": answers[0]["error"]}]
    # Some read, some not: a table of what was read, one line for each of the others, and exit 2.
    _pictures(digits, tmp_path, ["good.png"])
    mixed = cli("predict", str(digits_model), "good.png", "notes.txt", cwd=tmp_path)
    one_error_line(mixed, "notes.txt: not an image")
    assert _table_rows(mixed.stdout) == ["good.png"]


def test_save_preprocessed_one_bad_name_costs_only_its_own_picture(digits_model, digits, tmp_path, cli):
    long = "L" * 247 + ".png"  # 251 characters: with .28x28.png, over a file system's 255 bytes
    _pictures(digits, tmp_path / "in", ["a.png", "b.png", "c.png", "d.png", "e.png", long])
    seen = tmp_path / "seen"
    result = cli("predict", str(digits_model), "in", "--save-preprocessed", str(seen), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(_table_rows(result.stdout)) == 6
    cut, *saved = sorted(p.name for p in seen.iterdir())  # "L..." sorts first
    assert saved == [f"{c}.png.28x28.png" for c in "abcde"]
    # the long one, cut to fit, with a hash of the whole name at its end
    assert cut.startswith("L" * 200) and cut.endswith(".28x28.png") and len(os.fsencode(cut)) <= 255
    assert Image.open(seen / cut).size == (28, 28)
    # A name that cannot be written (a folder is in its way): that picture alone is not saved, its
    # reading is still shown, one line says why, and the exit code says something failed.
    blocked = tmp_path / "blocked"
    (blocked / "c.png.28x28.png").mkdir(parents=True)
    result = cli("predict", str(digits_model), "in", "--save-preprocessed", str(blocked), cwd=tmp_path)
    one_error_line(result, "c.png.28x28.png", "folder")
    assert len(_table_rows(result.stdout)) == 6
    assert len([p for p in blocked.iterdir() if p.is_file()]) == 5
    assert not [p for p in blocked.iterdir() if p.name.endswith(".part")]
    # A --save-preprocessed that is no folder at all: one line naming the option, the readings still shown
    result = cli("predict", str(digits_model), "in/a.png", "--save-preprocessed", "in/b.png", cwd=tmp_path)
    one_error_line(result, "--save-preprocessed")
    assert _table_rows(result.stdout) == ["in/a.png"]


def test_evaluating_offline_names_the_data_it_scores_and_the_data_the_model_saw(digits_model):
    from digitlab.checkpoint import read_checkpoint
    from digitlab.data import load_sample
    from digitlab.evaluate import data_note

    _, meta = read_checkpoint(digits_model)
    full = replace(meta, data={"source": "../shared/data/mnist", "sample": False, "fingerprint": "full set"})
    with pytest.raises(UserError) as refused:
        data_note(full, load_sample())  # the offline sample: what evaluate scores on without --data-dir
    words = str(refused.value)
    assert "no --data-dir" in words and "would use the offline sample's 5,000 digits" in words
    assert "training images of ../shared/data/mnist, the data this model was trained on" in words
    assert "which holds the offline sample" not in words and "\n" not in words
    assert "not a test score" in data_note(full, load_sample(), allow_overlap=True)


def test_a_temperature_that_makes_the_test_ece_worse_says_so(digits_model, digits_dir, tmp_path, cli):
    from digitlab.evaluate import ece_change

    assert ece_change(0.0018, 0.0030) == ("0.18% before, 0.30% after (worse: the temperature fitted on the "
                                          "validation split does not carry over to the test set)")
    assert ece_change(0.0030, 0.0018) == "0.30% before, 0.18% after"
    assert ece_change(0.00181, 0.00183) == "0.18% before, 0.18% after"  # the same, as shown
    # evaluate says it too, of the shared model's own figures
    result = cli("evaluate", str(digits_model), "--data-dir", str(digits_dir), "--out", str(tmp_path / "figures"),
                 "--worst", "0")
    assert result.returncode == 0, result.stderr
    line, = [line for line in result.stdout.splitlines() if line.startswith("confidence: temperature ")]
    before, after = map(float, re.search(r"error ([\d.]+)% before, ([\d.]+)% after", line).groups())
    assert ("(worse: " in line) == (after > before), line


def test_an_unwritable_home_brings_no_matplotlib_warning(tmp_path):
    # HOME under /proc: nothing can be made there, even by root (a read-only folder would not stop root)
    env = {"HOME": "/proc/self", "XDG_CONFIG_HOME": "", "XDG_CACHE_HOME": "", "MPLCONFIGDIR": "",
           "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    with pytest.raises(OSError):  # what matplotlib tries first, and what makes it complain on stderr
        Path("/proc/self/.config/matplotlib").mkdir(parents=True, exist_ok=True)
    result = run_cli("plot", "sigmoid", "--out", tmp_path / "sigmoid", env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert Image.open(tmp_path / "sigmoid.png").format == "PNG"
    assert not any((tmp_path / "tmp").iterdir())  # the temporary matplotlib folder went at exit


def test_export_sweeps_what_a_killed_export_left(digits_model, tmp_path, cli):
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    # A real process writes `out` as every digitlab write does (files.atomic_path), and is killed meanwhile.
    script = ("import sys, time\nfrom digitlab.files import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    print(tmp.name, flush=True)\n    time.sleep(120)")
    writer = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        left = tmp_path / writer.stdout.readline().strip()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert left.is_file() and left.name.startswith(f".model.onnx.{writer.pid}-") and left.name.endswith(".part")
    others = [tmp_path / "notes.txt",  # an unrelated file
              tmp_path / f".other.onnx.{writer.pid}-0123abcd.part",  # another target's
              tmp_path / f".model.onnx.{os.getpid()}-0123abcd.part"]  # a live writer's (this process)
    for path in others:
        path.write_text("keep me")
    result = cli("export", str(digits_model), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and not left.exists()
    assert all(path.read_text() == "keep me" for path in others)


def test_a_huge_string_in_a_config_file_is_one_short_line(tmp_path, cli):
    huge = tmp_path / "huge.toml"
    huge.write_text(f'model = "{"x" * 20_000_000}"\n')
    line = one_error_line(cli("train", "--config", str(huge), "--out", str(tmp_path / "run")), "huge.toml", "MB")
    assert len(line) < 300 and not (tmp_path / "run").exists()


def test_a_long_wrong_value_under_the_size_limit_is_one_short_line(tmp_path, cli):
    long = tmp_path / "long.toml"
    long.write_text(f'model = "{"y" * 900_000}"\n')
    line = one_error_line(cli("train", "--config", str(long), "--out", str(tmp_path / "run")), "model")
    assert len(line) < 300
