"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from retrieval.errors import InputError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


log = logging.getLogger(__name__)

STALE_GRACE_S = 2.0  # a leftover younger than this is never removed (its writer may not hold its lock yet)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` in one rename.

    The temporary file is locked (flock) while it is written, so `clean_stale_leftovers` can tell the
    leftover of a killed writer from a write in progress.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        _lock(fd)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp's 0600 would make logs and indexes private
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        os.close(fd)
        if tmp.exists():
            tmp.unlink()


def _lock(fd: int) -> None:
    with contextlib.suppress(OSError):  # a filesystem without flock: leftovers are then cleaned by age only
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a lock on folder `path` (a folder being built) for as long as the block runs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)


def leftover_patterns(name: str) -> tuple[str, ...]:
    """What an interrupted write of `name` leaves beside it: atomic_path's temporary file, publish_folder's
    folder under construction, swap_in_folder's previous copy."""
    return (f".{name}.*.tmp", f".{name}.building-*", f".{name}.old-*")


def _is_unlocked(path: Path) -> bool:
    """True when no live writer holds `path` (a killed process's flock is released by the kernel)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def clean_stale_leftovers(
    folder: str | os.PathLike[str],
    names: list[str] | tuple[str, ...],
    *,
    grace_s: float = STALE_GRACE_S,
) -> list[Path]:
    """Remove what killed writers of `folder/<name>` left behind; returns what was removed (and logs it).

    Only our own patterns (`leftover_patterns`), only when no process holds them locked and they are
    older than `grace_s`. A previous copy (`.old-*`) is kept while `name` itself is missing: it is then
    the last complete copy, and the error that reports the missing folder points at it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    now = time.time()
    for name in names:
        for pattern in leftover_patterns(name):
            for path in sorted(folder.glob(pattern)):
                if pattern.endswith("old-*") and not (folder / name).exists():
                    continue
                try:
                    if now - path.lstat().st_mtime < grace_s or path.is_symlink() or not _is_unlocked(path):
                        continue
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError:
                    continue
                removed.append(path)
                log.warning("removed %s, left by an interrupted write of %s", path, folder / name)
    return removed


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_with(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Let a library that insists on writing a path itself (torch.save, faiss.write_index) write atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read JSON with an error that names the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON ({exc}); it may be truncated, rebuild it") from exc


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to disk before it is renamed into place."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_in_folder(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Replace folder `target` by the complete folder `new` with renames only.

    The old folder is renamed aside first and removed last; if the second rename fails it is put back,
    so `target` is never missing a complete copy for longer than one rename.
    """
    new, target = Path(new), Path(target)
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, read in 4 MiB blocks: what index folders and embedding parts record and verify."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
