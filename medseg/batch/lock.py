"""One writer per output folder: an ``flock`` on ``OUT/.medseg.lock`` held for a whole batch.

``medseg predict`` (with either engine: the Ray driver holds it while its workers write) and
``medseg export`` take the lock before they write anything into an output folder and keep it until
they end. A second process that wants the folder is refused at once with the holder's pid and host,
which the holder writes into the lock file. The kernel releases an ``flock`` when its holder dies
(SIGKILL included), so a crashed run never leaves a stale lock to clean up.

Within one process the lock is re-entrant for the thread that holds it (``predict`` runs the
batch exports under its own lock).

On NFS (v4, or v3 with a working lock manager) Linux maps ``flock`` to POSIX byte-range locks that
the server arbitrates, so two machines writing one exported folder also exclude each other; a client
that loses the server for longer than the lease may lose its lock. Without a lock manager
(``nolock`` mounts) the lock is only seen by processes on the same machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from medseg.errors import InputError
from medseg.io.atomic import remove_stale_temporaries

LOCK_FILE = ".medseg.lock"

_held: dict[str, tuple[int, int, int, bool]] = {}  # folder -> (fd, owning thread, depth, created by the lock)
_held_lock = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


class OutputLockedError(InputError):
    """Another live process is writing into the output folder."""


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        fields = dict(part.split("=", 1) for part in path.read_text(encoding="utf-8").split() if "=" in part)
        if "pid" in fields:
            return f"pid {fields['pid']} on host {fields.get('host', '?')}, since {fields.get('since', '?')}"
    return "a process that has not written its pid yet"


def _acquire(folder: Path) -> tuple[int, bool]:
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        msg = (
            f"output folder {folder} must have one writer at a time, got another medseg process "
            f"writing it ({_holder(path)}); wait for it to end or choose another folder"
        )
        raise OutputLockedError(msg) from None
    except BaseException:
        os.close(fd)
        raise
    stamp = f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, stamp.encode(), 0)
    remove_stale_temporaries(folder)  # left by killed writers; nobody else writes here now
    return fd, created


def _release(folder: Path, fd: int, *, created: bool) -> None:
    """Give the lock back; a folder this lock created and nothing else wrote to is removed with it (a
    run that could not start leaves nothing behind). The file goes while the lock is still held, so
    no other process can lock the removed file."""
    try:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()
    except OSError:
        pass  # another process wrote into it meanwhile: keep it
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the output folder's lock for the block (creating the folder); re-entrant per thread.

    Args:
        folder: The output folder.

    Yields:
        The folder.

    Raises:
        OutputLockedError: If another process (or another thread) holds it.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "out"
        >>> with output_lock(out), output_lock(out):
        ...     "pid=" in (out / LOCK_FILE).read_text()
        True
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    me = threading.get_ident()
    with _held_lock:
        held = _held.get(key)
        if held is not None and held[1] == me:
            _held[key] = (held[0], me, held[2] + 1, held[3])
        else:
            fd, created = _acquire(folder)  # raises for another thread too: its fd holds the flock
            _held[key] = (fd, me, 1, created)
    try:
        yield folder
    finally:
        with _held_lock:
            fd0, owner, depth, created = _held[key]
            if depth > 1:
                _held[key] = (fd0, owner, depth - 1, created)
            else:
                del _held[key]
                _release(folder, fd0, created=created)


def holds_output_lock(argument: str) -> Callable[[F], F]:
    """Decorate a function so that it runs under the lock of the folder passed as ``argument``.

    Args:
        argument: Name of the parameter that holds the output folder.

    Returns:
        The decorator.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments[argument]
            with output_lock(folder):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
