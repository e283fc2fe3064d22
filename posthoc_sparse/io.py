"""Crash-safe writes: every file is written under a temporary name and renamed into place; a folder is built
under a temporary name and swapped in by renames, and what a crash leaves between two renames is resolved by
``recover_dir``.

What is in flight beside a final name ``X`` (T pairs the names of one swap):

* ``.X.tmp-*``: a file being written (``atomic_write_bytes``); incomplete, removed by ``clean_stale``;
* ``.X.new-T``: a folder being built (``staging_dir``); incomplete, removed;
* ``.X.ready-T``: that folder, complete (the commit point of ``replace_dir``); a later ``recover_dir`` finishes
  the swap, so the newest complete folder wins wherever a crash stopped it;
* ``.X.old-T``: the folder it replaces, on its way out; removed.

``fault_point`` is the hook of the fault-injection tests (tests/test_faults.py): it is called before every
write and rename here, and can kill the process there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

FAULT_ENV = "POSTHOC_SPARSE_FAULT"
_faults = {"count": 0}  # fault points passed in this process (the test hook's only state)
_IN_FLIGHT = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|ready|old)-(?P<token>[^./]+)$")
_PROBE = ".write-test-"


def fault_point(site: str, path: Path | str | None = None) -> None:
    """The fault-injection hook, called before each write and rename. Does nothing unless the environment
    variable POSTHOC_SPARSE_FAULT is set, to ``log:FILE`` (append "N<TAB>site name" for each point), or to
    ``kill:N``, ``int:N``, ``term:N``, ``pause:N:FILE`` or ``errno:N:NAME``: at the N-th point of this process send
    itself SIGKILL, SIGINT (as Ctrl-C does) or SIGTERM (as a scheduler does), write its pid to FILE and wait to be
    killed, or fail as the system would with the error NAME (ENOSPC, EFBIG, EROFS, EACCES; N counts the writes and
    renames only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or (spec.startswith("errno:") and path is None):  # an errno needs a file: writes and renames only
        return
    _faults["count"] += 1
    n = _faults["count"]
    mode, _, arg = spec.partition(":")
    if mode == "log":
        with open(arg, "a") as f:
            f.write(f"{n}\t{site}{' ' + Path(path).name if path is not None else ''}\n")
        return
    target, _, marker = arg.partition(":")
    if int(target) != n:
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode in ("int", "term"):
        os.kill(os.getpid(), signal.SIGINT if mode == "int" else signal.SIGTERM)
    elif mode == "pause":
        Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
    elif mode == "errno":
        code = getattr(errno, marker)
        raise OSError(code, os.strerror(code), str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path: Path) -> None:
    """``mkdir -p path``; a UserError naming the folder when that is refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); choose another --output") from None


def check_writable(folder: Path) -> None:
    """Fail now, not after hours of work: a file can be created in ``folder`` (which must exist)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder} ({e.strerror}); choose another --output") from None


def staging_dir(path: Path) -> Path:
    """A new empty folder ``.X.new-T`` beside ``path`` (X its name), to build the next ``path`` in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.new-{os.getpid()}{secrets.token_hex(3)}"
    tmp.mkdir()
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete folder ``new`` (from ``staging_dir``) at ``path``: rename it ``.X.ready-T`` (the commit
    point), move an existing ``path`` to ``.X.old-T``, rename the ready folder to ``path``, remove the old one.
    A crash after the commit point is finished by ``recover_dir``; one before it leaves ``path`` as it was."""
    token = _IN_FLIGHT.match(new.name)["token"]
    ready, old = path.parent / f".{path.name}.ready-{token}", path.parent / f".{path.name}.old-{token}"
    fault_point("commit", path)
    new.rename(ready)
    if path.exists():
        fault_point("move-away", path)
        path.rename(old)
    fault_point("rename-in", path)
    ready.rename(path)
    if old.exists():
        fault_point("remove-old", path)
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> str | None:
    """Finish a ``replace_dir`` that a crash stopped after its commit point, and remove every other folder in
    flight beside ``path`` (``.X.new-*``, ``.X.old-*``, ``.X.tmp-*``). Returns a note when it changed ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    flight = [(m["kind"], e) for e in path.parent.iterdir()
              if (m := _IN_FLIGHT.match(e.name)) and m["name"] == path.name and e.is_dir()]
    ready = sorted((e for kind, e in flight if kind == "ready"), key=lambda e: e.stat().st_mtime)
    note = None
    if ready:
        newest = ready[-1]
        if path.exists():
            shutil.rmtree(path)
        newest.rename(path)
        note = f"finished an interrupted save: {path} is the complete copy {newest.name} left"
    for kind, e in flight:
        if e.exists():
            shutil.rmtree(e, ignore_errors=True)
    return note


def clean_stale(folder: Path) -> list[str]:
    """Recover every folder in flight under ``folder`` (recursively) and remove stale temporary files; the
    notes of what was recovered. Only safe while no other process writes ``folder`` (its lock is held)."""
    notes = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        finals = {m["name"] for d in dirs if (m := _IN_FLIGHT.match(d))}
        for name in sorted(finals):
            if (note := recover_dir(here / name)) is not None:
                notes.append(note)
        dirs[:] = [d for d in dirs if not _IN_FLIGHT.match(d) and (here / d).is_dir()]
        for f in files:
            if _IN_FLIGHT.match(f) or f.startswith(_PROBE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(here / f)
            elif f.startswith(".") and f.endswith(".lock"):
                _remove_stale_lock(here / f)
    return notes


def _remove_stale_lock(path: Path) -> None:
    """Remove the lock file of a nested output (``runs.OutputLock``) that a killed run left, if no one holds it."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR)
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # while holding it: a run that opened it meanwhile sees another inode and retries
    except OSError:
        pass  # held: a live run's
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (``replace_dir``), else it is
    removed."""
    path = Path(path)
    tmp = staging_dir(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fault_point("write", path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("replace", path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def move_files_in(tmp: Path, out: Path, last: str) -> None:
    """Rename each file of the folder ``tmp`` into ``out`` (same file system), ``last`` last, so that a folder
    with ``last`` has all the others complete; ``tmp`` is removed."""
    try:
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != last] + [n for n in names if n == last]:
            fault_point("replace", out / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """A report's table as GitHub markdown (the copy written beside its JSON, whole at any terminal width)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"## {title}", ""] if title else []
    lines += [line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, json_name: str, doc: dict, table_name: str,
                 table: tuple[str, list[str], list[list[str]]], final: Path | None = None) -> list[str]:
    """Write a report's JSON and its table (``(title, headers, rows)``) as markdown beside it; return the paths, in
    ``final`` if given (the folder that ``folder`` becomes when a staged run is swapped in)."""
    folder = Path(folder)
    atomic_write_json(folder / json_name, doc)
    title, headers, rows = table
    atomic_write_bytes(folder / table_name, markdown_table(headers, rows, title).encode())
    shown = Path(final) if final is not None else folder
    return [str(shown / json_name), str(shown / table_name)]
