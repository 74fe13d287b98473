"""Destinations: where a batch sends each scan's DICOM results after it succeeds, by scheme.

``--store-to SCHEME:LOCATION`` opens a registered destination (``dicomweb:URL`` sends DICOM SEG,
RTSTRUCT and secondary captures with STOW-RS). A destination is asked once per finished case; it
returns a record for the manifest and never raises for one case's failure, so a rejected object is a
recorded export error, retried by the next run, and never a lost label map.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medseg.errors import ConfigError, choice_error

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):(.+)$")


@runtime_checkable
class Destination(Protocol):
    """A place that receives each finished case's DICOM results."""

    location: str

    def store(self, case_dir: Path) -> dict[str, Any]:
        """Send the case's results; a JSON-ready record (``status`` ``stored`` or ``failed``)."""
        ...


DestinationFactory = Callable[..., Destination]
DESTINATIONS: dict[str, DestinationFactory] = {}


def register_destination(scheme: str) -> Callable[[DestinationFactory], DestinationFactory]:
    """Register a destination factory (called as ``factory(location, options=...)``) under a scheme."""

    def decorate(factory: DestinationFactory) -> DestinationFactory:
        DESTINATIONS[scheme] = factory
        return factory

    return decorate


def open_destination(target: str, *, options: Mapping[str, Any] | None = None) -> Destination:
    """Open the destination ``SCHEME:LOCATION`` names.

    Raises:
        ConfigError: No scheme, an unknown scheme, or a destination that refuses us.

    Examples:
        >>> open_destination("ftp:host")
        Traceback (most recent call last):
        ...
        medseg.errors.ConfigError: destination must be one of ['dicomweb'], got 'ftp'
    """
    if "dicomweb" not in DESTINATIONS:
        import medseg.sources.dicomweb  # noqa: F401  (registers the built-in destination)
    match = _SCHEME.match(target)
    if match is None:
        msg = f"--store-to must be SCHEME:LOCATION (e.g. dicomweb:https://host/dicom-web), got {target!r}"
        raise ConfigError(msg)
    scheme, location = match.group(1), match.group(2)
    if scheme not in DESTINATIONS:
        raise ConfigError(choice_error("destination", scheme, DESTINATIONS))
    return DESTINATIONS[scheme](location, options=dict(options or {}))
