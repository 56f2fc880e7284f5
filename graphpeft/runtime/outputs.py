"""Output folders that are never half-written.

``staged_output(OUT)`` yields a temporary folder next to OUT; on success it is renamed into place,
on failure it is deleted. An existing non-empty OUT is refused unless ``overwrite``; then the old
folder is renamed away, the new one renamed in, and only then the old one deleted.
``atomic_write(FILE, write)`` does the same for one file, ``atomic_write_many`` for files that belong together.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from graphpeft.engine.errors import GraphPeftError


def _usual_mode(path: str | os.PathLike, full: int) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode a plain open/mkdir would: ``full & ~umask``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one."""
    atomic_write_many({path: write})


def atomic_write_many(writes: dict[Path, Any]) -> None:
    """Write every file to a hidden temporary next to it (flushed to disk), then rename them all into place.

    A process killed while writing leaves every final name as it was (at worst a hidden
    ``.NAME.*.tmp`` file); the renames come last, one after another, so files that belong together
    (an adapter's weights and its config) are replaced within microseconds of each other.
    """
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps[path] = tmp
            write(tmp)
            _usual_mode(tmp, 0o666)
            _fsync(tmp)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _fsync(path: str) -> None:
    """Flush a written file to disk before it is renamed over the old one (a crash never leaves it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without --overwrite (checked before any work and again at the end)."""
    if out.exists() and not out.is_dir():
        raise GraphPeftError(f"output {out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GraphPeftError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success rename it into place, on failure delete it.

    With ``overwrite``, an existing ``out`` is renamed away, the new folder renamed in, then the old deleted.
    """
    out = Path(out).expanduser().absolute()
    check_output(out, overwrite)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        _remove_empty(created)
        raise GraphPeftError(f"cannot write next to {out}: {exc.strerror or exc}; "
                             f"choose a writable output path") from None
    try:
        _usual_mode(tmp, 0o777)
        yield tmp
        check_output(out, overwrite)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _swap_in(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


