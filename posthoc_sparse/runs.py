"""One run's output folder: an exclusive lock, what a failed or interrupted run leaves behind, and Ctrl-C.

Every workflow that writes a folder runs inside ``output_run(path, ...)``:

* The folder is locked for the whole run: ``.X.lock`` beside it (X its name) holds an flock and says who took
  it. The kernel drops an flock when its process dies, so a lock left by a killed run is stale and simply
  taken over; a second writer (or a ``resume`` of a folder in use) gets a UserError naming the running process.
* What a crash left in flight is finished or removed (``io.clean_stale``); ``run.notes`` say what was recovered.
* An existing non-empty folder is refused unless ``overwrite`` or ``resume``. With ``overwrite`` (and with
  ``stage``, for outputs written only at the end, such as eval reports) the run writes a new folder beside it
  (``run.work``), swapped in when the run succeeds (``io.replace_dir``): the old folder stays whole until then.
* A run that fails or is stopped removes what it created, unless ``resumable(run.work)`` names resumable state
  there (a checkpoint, finished points); a folder that existed is left as it was.
* Ctrl-C, and SIGTERM alike (a scheduler preempting the job, ``kill``): after ``run.defer_interrupts()`` the first
  SIGINT or SIGTERM only sets ``run.stop_requested`` and the training loop stops at the end of its step, after a
  checkpoint; elsewhere it stops at once. Either way the run ends with ``errors.Interrupted``, whose message says
  where the resumable state is (the CLI exits with code 130), and the folder's lock is released.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import Interrupted, UserError
from .io import check_writable, clean_stale, make_dirs, recover_dir, replace_dir, staging_dir

try:
    import fcntl
except ImportError:  # not POSIX: the pid in the lock file decides
    fcntl = None


class OutputLock:
    """An exclusive lock on an output folder: an flock on ``.X.lock`` beside it, which records its holder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = self.path.parent / f".{self.path.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write to output folder {self.path} ({e.strerror}); choose another "
                                "--output") from None
            if not _try_lock(fd):
                holder = _holder(fd)
                os.close(fd)
                raise UserError(f"output folder {self.path} is in use by {holder}; wait for it to end or choose "
                                "another --output")
            try:  # a holder releasing removes the file: locking the removed one would not exclude anyone
                if os.fstat(fd).st_ino == os.stat(self.file).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[-200:],
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.file)
        os.close(self.fd)
        self.fd = None


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # no flock on this file system: fall back to the pid
            pass
    info = _read(fd)
    if info.get("host") not in (None, socket.gethostname()) or not isinstance(info.get("pid"), int):
        return not info
    if info["pid"] == os.getpid():
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True  # a stale lock of a dead process
    except PermissionError:
        pass
    return False


