"""The ``dicomweb`` scan source: series of a DICOMweb archive, listed by QIDO-RS, fetched by WADO-RS.

``discover`` lists the selected series (studies, series, or QIDO-RS filters), skips non-image series
with a reason, applies the scan filter, and lists each remaining series' SOPInstanceUIDs: the case id
is the hash of the SeriesInstanceUID (as for a local DICOM series) and each scan's input is a small
descriptor file whose content is the hash of that list, so the batch runner's input fingerprint (and
with it resume) changes exactly when the series gains or loses instances, and is known before
anything is downloaded. ``fetch`` hands over the series downloaded into a private folder, complete
or not at all, and starts downloading the next series (bounded prefetch) so that the network does
not wait on the archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError
from medseg.sources.dicomweb.connection import (
    TIMEOUT_S,
    Connection,
    describe_failure,
    open_connection,
    raise_for,
)
from medseg.sources.dicomweb.query import (
    RemoteSeries,
    list_instances,
    list_series,
    parse_query,
    sop_list_hash,
)
from medseg.sources.dicomweb.retrieve import (
    IncompleteSeries,
    download_series,
    private_root,
    release_root,
    removed_after,
)
from medseg.sources.folder import Discovery, Scan, ScanFilter, Skipped, dicom_case_id

DEFAULT_PREFETCH = 2
DESCRIPTOR_SUFFIX = ".series.json"


def uid_label(uid: str, record_uids: bool) -> str:
    """A UID as it may be recorded: itself when opted in, else a hash.

    Examples:
        >>> uid_label("1.2.3", False)
        'sha256:c47f5b18b8a4'
        >>> uid_label("1.2.3", True)
        '1.2.3'
    """
    return uid if record_uids else "sha256:" + hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Selection:
    """Which series of the archive to process.

    Attributes:
        studies: StudyInstanceUIDs (every series of each).
        series: SeriesInstanceUIDs.
        query: QIDO-RS filters as ``(keyword, value)`` pairs.
        prefetch: Series downloaded ahead of the one being segmented (0: none).
        record_uids: Record Study/Series/SOP UIDs as they are (default: hashes).
    """

    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    prefetch: int = DEFAULT_PREFETCH
    record_uids: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Selection:
        """From scan-source options: ``studies``, ``series``, ``query`` (``KEY=VALUE`` strings),
        ``prefetch``, ``record_uids``.

        Raises:
            ConfigError: A malformed query or a negative prefetch.
        """
        prefetch = int(options.get("prefetch", DEFAULT_PREFETCH))
        if prefetch < 0:
            msg = f"prefetch must be >= 0, got {prefetch}"
            raise ConfigError(msg)
        query = options.get("query") or ()
        pairs = parse_query(query) if all(isinstance(q, str) for q in query) else tuple(query)
        return cls(
            tuple(options.get("studies") or ()),
            tuple(options.get("series") or ()),
            pairs,
            prefetch,
            bool(options.get("record_uids", False)),
        )


@dataclass
class _Remote:
    series: RemoteSeries
    sop_uids: list[str]
    download: Future[list[Path]] | None = None
    consumed: bool = False


@dataclass
class DicomwebSource:
    """Series of a DICOMweb archive (see the module docstring).

    Attributes:
        connection: The server.
        selection: Which series.
    """

    connection: Connection
    selection: Selection = Selection()
    location: str = field(default="", init=False)  # the archive's URL without credentials
    _remote: dict[str, _Remote] = field(default_factory=dict, init=False, repr=False)
    _order: list[str] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _root: Path | None = field(default=None, init=False, repr=False)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)

    def __post_init__(self) -> None:
        self.location = f"dicomweb:{self.connection.public}"

    def _session(self) -> Any:
        """This thread's HTTP session (requests' sessions are not shared between threads)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.connection.session()
        return session

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.connection.client(self._session())
        return client

    def _private(self) -> Path:
        if self._root is None:
            self._root = private_root()
            (self._root / "index").mkdir(mode=0o700)
            # removed when the source is closed, or else when it is garbage (a runner that never closes it)
            weakref.finalize(self, release_root, self._root)
        return self._root

    def list_remote(self) -> list[RemoteSeries]:
        """The selected series as the archive lists them now (one QIDO-RS round; watch mode polls this).

        Raises:
            ConfigError: Credentials or TLS refused.
            InputError: The server unreachable or failing.
        """
        import requests

        s = self.selection
        try:
            return list_series(self._client(), studies=s.studies, series=s.series, query=s.query)
        except requests.RequestException as exc:
            raise_for(exc, self.connection)
            raise  # unreachable: raise_for always raises

    def discover(self, scan_filter: ScanFilter | None = None) -> Discovery:
        """The selected image series, sorted by case id; non-image and filtered-out series skipped.

        Raises:
            ConfigError: Credentials or TLS refused.
            InputError: The server unreachable or failing.
        """
        import requests

        keep = scan_filter or ScanFilter()
        found = Discovery()
        for remote in self.list_remote():
            case_id = dicom_case_id(remote.series_uid)
            where = Path("dicomweb") / case_id
            reason = remote.reason_not_image()
            probe = Scan(case_id, where, remote.series_uid, (), remote.modality, remote.description)
            reason = reason or keep.reason_to_skip(probe)
            if reason is None and 0 <= remote.instances < keep.min_slices:
                reason = f"{remote.instances} instance(s), fewer than the minimum {keep.min_slices}"
            if reason is not None:
                found.skipped.append(Skipped(where, f"series {case_id} skipped: {reason}"))
                continue
            try:
                sop_uids = list_instances(self._client(), remote)
            except requests.RequestException as exc:
                raise_for(exc, self.connection)
            if not sop_uids:
                found.skipped.append(Skipped(where, f"series {case_id} skipped: no instances listed"))
                continue
            descriptor = self._describe(case_id, remote, sop_uids)
            with self._lock:
                self._remote[case_id] = _Remote(remote, sop_uids)
            found.scans.append(
                Scan(case_id, descriptor, remote.series_uid, (), remote.modality, remote.description)
            )
        found.scans.sort(key=lambda s: s.case_id)
        self._order = [s.case_id for s in found.scans]
        return found

    def _describe(self, case_id: str, remote: RemoteSeries, sop_uids: Sequence[str]) -> Path:
        """The scan's descriptor file: its fingerprint is a function of the SOPInstanceUID list alone."""
        path = self._private() / "index" / f"{case_id}{DESCRIPTOR_SUFFIX}"
        record = {
            "source": self.connection.public,
            "series": uid_label(remote.series_uid, self.selection.record_uids),
            "instances": len(sop_uids),
            "sop_list_sha256": sop_list_hash(remote.series_uid, sop_uids),
        }
        path.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        os.utime(path, ns=(0, 0))  # a fixed time: the fingerprint follows the content
        return path

    def _start(self, case_id: str) -> Future[list[Path]]:
        """The download of a series (started now unless it already is)."""
        with self._lock:
            remote = self._remote[case_id]
            if remote.download is None:
                if self._pool is None:
                    workers = max(1, min(self.selection.prefetch, 4))
                    self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-wado")
                dest = self._private() / case_id
                remote.download = self._pool.submit(self._download, remote, dest)
            return remote.download

    def _download(self, remote: _Remote, dest: Path) -> list[Path]:
        shutil.rmtree(dest, ignore_errors=True)  # an earlier attempt's leftovers
        return download_series(
            self._session(), self.connection.url, remote.series, remote.sop_uids, dest, timeout=TIMEOUT_S
        )

    def _prefetch_after(self, case_id: str) -> None:
        """Start the downloads of the next series in discovery order, at most ``prefetch`` ahead."""
        if case_id not in self._order or not self.selection.prefetch:
            return
        ahead = 0
        for upcoming in self._order[self._order.index(case_id) + 1 :]:
            remote = self._remote[upcoming]
            if remote.consumed:
                continue
            if ahead >= self.selection.prefetch:
                break
            self._start(upcoming)
            ahead += 1

    @contextlib.contextmanager
    def fetch(self, scan: Scan) -> Iterator[Scan]:
        """The series downloaded into a private folder (removed when the context closes).

        Raises:
            InputError: The download failed or was incomplete (nothing partial is handed over).
        """
        import requests

        if scan.case_id not in self._remote:
            msg = f"scan must come from this source's discovery, got case {scan.case_id}"
            raise InputError(msg)
        future = self._start(scan.case_id)
        self._prefetch_after(scan.case_id)
        dest = self._private() / scan.case_id
        with removed_after(dest):
            try:
                files = future.result()
            except requests.RequestException as exc:
                msg = f"{describe_failure(exc, self.connection)} (retrieving series {scan.case_id})"
                raise InputError(msg) from None
            except IncompleteSeries as exc:
                msg = f"series {scan.case_id} download from {self.connection.public} was incomplete: {exc}"
                raise InputError(msg) from None
            finally:
                with self._lock:
                    remote = self._remote[scan.case_id]
                    remote.consumed, remote.download = True, None
            yield Scan(scan.case_id, dest, scan.series_uid, tuple(files), scan.modality, scan.description)

    def close(self) -> None:
        """Stop prefetching and remove every private download."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._root is not None:
            release_root(self._root)
            self._root = None

    def __enter__(self) -> DicomwebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_dicomweb_source(location: str, options: Mapping[str, Any]) -> DicomwebSource:
    """Open ``dicomweb:URL`` with scan-source options (selection, ``credentials``, ``ca_bundle``)."""
    return DicomwebSource(open_connection(location, options), Selection.from_options(options))
