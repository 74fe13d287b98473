"""Full disks and failing disks during a batch: fail the scan, and stop when the disk stays full.

A scan whose outputs cannot be written (``ENOSPC``, ``EDQUOT``, ``EIO``) fails with that reason and
leaves no partial file (:mod:`medseg.io.atomic` removes its temporary files; the case's temporary
folder is removed by the job). When the output disk keeps failing (``STOP_AFTER`` scans in a row,
or the manifest itself cannot be written) the batch stops with :class:`StorageError` instead of
failing every remaining scan the same way; the CLI exits with status 1. A rerun once space is freed
redoes the failed and pending scans and keeps the others.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Protocol

from medseg.errors import MedsegError

STORAGE_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EIO: "EIO"}
STOP_AFTER = 2


class StorageError(MedsegError):
    """The output disk is full or failing: the batch stopped early (its manifest says where)."""


def storage_errno(exc: BaseException | None) -> str | None:
    """The name of the storage errno behind ``exc`` (its causes included), or ``None``.

    Examples:
        >>> storage_errno(OSError(errno.ENOSPC, "No space left on device"))
        'ENOSPC'
        >>> storage_errno(ValueError("bad")) is None
        True
    """
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[exc.errno]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class _Details(Protocol):
    @property
    def errno(self) -> str | None: ...


class _Result(Protocol):
    """What the watch reads of a job's result (:class:`medseg.batch.job.JobResult`)."""

    status: str
    error: str | None

    @property
    def details(self) -> _Details: ...


class StorageWatch:
    """Counts consecutive scans that failed for a storage error; stops the batch when the disk stays bad.

    Examples:
        >>> from medseg.batch.job import JobDetails, JobResult
        >>> watch = StorageWatch()
        >>> full = JobResult("a", "failed", "fp", "sha", error="No space left on device",
        ...                  details=JobDetails(errno="ENOSPC"))
        >>> watch.observe(full)
        >>> watch.observe(full)
        Traceback (most recent call last):
        ...
        medseg.batch.storage.StorageError: output disk must have space ...
    """

    def __init__(self, stop_after: int = STOP_AFTER) -> None:
        self.stop_after = stop_after
        self.run = 0

    def observe(self, result: _Result) -> None:
        """Take one finished job's result.

        Raises:
            StorageError: When ``stop_after`` scans in a row failed for a storage error.
        """
        code = result.details.errno if result.status == "failed" else None
        self.run = self.run + 1 if code else 0
        if code and self.run >= self.stop_after:
            raise StorageError(_message(code, f"{self.run} scans in a row failed: {result.error}"))


def _message(code: str, what: str) -> str:
    if code in ("ENOSPC", "EDQUOT"):
        return (
            f"output disk must have space for the outputs, got {code} ({what}); the batch stopped early: "
            "free space and run the same command again to finish it"
        )
    return (
        f"output disk must accept writes, got {code} ({what}); the batch stopped early: "
        "check the disk and run the same command again to finish it"
    )


@contextlib.contextmanager
def stop_on_storage_error(what: str) -> Iterator[None]:
    """Turn a storage ``OSError`` inside the block (writing the manifest, say) into :class:`StorageError`.

    Raises:
        StorageError: For ``ENOSPC``, ``EDQUOT`` and ``EIO``; other errors pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        code = storage_errno(exc)
        if code is None:
            raise
        raise StorageError(_message(code, f"writing {what}: {exc.strerror or exc}")) from exc
