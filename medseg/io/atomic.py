"""Durable atomic writes: a temporary file beside the destination, fsynced, renamed, folder fsynced.

The order is what makes a write survive a crash or a power cut: the content is written to a
temporary file and flushed to the disk (``fsync``) before the file takes its final name
(``rename``), and the folder is flushed after the rename so that the new name itself is on the disk.
At any moment the destination is either the complete old file, the complete new one, or absent;
never a partial one. Files get the permissions the user's umask gives (as ``open()`` would), not the
``0600`` of :func:`tempfile.mkstemp`, so a colleague or a PACS forwarder can read them.

Temporary files are named ``.<stem>.<random>.tmp<suffix>``; a process killed mid-write leaves one
behind, which :func:`remove_stale_temporaries` deletes (the batch runner does so under its lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from medseg import faults

_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp")
_fsync_lock = threading.Lock()
_fsync_seconds = 0.0


def _umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``), else by setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _timed_fsync(fd: int) -> None:
    global _fsync_seconds
    t0 = time.perf_counter()
    os.fsync(fd)
    with _fsync_lock:
        _fsync_seconds += time.perf_counter() - t0


def fsync_seconds() -> float:
    """Seconds this process has spent in fsync for durable writes (for benchmarks)."""
    return _fsync_seconds


def fsync_file(path: str | Path) -> None:
    """Flush a file's content to the disk.

    Raises:
        OSError: When the disk reports the write lost (EIO) or out of space (ENOSPC).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        faults.inject_error(path)
        _timed_fsync(fd)
    finally:
        os.close(fd)
    faults.trace("fsync-file", path)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new, renamed and removed names) to the disk.

    Examples:
        >>> import tempfile
        >>> fsync_dir(tempfile.gettempdir())
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _timed_fsync(fd)
    finally:
        os.close(fd)
    faults.trace("fsync-dir", path)


def durable_rename(src: str | Path, dest: str | Path) -> None:
    """Rename ``src`` (a file or a folder whose content is already durable) onto ``dest``, durably.

    The destination's folder is fsynced after the rename.
    """
    os.replace(src, dest)
    faults.trace("rename", dest)
    faults.point("renamed", dest)
    fsync_dir(Path(dest).parent)
    faults.point("dir-fsynced", dest)


def commit_folder(tmp: str | Path, dest: str | Path) -> None:
    """Rename a finished temporary folder onto ``dest`` (which must not exist), durably.

    Every folder inside ``tmp``, then ``tmp``, is fsynced first (files written by
    :func:`atomic_path` are already durable), then the rename, then ``dest``'s parent folder.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write_text(d / ".tmp-case" / "result.json", "{}")
        >>> commit_folder(d / ".tmp-case", d / "case")
        >>> sorted(p.name for p in d.iterdir()), (d / "case" / "result.json").read_text()
        (['case'], '{}')
    """
    tmp, dest = Path(tmp), Path(dest)
    for folder, _dirs, _files in os.walk(tmp, topdown=False):  # the case folder itself last
        fsync_dir(folder)
    faults.point("case-complete", dest)
    os.replace(tmp, dest)
    faults.trace("rename", dest)
    faults.point("case-renamed", dest)
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; make it ``dest``, durably, if the block succeeds.

    After the block: fsync the temporary file, rename it onto ``dest``, fsync the folder. A crash
    at any moment leaves ``dest`` as it was or complete; an error (a full disk, EIO) removes the
    temporary file and leaves ``dest`` as it was.

    Args:
        dest: The final path.
        suffix: Suffix of the temporary file (defaults to the destination's full suffix,
            so writers that pick a format from the name, like ``.nii.gz``, still work).

    Yields:
        The temporary path to write to.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "a.txt").read_text()
        'hello'
        >>> oct((d / "a.txt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
        True
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{suffix}", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        faults.trace("write", dest)
        faults.point("tmp-written", dest)
        fsync_file(tmp)
        faults.point("file-fsynced", dest)
        durable_rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(dest: str | Path, text: str) -> None:
    """Write text to ``dest`` durably and atomically.

    Args:
        dest: The final path.
        text: The content (UTF-8).
    """
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    """Write bytes to ``dest`` durably and atomically.

    Args:
        dest: The final path.
        data: The content.
    """
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left directly in ``folder``.

    Only call this while no other process writes into ``folder`` (under its output lock).

    Args:
        folder: The folder.

    Returns:
        The files deleted.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".manifest.k2j4_x9.tmp.json").write_text("{")
        >>> _ = (d / "manifest.json").write_text("{}")
        >>> [p.name for p in remove_stale_temporaries(d)]
        ['.manifest.k2j4_x9.tmp.json']
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and _TMP_NAME.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
