"""DICOMweb archives as a scan source (``dicomweb:URL``) and as a destination (``--store-to dicomweb:URL``).

Modules: :mod:`~medseg.sources.dicomweb.connection` (URL, credentials, TLS, errors),
:mod:`~medseg.sources.dicomweb.query` (QIDO-RS), :mod:`~medseg.sources.dicomweb.retrieve` (WADO-RS into
private folders), :mod:`~medseg.sources.dicomweb.source` (the scan source),
:mod:`~medseg.sources.dicomweb.store` (STOW-RS). Out of scope for now: DIMSE (C-FIND, C-MOVE,
C-STORE; an Orthanc in front of such a PACS bridges it to DICOMweb) and multi-frame enhanced CT/MR
objects.
"""

from medseg.sources.destinations import register_destination
from medseg.sources.dicomweb.connection import Connection, Credentials, public_url, read_credentials
from medseg.sources.dicomweb.source import DicomwebSource, Selection, open_dicomweb_source
from medseg.sources.dicomweb.store import DicomwebDestination, open_dicomweb_destination
from medseg.sources.scans import register_scan_source

SCHEME = "dicomweb"
register_scan_source(SCHEME)(open_dicomweb_source)
register_destination(SCHEME)(open_dicomweb_destination)

__all__ = [
    "SCHEME",
    "Connection",
    "Credentials",
    "DicomwebDestination",
    "DicomwebSource",
    "Selection",
    "open_dicomweb_destination",
    "open_dicomweb_source",
    "public_url",
    "read_credentials",
]
