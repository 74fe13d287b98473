"""Watch mode: keep segmenting the series that arrive in a folder or a DICOMweb archive.

Every poll lists the source's series with a state that changes while a series is still arriving (a
folder series: its file count, total size and newest modification time; a DICOMweb series: its
NumberOfSeriesRelatedInstances). A series is *ready* once its state has stayed the same for the quiet
period; when some ready series has not been processed in its current state, a batch runs over the
ready series (those done earlier are kept by resume, so a restart continues where it stopped; a
series that failed is tried again when it changes or the watch restarts). The
whole list is diffed on every poll, never narrowed by study date: studies dated in the past (late
arrivals, loaded priors) are seen like new ones. SIGTERM or SIGINT stop the watch: a batch in
progress is abandoned (outputs are written all or nothing, and unfinished ones removed) and the
watch returns.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from medseg.batch.job import TMP_PREFIX
from medseg.errors import ConfigError, InputError
from medseg.sources.folder import Scan, ScanFilter, dicom_case_id, discover
from medseg.sources.scans import FolderSource, open_scan_source


class WatchStopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM/SIGINT while a batch runs (passes ``except Exception``)."""


@dataclass(frozen=True)
class ReadySeries(ScanFilter):
    """A scan filter that also keeps only the series that are ready (their case ids).

    Examples:
        >>> keep = ReadySeries(ready=frozenset({"a"}))
        >>> keep.reason_to_skip(Scan("b", Path("b"))) is not None
        True
    """

    ready: frozenset[str] = frozenset()
    quiet_s: float = 0.0

    def reason_to_skip(self, scan: Scan) -> str | None:
        """The base filter's reason, or "still arriving" for a series that is not ready."""
        reason = super().reason_to_skip(scan)
        if reason is None and scan.case_id not in self.ready:
            reason = f"still arriving (not unchanged for {self.quiet_s:g} s yet)"
        return reason


class Readiness:
    """Tracks each series' state over polls; ready once unchanged for ``quiet_s``.

    Examples:
        >>> now = [0.0]
        >>> r = Readiness(10, clock=lambda: now[0])
        >>> r.update({"s": 3})
        set()
        >>> now[0] = 11; r.update({"s": 3})
        {'s'}
        >>> r.update({"s": 4})
        set()
    """

    def __init__(self, quiet_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet_s, self.clock = quiet_s, clock
        self.seen: dict[str, tuple[Hashable, float]] = {}

    def update(self, states: Mapping[str, Hashable]) -> set[str]:
        """Record this poll's states; the keys whose state has not changed for the quiet period."""
        now = self.clock()
        for key, state in states.items():
            if key not in self.seen or self.seen[key][0] != state:
                self.seen[key] = (state, now)
        for key in set(self.seen) - set(states):
            del self.seen[key]
        return {k for k, (_, since) in self.seen.items() if now - since >= self.quiet_s}


def folder_states(folder: Path) -> dict[str, Hashable]:
    """Per scan under a folder: (files, total bytes, newest modification time)."""
    states: dict[str, Hashable] = {}
    for scan in discover(folder).scans:
        stats = [p.stat() for p in scan.inputs if p.exists()]
        states[scan.case_id] = (
            len(stats),
            sum(s.st_size for s in stats),
            max((s.st_mtime_ns for s in stats), default=0),
        )
    return states


def archive_states(source: Any) -> dict[str, Hashable]:
    """Per image series of a DICOMweb source: its NumberOfSeriesRelatedInstances."""
    return {
        dicom_case_id(s.series_uid): s.instances for s in source.list_remote() if s.reason_not_image() is None
    }


@dataclass(frozen=True)
class WatchSettings:
    """How the watch polls.

    Attributes:
        quiet_s: Seconds a series must stay unchanged before it is segmented.
        poll_s: Seconds between polls.
    """

    quiet_s: float = 60.0
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if self.quiet_s < 0 or self.poll_s <= 0:
            msg = f"quiet period must be >= 0 s and poll interval > 0 s, got {self.quiet_s} and {self.poll_s}"
            raise ConfigError(msg)


@dataclass
class _Stop:
    event: threading.Event = field(default_factory=threading.Event)
    in_batch: bool = False
    signal_name: str = ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        if self.in_batch:
            self.in_batch = False
            raise WatchStopped(self.signal_name)


@contextlib.contextmanager
def _signals(stop: _Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def watch(
    source: str,
    out_dir: str | Path,
    *,
    run_batch: Callable[[ScanFilter], Any],
    settings: WatchSettings = WatchSettings(),
    scan_filter: ScanFilter | None = None,
    source_options: Mapping[str, Any] | None = None,
    echo: Callable[[str], Any] = lambda _msg: None,
) -> str:
    """Poll ``source`` and segment series once they have stopped changing, until stopped.

    Args:
        source: A folder or ``dicomweb:URL``.
        out_dir: The batch output folder.
        run_batch: Runs one batch with the given scan filter (e.g. :func:`~medseg.batch.runner.run_prediction`
            with everything else bound).
        settings: Quiet period and poll interval.
        scan_filter: Which series to keep (modality, description, minimum slices).
        source_options: The scan source's options (selection, credentials).
        echo: Where to print progress lines.

    Returns:
        The name of the signal that stopped the watch.

    Raises:
        ConfigError: A source that refuses our credentials or cannot be watched.
    """
    base = scan_filter or ScanFilter()
    opened = open_scan_source(source, options=source_options)
    if isinstance(opened, FolderSource) and not Path(opened.location).is_dir():
        msg = f"watched source must be a folder or dicomweb:URL, got {opened.location}"
        raise ConfigError(msg)

    def poll() -> dict[str, Hashable]:
        if isinstance(opened, FolderSource):
            return folder_states(Path(opened.location))
        return archive_states(opened)

    out = Path(out_dir)
    readiness = Readiness(settings.quiet_s)
    processed: dict[str, Hashable] = {}
    stop = _Stop()
    with _signals(stop):
        while not stop.event.is_set():
            try:
                states = poll()
            except InputError as exc:  # the archive away for a while: keep watching
                echo(f"watch: {exc}")
                states = {}
            ready = readiness.update(states)
            todo = sorted(k for k in ready if processed.get(k) != states[k])
            if todo and not stop.event.is_set():
                echo(f"watch: {len(todo)} series ready")
                keep = ReadySeries(
                    base.modalities, base.description, base.min_slices, frozenset(ready), settings.quiet_s
                )
                try:
                    stop.in_batch = True
                    run_batch(keep)
                except WatchStopped:
                    break
                except InputError as exc:  # said once per change of the series, not every poll
                    echo(f"watch: batch not run: {exc}")
                finally:
                    stop.in_batch = False
                processed.update({k: states[k] for k in ready})
            stop.event.wait(settings.poll_s)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # a write abandoned by the stop
        shutil.rmtree(stale, ignore_errors=True)
    if isinstance(opened, contextlib.AbstractContextManager):
        opened.__exit__(None, None, None)
    return stop.signal_name or "stop"
