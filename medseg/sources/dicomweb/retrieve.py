"""WADO-RS retrieval of one series into a private folder, all or nothing.

Instances are asked for in their stored transfer syntax (``transfer-syntax=*``: the server need not
transcode; compressed pixel data is decoded when medseg reads the series) and written byte for byte
as they arrive (the multipart answer is split as it streams in, nothing is decoded). They go into a
folder readable by this user only (mode 0700) under a private temporary root; the folder is handed
over only when the instance count and SOPInstanceUIDs match what QIDO-RS listed, and removed on
any failure. The root is removed when the source closes, at exit and on SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from medseg.sources.dicomweb.query import RemoteSeries

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # as stored: no transcoding
CHUNK = 1 << 20
_SOP_UID = 0x00080018
PRIVATE = 0o700
_ROOTS: set[Path] = set()
_LOCK = threading.Lock()
_PREVIOUS: dict[str, Any] = {}


class IncompleteSeries(Exception):  # noqa: N818  (a fact about the download, not a bug)
    """A download that did not bring exactly the series' listed instances."""


def _remove_roots() -> None:
    with _LOCK:
        roots = list(_ROOTS)
        _ROOTS.clear()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: remove private downloads, then exit as if interrupted (context managers unwind)."""
    _remove_roots()
    raise SystemExit(128 + signum)


def _guard_sigterm() -> None:
    """Turn SIGTERM into an exit that cleans up, where Python would otherwise die on the spot."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _PREVIOUS["sigterm"] = signal.signal(signal.SIGTERM, _on_sigterm)


atexit.register(_remove_roots)


def private_root() -> Path:
    """A new private temporary folder (0700), removed at exit and on SIGTERM."""
    _guard_sigterm()
    root = Path(tempfile.mkdtemp(prefix="medseg-dicomweb-"))
    root.chmod(PRIVATE)
    with _LOCK:
        _ROOTS.add(root)
    return root


def release_root(root: Path) -> None:
    """Remove a private root now (and give SIGTERM back its default once none is left)."""
    with _LOCK:
        _ROOTS.discard(root)
        last = not _ROOTS
    shutil.rmtree(root, ignore_errors=True)
    on_main = threading.current_thread() is threading.main_thread()
    if last and on_main and "sigterm" in _PREVIOUS and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _PREVIOUS.pop("sigterm"))


def multipart_parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    r"""The bodies of a ``multipart/related`` message, as its chunks arrive (RFC 2046).

    Raises:
        IncompleteSeries: The message ended before its closing boundary.

    Examples:
        >>> msg = b"--b\r\nContent-Type: x\r\n\r\nONE\r\n--b\r\n\r\nTWO\r\n--b--\r\n"
        >>> list(multipart_parts([msg[:9], msg[9:30], msg[30:]], b"b"))
        [b'ONE', b'TWO']
    """
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # the first delimiter has no line break before it
    in_part, closed, start = False, False, 0
    for chunk in chunks:
        buf += chunk
        while not closed:
            at = buf.find(delimiter, start)
            if at < 0 or len(buf) < at + len(delimiter) + 2:
                # search only the new bytes next time (a delimiter may straddle two chunks)
                start = at if at >= 0 else max(0, len(buf) - len(delimiter) - 2)
                break
            start = 0
            if in_part:
                part = bytes(buf[:at])
                head_end = part.find(b"\r\n\r\n")
                yield part[head_end + 4 :] if head_end >= 0 else part
            closed = buf[at + len(delimiter) : at + len(delimiter) + 2] == b"--"
            del buf[: at + len(delimiter)]
            in_part = True
    if not closed:
        msg = "the response ended before its closing boundary"
        raise IncompleteSeries(msg)


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    msg = f"WADO-RS answer must be multipart/related with a boundary, got {content_type.split(';')[0]!r}"
    raise IncompleteSeries(msg)


def download_series(
    session: Any, url: str, series: RemoteSeries, expected: Sequence[str], dest: Path, *, timeout: Any = None
) -> list[Path]:
    """Download a series' instances into ``dest`` (created 0700); all listed instances or an error.

    One WADO-RS request for the series, in the stored transfer syntax; each instance's bytes are
    written as the server sent them (nothing decoded or re-encoded), named by its position in the
    series' listing.

    Args:
        session: A ``requests.Session`` (credentials, TLS).
        url: The DICOMweb root.
        series: The series.
        expected: Its SOPInstanceUIDs as QIDO-RS listed them.
        dest: A new folder to create.
        timeout: ``requests`` timeout (connect, read).

    Returns:
        The files, one per instance.

    Raises:
        IncompleteSeries: Instances missing, extra or repeated, or the answer cut short.
        requests.RequestException: The download failed (``dest`` is then removed).
    """
    import pydicom

    dest.mkdir(mode=PRIVATE)
    try:
        index = {uid: i for i, uid in enumerate(sorted(expected))}
        written: dict[str, Path] = {}
        target = f"{url}/studies/{series.study_uid}/series/{series.series_uid}"
        with session.get(target, headers={"Accept": ACCEPT}, stream=True, timeout=timeout) as answer:
            answer.raise_for_status()
            boundary = _boundary(answer.headers.get("Content-Type", ""))
            for body in multipart_parts(answer.iter_content(CHUNK), boundary):
                header = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, specific_tags=[_SOP_UID])
                uid = str(header.get("SOPInstanceUID", ""))
                if uid not in index or uid in written:
                    msg = (
                        f"series returned an instance it did not list ({len(written)} of {len(index)} so far)"
                    )
                    raise IncompleteSeries(msg)
                path = dest / f"{index[uid]:05d}.dcm"
                path.write_bytes(body)
                written[uid] = path
        if len(written) != len(index):
            msg = f"series must bring {len(index)} instance(s), got {len(written)}"
            raise IncompleteSeries(msg)
        return sorted(written.values())
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


@contextlib.contextmanager
def removed_after(folder: Path) -> Iterator[Path]:
    """Yield ``folder``; remove it afterwards, whatever happened."""
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def folder_mode(path: Path) -> int:
    """The permission bits of a folder (0o700 for private downloads)."""
    return os.stat(path).st_mode & 0o777
