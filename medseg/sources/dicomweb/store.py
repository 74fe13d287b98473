"""The ``dicomweb`` destination: STOW-RS of a finished case's DICOM results, never twice.

What is sent: the case's DICOM SEG (``segmentation.dcm``), and its RTSTRUCT and secondary captures
when those exports are on. Their UIDs are derived from the source series, the model and the result
(see :mod:`medseg.export.dicom_seg`), so before storing, each SOPInstanceUID is looked up with QIDO-RS:
an object already there (stored by an earlier run that crashed before recording it, or by another
worker sharing the archive) is not sent again. The outcome, with the stored Study/Series/SOP UIDs
(hashed unless opted in) and the server's answer, is kept in the case's ``stored.json`` (owned here)
and returned for the manifest (the batch runner also flags a failed store on the review page); a
failed store is retried by the next run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.io.atomic import atomic_write_text
from medseg.sources.dicomweb.connection import Connection, describe_failure, open_connection, raise_for
from medseg.sources.dicomweb.source import uid_label

STORED_FILE = "stored.json"
SENT_FILES = ("segmentation.dcm", "rtstruct.dcm", "secondary_capture/*.dcm")
_FAILED_SOPS, _REFERENCED_SOPS, _FAILURE_REASON = 0x00081198, 0x00081199, 0x00081197


def dicom_results(case_dir: Path) -> list[Path]:
    """The DICOM objects of a case folder that a destination receives, in a fixed order."""
    found: list[Path] = []
    for pattern in SENT_FILES:
        found += sorted(case_dir.glob(pattern))
    return found


def _answer(response: Any) -> dict[str, int]:
    """Counts from a STOW-RS response dataset: stored and failed instances."""
    if response is None:
        return {"stored": 0, "failed": 0}
    referenced = response.get(_REFERENCED_SOPS)
    failed = response.get(_FAILED_SOPS)
    return {
        "stored": len(referenced.value) if referenced else 0,
        "failed": len(failed.value) if failed else 0,
    }


@dataclass
class DicomwebDestination:
    """STOW-RS to a DICOMweb archive.

    Attributes:
        connection: The server.
        record_uids: Record UIDs as they are (default: hashes).
    """

    connection: Connection
    record_uids: bool = False

    location: str = field(default="", init=False)  # the archive's URL without credentials

    def __post_init__(self) -> None:
        self.location = f"dicomweb:{self.connection.public}"

    def check(self) -> None:
        """One cheap QIDO-RS request: the server answers and accepts our credentials.

        Raises:
            ConfigError: Credentials or TLS refused.
            InputError: The server unreachable.
        """
        import requests

        try:
            self.connection.client().search_for_studies(limit=1, fields=["StudyInstanceUID"])
        except requests.RequestException as exc:
            raise_for(exc, self.connection)

    def _previous(self, case_dir: Path, sops: list[str]) -> dict[str, Any] | None:
        try:
            record = json.loads((case_dir / STORED_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        labels = [uid_label(s, self.record_uids) for s in sops]
        same = record.get("destination") == self.connection.public and record.get("status") == "stored"
        return record if same and [i.get("sop") for i in record.get("instances", [])] == labels else None

    def store(self, case_dir: Path) -> dict[str, Any]:
        """Send the case's DICOM results that the archive does not hold yet; never raises.

        Args:
            case_dir: A finished case's output folder.

        Returns:
            The record: ``destination``, ``status`` (``stored``, ``failed`` or ``nothing to store``),
            per object its (hashed) Study/Series/SOP UIDs and the server's answer, and ``error``.
        """
        import pydicom
        import requests

        files = dicom_results(case_dir)
        record: dict[str, Any] = {"destination": self.connection.public, "instances": [], "error": None}
        if not files:
            return {**record, "status": "nothing to store"}
        datasets = [pydicom.dcmread(f) for f in files]
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        earlier = self._previous(case_dir, sops)
        if earlier is not None:
            return earlier
        client = self.connection.client()
        to_send = []
        try:
            for path, ds in zip(files, datasets, strict=True):
                item = {
                    "file": str(path.relative_to(case_dir)),
                    "study": uid_label(str(ds.StudyInstanceUID), self.record_uids),
                    "series": uid_label(str(ds.SeriesInstanceUID), self.record_uids),
                    "sop": uid_label(str(ds.SOPInstanceUID), self.record_uids),
                }
                there = client.search_for_instances(
                    str(ds.StudyInstanceUID), search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)}
                )
                item["answer"] = "already on the server" if there else "sent"
                record["instances"].append(item)
                if not there:
                    to_send.append(ds)
            if to_send:
                response = client.store_instances(
                    to_send, study_instance_uid=str(to_send[0].StudyInstanceUID)
                )
                counts = _answer(response)
                record["server"] = {"http_status": 200, **counts}
                if counts["failed"]:
                    record["error"] = f"the server rejected {counts['failed']} of {len(to_send)} object(s)"
        except requests.RequestException as exc:
            record["error"] = describe_failure(exc, self.connection)
            response = getattr(exc, "response", None)
            if response is not None:
                record["server"] = {"http_status": response.status_code}
        record["status"] = "failed" if record["error"] else "stored"
        atomic_write_text(case_dir / STORED_FILE, json.dumps(record, indent=1))
        return record


def open_dicomweb_destination(location: str, options: Mapping[str, Any]) -> DicomwebDestination:
    """Open ``dicomweb:URL`` as a destination (``store_credentials``/``credentials``, ``ca_bundle``).

    Raises:
        ConfigError: A bad URL or credentials, or the server refusing them.
        InputError: The server unreachable.
    """
    destination = DicomwebDestination(
        open_connection(location, options, prefix="store_"), bool(options.get("record_uids", False))
    )
    destination.check()
    return destination
