"""What the README and docs/ say is what runs.

- Every `digitlab` command in README.md and docs/*.md (docs/NOTES.md aside) parses with the
  real CLI parser: the ones in code blocks (`digitlab ...`, `.venv/bin/digitlab ...`,
  `python -m digitlab ...`, `torchrun ... -m digitlab ...`) and the ones quoted inline.
- The README's five-minute tour (the code block after its `<!-- tour` marker) runs as it
  stands, in order, through the real CLI in-process, on the 5,000 real digits of the
  `digits_dir` fixture, and every file its comments name appears.
- What the pages name from Python (imports in ```python blocks, `digitlab.x.y` paths) exists,
  and every relative link and picture leads to a file, and to a heading there.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "NOTES.md")]
TOUR_MARKER = "<!-- tour"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Block:
    page: Path
    line: int  # where the block's first line is (1-based)
    lang: str
    lines: list[str]


@dataclass
class Command:
    where: str  # page:line
    text: str  # as written, continuations joined
    args: list[str]  # what follows `digitlab`
    inline: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page."""
    found, current, fence = [], None, None
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        m = FENCE.match(line)
        if current is None:
            if m:
                fence, current = m.group(1), Block(page, number + 1, m.group(2), [])
        elif m and m.group(1).startswith(fence) and not line.strip()[len(m.group(1)):].strip():
            found.append(current)
            current = None
        else:
            current.lines.append(line)
    assert current is None, f"{page.name}:{current.line - 1}: a code block that never closes"
    return found


def prose(page: Path) -> list[tuple[int, str]]:
    """The lines of a page outside its fenced code blocks, with their numbers."""
    inside, fence, out = False, None, []
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        m = FENCE.match(line)
        if not inside and m:
            inside, fence = True, m.group(1)
        elif inside and m and m.group(1).startswith(fence):
            inside = False
        elif not inside:
            out.append((number, line))
    return out


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """A shell block's lines with `\\` continuations joined, each with the number of its first line."""
    out, pending, start = [], "", None
    for offset, line in enumerate(block.lines):
        if start is None:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def digitlab_args(line: str) -> list[str] | None:
    """What a shell line passes to digitlab, or None if the line does not run digitlab."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # not shell (a table, some TOML)
        return None
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):  # VAR=value digitlab ...
        tokens = tokens[1:]
    if not tokens:
        return None
    program = Path(tokens[0]).name
    if program == "digitlab":
        return tokens[1:]
    if program.startswith(("python", "torchrun")):
        for i in range(1, len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "digitlab":
                return tokens[i + 2:]
    return None


def block_commands(block: Block) -> list[Command]:
    found = []
    for number, text in logical_lines(block):
        args = digitlab_args(text)
        if args is not None:
            found.append(Command(f"{block.page.name}:{number}", " ".join(text.split()), args))
    return found


def inline_commands(page: Path) -> list[Command]:
    found = []
    for number, line in prose(page):
        for span in re.findall(r"`(digitlab [^`]+)`", line):
            found.append(Command(f"{page.name}:{number}", span, shlex.split(span)[1:], inline=True))
    return found


def all_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang in ("", "sh", "bash", "shell", "console"):
                commands += block_commands(block)
        commands += inline_commands(page)
    return commands


COMMANDS = all_commands()


def _command_names(parser) -> set[str]:
    import argparse

    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def test_the_pages_hold_commands():
    """The extraction finds the README's own commands: a guard against a parser that finds nothing."""
    readme = [c for c in COMMANDS if c.where.startswith("README.md:") and not c.inline]
    assert len(readme) >= 7, [str(c) for c in readme]
    assert any(c.args[:1] == ["train"] for c in readme)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {' '.join(c.args)[:70]}" for c in COMMANDS])
def test_command_parses(command, capsys):
    from digitlab.cli import build_parser

    parser = build_parser()
    if command.inline and len(command.args) == 1 and not command.args[0].startswith("-"):
        # prose that names a command (`digitlab serve`): the command must exist
        assert command.args[0] in _command_names(parser), f"{command}: no such command"
        return
    try:
        parser.parse_args(command.args)
    except SystemExit as e:  # --help and --version exit 0; an error exits 2
        assert e.code == 0, f"{command}\ndoes not parse: {capsys.readouterr().err.strip()}"


def test_commands_are_in_fenced_blocks():
    """An indented code block is not checked by these tests, so the pages keep commands in fences."""
    for page in PAGES:
        for number, line in prose(page):
            if re.match(r"( {4,}|\t)(\S+/)?digitlab ", line):
                pytest.fail(f"{page.name}:{number}: a command in an indented block; put it in a ```sh block")


# ---------------------------------------------------------------------------- the tour

