"""Atomic writes: every artifact is written under a temporary name and renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing non-empty output folder unless ``overwrite`` (or ``resume``) is given."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a folder; choose another --output")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise UserError(f"output folder {path} already exists; pass --overwrite to replace it or --resume to continue")
    try:  # fail now, not after hours of work: the folder must be creatable and writable
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); choose another --output") from None


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by rename, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


def markdown_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """A report's table as GitHub markdown (the copy written beside its JSON, whole at any terminal width)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"## {title}", ""] if title else []
    lines += [line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, json_name: str, doc: dict, table_name: str,
                 table: tuple[str, list[str], list[list[str]]]) -> list[str]:
    """Write a report's JSON and its table (``(title, headers, rows)``) as markdown beside it; return the paths."""
    folder = Path(folder)
    atomic_write_json(folder / json_name, doc)
    title, headers, rows = table
    atomic_write_bytes(folder / table_name, markdown_table(headers, rows, title).encode())
    return [str(folder / json_name), str(folder / table_name)]
