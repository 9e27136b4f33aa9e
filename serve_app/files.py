"""Artefacts are written beside their final place, then renamed into it, so a reader (a
serving replica, a rerun, a crash) sees the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def plain_mode() -> int:
    """The mode a plain write gives a new file here: 0o666 less the process's umask (read
    from /proc where it is there: setting the umask to read it is process-wide)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def readable(path: str | Path) -> Path:
    """Give `path` (a file, or every file under a folder) the mode a plain write would.
    safetensors writes its files 0600, so weights, heads and references saved by `tryage` would
    be unreadable to a replica running as another user, or to a copy on shared storage."""
    path = Path(path)
    mode = plain_mode()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        if f.is_symlink() or f.stat().st_uid != os.getuid():
            continue  # not ours to change: a link's target, another user's file
        os.chmod(f, mode)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path` to fill; on success its files get the mode
    of a plain write (`readable`) and it replaces `path`.

    A folder cannot be swapped in one rename: the old one is renamed aside first, the new one
    renamed in, then the old one removed (a crash in between leaves `.NAME.old-PID` beside it).
    On an error the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    readable(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