@dataclass
class Step:
    command: Command
    comment: str

    @property
    def files(self) -> list[str]:
        """The files and folders the comment says this step makes: runs/... paths and file names."""
        names = re.findall(r"(?<![\w/.:-])(runs/[\w./-]*|[\w-]+\.(?:onnx|png|svg|md|json|csv|toml|safetensors))",
                           self.comment)
        return [name.rstrip(".,:;") for name in names]


def tour() -> list[Step]:
    """The commands of the block after the README's tour marker, in order."""
    text = README.read_text(encoding="utf-8")
    assert TOUR_MARKER in text, f"README.md has no '{TOUR_MARKER}' marker before the tour's code block"
    marker_line = text[:text.index(TOUR_MARKER)].count("\n") + 1
    block = next((b for b in blocks(README) if b.line > marker_line), None)
    assert block is not None and block.line <= marker_line + 3, "the tour's code block must follow its marker"
    steps = []
    for number, line in logical_lines(block):
        if not line.strip():
            continue
        args = digitlab_args(line)
        assert args, f"README.md:{number}: the tour runs digitlab commands only, found: {line.strip()}"
        comment = line.split(" #", 1)[1] if " #" in line else ""
        steps.append(Step(Command(f"README.md:{number}", " ".join(line.split()), args), comment))
    return steps


@pytest.fixture
def signal_handlers():
    """The CLI installs its own SIGINT and SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_five_minute_tour(digits_dir, tmp_path, monkeypatch, capsys, signal_handlers):
    """The README's tour, as written, in order, in an empty folder, on the 5,000 digits every
    machine has. serve blocks until Ctrl-C: it is only parsed here (test_serve starts a real one)."""
    from digitlab.cli import build_parser, main

    steps = tour()
    names = [s.command.args[0] for s in steps]
    for expected in ("summary", "compare", "train", "evaluate", "predict", "export", "serve"):
        assert expected in names, f"the tour has no `digitlab {expected}`"
    import shutil

    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")  # the pictures the tour reads
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIGITLAB_DATA_DIR", str(digits_dir))
    left_out = []
    for step in steps:
        args = step.command.args
        if args[0] == "serve":
            build_parser().parse_args(args)
            continue
        if args[0] == "export" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
            left_out.append(f"`{step.command.text}` (the onnx extra is not installed: pip install -e '.[onnx]')")
            continue
        if args[0] == "predict":  # the pictures it names ship with digitlab: the line runs as written
            for name in args[2:]:
                assert Path(name).suffix.lower() not in IMAGE_SUFFIXES or Path(name).is_file(), \
                    f"{step.command}: {name} is not in the repository"
        code = main(list(args))
        out = capsys.readouterr()
        assert code == 0, (f"{step.command} exited with {code}\n--- stdout\n{out.out[-3000:]}\n"
                           f"--- stderr\n{out.err[-3000:]}")
        for name in step.files:
            assert (tmp_path / name).exists(), f"{step.command}: its comment names {name}, which is not there"
    if left_out:
        pytest.skip("the tour ran, except " + "; ".join(left_out))


# ---------------------------------------------------------------------------- names and links

def _resolves(dotted: str) -> bool:
    """A module, or a module's attribute: digitlab.reading.segment, or digitlab.reading.segment.preprocess."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def python_names() -> list[tuple[str, str]]:
    """(where, dotted name) for each digitlab name the pages use from Python."""
    names = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang != "python":
                continue
            for node in ast.walk(ast.parse("\n".join(block.lines))):
                where = f"{page.name}:{block.line + getattr(node, 'lineno', 1) - 1}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "digitlab":
                    names += [(where, f"{node.module}.{alias.name}") for alias in node.names]
                elif isinstance(node, ast.Import):
                    names += [(where, a.name) for a in node.names if a.name.split(".")[0] == "digitlab"]
        for number, line in prose(page):
            names += [(f"{page.name}:{number}", m) for m in re.findall(r"`(digitlab(?:\.\w+)+)`", line)]
    return names


@pytest.mark.parametrize("where,name", python_names(), ids=[f"{w} {n}" for w, n in python_names()])
def test_python_name_exists(where, name):
    assert _resolves(name), f"{where}: {name} does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def links() -> list[tuple[str, Path, str]]:
    found = []
    for page in PAGES:
        for number, line in prose(page):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if not re.match(r"[a-z]+:", target):
                    found.append((f"{page.name}:{number}", page, target))
    return found


@pytest.mark.parametrize("where,page,target", links(), ids=[f"{w} {t}" for w, _, t in links()])
def test_link_leads_somewhere(where, page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{where}: {target}: no file {file.relative_to(ROOT) if ROOT in file.parents else file}"
    if anchor:
        headings = [slug(line.lstrip("#")) for _, line in prose(file) if re.match(r"#{1,6} ", line)]
        assert anchor in headings, f"{where}: {target}: no such heading in {file.name}"
