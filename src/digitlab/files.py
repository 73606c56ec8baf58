"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from digitlab.errors import UserError

PART_SUFFIX = ".part"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name stays within a file system's 255 bytes whenever `path`'s own name does."""
    path = Path(path)
    # .NAME.PID-RANDOM.part: the writer's process id lets sweep_parts tell a killed writer's file from a live one's
    tmp = path.with_name(f"{_part_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}{PART_SUFFIX}")
    # Created as open() creates files (0666 less the umask), so the finished file gets the usual mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _part_prefix(path: Path) -> str:
    """How the temporary files of `path` begin: `.NAME.`, or `..` alone for a name over 200 bytes (the
    temporary name must stay within a file system's 255)."""
    return f".{path.name if len(os.fsencode(path.name)) <= 200 else ''}."


def sweep_parts(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `path` (atomic_path's) whose writer is gone: a `kill -9` leaves them.
    A live writer's file, this process's own and any other file stay. Returns what was removed."""
    path = Path(path)
    prefix = _part_prefix(path)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:  # no folder yet, or one that cannot be read: nothing to sweep, and the write will say why
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(PART_SUFFIX)):
            continue
        writer = re.fullmatch(r"(\d+)-[0-9a-f]{8}", name[len(prefix):-len(PART_SUFFIX)])  # PID-RANDOM
        if writer and not _alive(int(writer[1])):
            with contextlib.suppress(OSError):
                (path.parent / name).unlink()
                removed.append(path.parent / name)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine); where that cannot be told, as if it did."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def reason(error: OSError) -> str:
    """An OS error in a few lower-case words: 'no space left on device'."""
    return (error.strerror or str(error) or type(error).__name__).lower()


def one_line(text: str) -> str:
    """`text` with control characters (a newline in a file name, say) shown escaped, as repr() would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path`, if it is a regular file: a pipe or a device would hang the reader. Else one UserError."""
    path = Path(path)
    if not path.is_file():
        problem = ("is a folder; give a file" if path.is_dir() else
                   "is not a regular file (a pipe or a device?)" if path.exists() else "does not exist")
        raise UserError(f"{what} '{one_line(str(path))}' {problem}")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` through `write(temporary_path)`, atomically.

    A full disk, a read-only folder or any other OS error becomes one UserError line that
    names the file; the temporary file is removed, so nothing is left half-written.
    """
    path = file_target(path)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        advice = "free some space or choose another folder" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (
            "choose another folder or file name")
        raise UserError(f"cannot write '{one_line(str(path))}': {reason(e)}; {advice}") from None
    return path


def file_target(path: str | os.PathLike) -> Path:
    """`path`, if a file may be written there: it names a file, and nothing but a regular file (or a
    link) is there. A device, a pipe, a socket or a folder is never replaced; else one UserError."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UserError(f"cannot write '{one_line(str(path))}': it names a folder; give a file name")
    if os.path.lexists(path) and not os.path.islink(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        kind = "a folder" if path.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise UserError(f"cannot write '{one_line(str(path))}': it is {kind}, which digitlab does not replace; "
                        "give the path of a file")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> Path:
    """safetensors' save_file, atomically; its Rust I/O errors become OSErrors (and so one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            code = errno.ENOSPC if "os error 28" in str(e) else errno.EIO
            raise OSError(code, os.strerror(code)) from None

    return write_atomic(path, write)


def prepare_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts. `option` is the
    command's option that names the folder, for the error line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.").close()  # closing removes it
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot write to output folder '{one_line(str(path))}': {reason}; pick another with "
                        f"{option}") from None
    return path


class Output:
    """The command's standard output, as the entry point installs it (`sys.stdout = Output(sys.stdout)`).

    A closed pipe (`digitlab train ... | head`) is not an error of the command: once the reader has
    gone, what is written goes to /dev/null and the command goes on, so a run is kept. A full disk
    or any other failed write is one UserError line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        with self._guarded():
            return self._stream.write(text)
        return len(text)  # the reader has gone

    def flush(self) -> None:
        with self._guarded():
            self._stream.flush()

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # C libraries' writes too
            os.close(devnull)
        except OSError as e:
            raise UserError(f"cannot write the output: {reason(e)}; send it to a file on a disk with space "
                            "(or a pipe)") from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
