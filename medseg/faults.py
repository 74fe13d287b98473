"""Fault injection and write-path tracing for tests, switched on by environment variables.

Every durable write (:mod:`medseg.io.atomic`) and every case folder rename passes named points:

==================  ==============================================================
point               reached
==================  ==============================================================
``tmp-written``     the temporary file holds the content, not yet fsynced
``file-fsynced``    the temporary file is fsynced, not yet renamed
``renamed``         the file has its final name, the folder not yet fsynced
``dir-fsynced``     the folder holding the new name is fsynced (the write is durable)
``case-complete``   a case's temporary folder holds every output, not yet renamed
``case-renamed``    the case folder has its final name, the output folder not yet fsynced
==================  ==============================================================

Variables (all unset in normal use; reading them costs one dictionary lookup per point):

* ``MEDSEG_FAULT_KILL_AT=POINT[:N][@NAME]``: SIGKILL this process the ``N``-th time (default 1st)
  it reaches ``POINT`` for a file whose name contains ``NAME`` (default any file).
* ``MEDSEG_FAULT_ERRNO=ERRNO[:N][@NAME]``: make the ``N``-th (default: every) fsync of a file whose
  name contains ``NAME`` fail with ``OSError(ERRNO)`` (e.g. ``EIO``, ``ENOSPC``), as a failing disk
  reports a lost write at fsync.
* ``MEDSEG_FAULT_STALL_AT=POINT[:N][,POINT[:N]...]`` with ``MEDSEG_FAULT_RELEASE=FILE``: wait at
  the ``N``-th passage of each listed point until ``FILE`` exists (at most 300 s), having created
  ``FILE.waiting``; both files are removed when it goes on. Lets a test act on a batch that is
  provably half-way (start a second batch, stop or restart a server).
* ``MEDSEG_FAULT_TRACE=FILE``: append one line ``pid:thread<TAB>event<TAB>path`` per step of the write
  path (``write``, ``fsync-file``, ``rename``, ``fsync-dir``) to ``FILE``.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KILL_ENV = "MEDSEG_FAULT_KILL_AT"
ERRNO_ENV = "MEDSEG_FAULT_ERRNO"
STALL_ENV = "MEDSEG_FAULT_STALL_AT"
RELEASE_ENV = "MEDSEG_FAULT_RELEASE"
STALL_MAX_S = 300.0
TRACE_ENV = "MEDSEG_FAULT_TRACE"
POINTS = ("tmp-written", "file-fsynced", "renamed", "dir-fsynced", "case-complete", "case-renamed")

_lock = threading.Lock()
_counts: dict[tuple[str, str], int] = {}


@dataclass(frozen=True)
class FaultSpec:
    """One parsed fault setting: what to match and on which occurrence.

    Attributes:
        what: The point name (kills) or errno name (errors).
        nth: Occurrence that triggers (0: every occurrence).
        name: Substring the file's name must contain ("" for any).
    """

    what: str
    nth: int = 0
    name: str = ""

    @classmethod
    def parse(cls, text: str, default_nth: int) -> FaultSpec:
        """Parse ``WHAT[:N][@NAME]``.

        Examples:
            >>> FaultSpec.parse("renamed:2@labels", 1)
            FaultSpec(what='renamed', nth=2, name='labels')
            >>> FaultSpec.parse("EIO", 0)
            FaultSpec(what='EIO', nth=0, name='')
        """
        head, _, name = text.partition("@")
        what, _, nth = head.partition(":")
        return cls(what.strip(), int(nth) if nth else default_nth, name)


def _hit(spec: FaultSpec, key: str, path: str | Path) -> bool:
    if spec.name and spec.name not in Path(path).name:
        return False
    with _lock:
        n = _counts.get((key, spec.what), 0) + 1
        _counts[(key, spec.what)] = n
    return spec.nth in (0, n)


def point(name: str, path: str | Path) -> None:
    """Pass the named point of the write path for ``path``: die or wait here if asked to."""
    text = os.environ.get(KILL_ENV)
    if text:
        spec = FaultSpec.parse(text, 1)
        if spec.what == name and _hit(spec, "kill", path):
            os.kill(os.getpid(), signal.SIGKILL)
    text = os.environ.get(STALL_ENV)
    if text:
        specs = [FaultSpec.parse(part, 1) for part in text.split(",")]
        if any(s.what == name for s in specs):
            with _lock:
                n = _counts.get(("stall", name), 0) + 1
                _counts[("stall", name)] = n
            if any(s.what == name and s.nth == n for s in specs):
                _stall()


def _stall() -> None:
    """Wait until the release file exists; then remove it (and the marker) for the next stall."""
    release = Path(os.environ.get(RELEASE_ENV) or f"/tmp/medseg-release-{os.getpid()}")
    waiting = Path(f"{release}.waiting")
    waiting.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + STALL_MAX_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting.unlink(missing_ok=True)
    release.unlink(missing_ok=True)


def trace(event: str, path: str | Path) -> None:
    """Record one step of the write path (when ``MEDSEG_FAULT_TRACE`` names a file)."""
    target = os.environ.get(TRACE_ENV)
    if not target:
        return
    line = f"{os.getpid()}:{threading.get_ident()}\t{event}\t{path}\n".encode()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines of several processes never interleave
    finally:
        os.close(fd)


def inject_error(path: str | Path) -> None:
    """Raise the ``OSError`` that ``MEDSEG_FAULT_ERRNO`` asks for at this fsync of ``path``, if any.

    Raises:
        OSError: With the configured errno.
    """
    text = os.environ.get(ERRNO_ENV)
    if not text:
        return
    spec = FaultSpec.parse(text, 0)
    code = getattr(errno, spec.what, None)
    if not isinstance(code, int):
        msg = f"{ERRNO_ENV} must name an errno such as EIO or ENOSPC, got {spec.what!r}"
        raise ValueError(msg)
    if _hit(spec, "errno", path):
        raise OSError(code, os.strerror(code), str(path))