def _read(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(fd: int) -> str:
    info = _read(fd)
    if not info.get("pid"):
        return "another process"
    return (f"process {info['pid']} on {info.get('host')} (`{info.get('command')}`, since "
            f"{info.get('started')})")


class OutputRun:
    """The folder a run writes: ``work`` is ``path`` itself, or a new folder beside it swapped in at the end."""

    def __init__(self, path: Path, work: Path, notes: list[str]):
        self.path, self.work, self.notes = path, work, notes
        self.stop_requested = False
        self._deferring = False

    def defer_interrupts(self, enabled: bool = True) -> None:
        """From now on (until called with False) the first Ctrl-C only sets ``stop_requested``, for the training
        loop to stop at its next safe point; a second one stops at once."""
        self._deferring = enabled

    def _on_sigint(self, signum, frame) -> None:
        if self._deferring and not self.stop_requested:
            self.stop_requested = True
            return
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint(handler) -> Iterator[None]:
    """SIGINT and SIGTERM (a scheduler's preemption, ``kill``) go to ``handler`` (SIG_IGN: ignored) within; only
    the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextlib.contextmanager
def output_run(path: str | Path, *, overwrite: bool = False, resume: bool = False, stage: bool = False,
               main: bool = True, resumable: Callable[[Path], str | None] | None = None,
               barrier: Callable[[], None] = lambda: None) -> Iterator[OutputRun]:
    """Run inside the output folder ``path`` (see the module docstring). ``main``: this is the process that
    writes (the others of a launched group only learn ``run.work``, after ``barrier``). ``resumable(work)``
    describes the resumable state in ``work`` (e.g. "the checkpoint of step 30"), or returns None."""
    with _sigint(signal.default_int_handler):  # from here a Ctrl-C is a KeyboardInterrupt that this run cleans up after
        with _output_run(path, overwrite=overwrite, resume=resume, stage=stage, main=main, resumable=resumable,
                         barrier=barrier) as run:
            yield run


@contextlib.contextmanager
def _output_run(path: str | Path, *, overwrite: bool = False, resume: bool = False, stage: bool = False,
               main: bool = True, resumable: Callable[[Path], str | None] | None = None,
               barrier: Callable[[], None] = lambda: None) -> Iterator[OutputRun]:
    path = Path(path)
    if not main:
        barrier()
        staged = sorted(path.parent.glob(f".{glob.escape(path.name)}.new-*"))
        yield OutputRun(path, staged[0] if len(staged) == 1 else path, [])
        barrier()
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a folder; choose another --output")
    parents = _missing_parents(path)
    lock, existed, before, work, staged = OutputLock(path), None, None, None, False
    try:
        make_dirs(path.parent)
        lock.acquire()
        notes = [n for n in [recover_dir(path)] if n]
        existed = path.is_dir()
        if existed:
            notes += clean_stale(path)
            before = {e.name for e in path.iterdir()}
            if before and not (overwrite or resume):
                raise UserError(f"output folder {path} already exists; pass --overwrite to replace it or --resume to "
                                "continue")
        staged = not resume and (stage or (overwrite and bool(before)))
        if staged:
            work = staging_dir(path)
        else:
            make_dirs(path)
            work = path
        check_writable(work)
        run = OutputRun(path, work, notes)
        barrier()
        with _sigint(run._on_sigint):
            yield run
        with _sigint(signal.SIG_IGN):  # the swap is not cut short
            if staged:
                replace_dir(work, path)
        barrier()
    except BaseException as e:
        with _sigint(signal.SIG_IGN):
            held = lock.fd is not None
            what = _clean_up(path, work, staged, existed, before, resumable) if held else None
            lock.release()
            for parent in parents if held else []:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only while empty: another run may share a new parent
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            raise Interrupted(what or "nothing was changed") from None
        raise
    else:
        lock.release()


def _clean_up(path: Path, work: Path | None, staged: bool, existed: bool, before: set[str] | None,
              resumable: Callable[[Path], str | None] | None) -> str:
    """Remove what a failed run created; returns what is left, for the message of an interrupted run."""
    if staged and work is not None:
        shutil.rmtree(work, ignore_errors=True)
        return (f"{path} was left as it was (an --overwrite run replaces it only when it finishes)" if before
                else f"nothing was written to {path}")
    kept = resumable(work) if resumable is not None and work is not None and work.is_dir() else None
    if kept:
        clean_stale(work)
        return f"{kept} is kept in {path}: rerun the same command with --resume to continue"
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return f"nothing resumable was saved yet, so {path} was removed"
    for entry in path.iterdir() if before is not None and path.is_dir() else []:
        if entry.name not in before:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return f"nothing resumable was saved yet; {path} was left as it was"


def check_resume_folder(path: str | Path) -> None:
    """``--resume`` as a person types it: a folder that does not exist (no run wrote there, or a run that failed
    before saving anything removed it) holds nothing to resume, so that is one UserError rather than a fresh run
    (a typo in --output). A folder that exists is resumed, or started in when it holds nothing resumable yet (a run
    killed before its first checkpoint); so is one that does not exist in ``output_run``, for the runs a command
    starts for itself."""
    path = Path(path)
    if not path.exists() and not any(path.parent.glob(f".{glob.escape(path.name)}.ready-*")):  # an unfinished swap
        raise UserError(f"--resume: output folder {path} does not exist, so there is nothing to resume; run without "
                        "--resume to start")


@contextlib.contextmanager
def report_folder(output: str | Path | None, overwrite: bool = False, main: bool = True,
                  barrier: Callable[[], None] = lambda: None) -> Iterator[Path | None]:
    """The folder a report command writes into: None without ``output``; else a new folder beside ``output``,
    swapped in whole when the block ends without an error (``output_run`` with ``stage``)."""
    if not output:
        yield None
        return
    with output_run(output, overwrite=overwrite, stage=True, main=main, barrier=barrier) as run:
        yield run.work
