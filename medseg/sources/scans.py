"""Scan sources: where the batch's scans come from, by scheme.

The batch's input is ``SCHEME:LOCATION`` for a registered scan source (an archive reached over the
network, say), or a local file or folder (the ``folder`` source). A source lists the scans it holds
(:meth:`ScanSource.discover`) and makes each one readable as local files while it is segmented
(:meth:`ScanSource.fetch`, a context manager that cleans up after itself), so the batch runner's
manifest, resume and failure isolation are the same for every source.

Examples:
    >>> source = open_scan_source("scans/")
    >>> type(source).__name__
    'FolderSource'
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medseg.errors import ConfigError, choice_error
from medseg.sources.folder import Discovery, Scan, ScanFilter, discover

FOLDER_SCHEME = "folder"
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):(.+)$")
_BUILTIN = {"dicomweb": "medseg.sources.dicomweb"}  # sources imported when first named


@runtime_checkable
class ScanSource(Protocol):
    """A place that holds scans."""

    location: str

    def discover(self, scan_filter: ScanFilter | None = None) -> Discovery:
        """The scans to process (sorted by case id) and what was skipped, with reasons."""
        ...

    def fetch(self, scan: Scan) -> contextlib.AbstractContextManager[Scan]:
        """The scan readable from local files while the context is open (removed afterwards)."""
        ...


class FolderSource:
    """Scans in a local file or folder: NIfTI/NRRD/MHA files and DICOM series (see :func:`discover`).

    Args:
        location: A scan file, a DICOM series folder or a folder of scans.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)

    def discover(self, scan_filter: ScanFilter | None = None) -> Discovery:
        """The scans under the folder, recursively."""
        return discover(self.location, scan_filter)

    @contextlib.contextmanager
    def fetch(self, scan: Scan) -> Iterator[Scan]:
        """The scan itself: its files are already local."""
        yield scan


ScanSourceFactory = Callable[..., ScanSource]
"""Called as ``factory(location, options=...)``; returns the opened source."""

SCAN_SOURCES: dict[str, ScanSourceFactory] = {FOLDER_SCHEME: lambda location, options: FolderSource(location)}


def register_scan_source(scheme: str) -> Callable[[ScanSourceFactory], ScanSourceFactory]:
    """Register a scan source factory under a scheme (a decorator).

    Args:
        scheme: The prefix of batch inputs it opens (``scheme:LOCATION``).

    Returns:
        The decorator, which returns the factory unchanged.
    """

    def decorate(factory: ScanSourceFactory) -> ScanSourceFactory:
        SCAN_SOURCES[scheme] = factory
        return factory

    return decorate


def open_scan_source(source: str | Path, *, options: Mapping[str, Any] | None = None) -> ScanSource:
    """Open the scan source that ``source`` names.

    Args:
        source: ``SCHEME:LOCATION``, or a local path (which may itself contain a colon: a path that
            exists is always a folder source).
        options: Source-specific settings (queries, credentials files, ...).

    Returns:
        The opened :class:`ScanSource`.

    Raises:
        ConfigError: An unknown scheme.
    """
    text = str(source)
    match = _SCHEME.match(text)
    if isinstance(source, Path) or match is None or Path(text).exists():
        return FolderSource(text)
    scheme, location = match.group(1), match.group(2)
    if scheme in _BUILTIN and scheme not in SCAN_SOURCES:
        importlib.import_module(_BUILTIN[scheme])  # registers itself
    if scheme not in SCAN_SOURCES:
        raise ConfigError(choice_error("scan source", scheme, SCAN_SOURCES))
    return SCAN_SOURCES[scheme](location, options=dict(options or {}))
