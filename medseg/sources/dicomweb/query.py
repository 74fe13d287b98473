"""QIDO-RS: which series a selection names, with what resume and watch mode need to know of each.

A selection is a list of studies, of series, or QIDO-RS filters (``KEY=VALUE``). Study-level keys
(``StudyDate``, ``ModalitiesInStudy``, ...) query studies first; the others filter their series.
Series of non-image modalities (SR, PR, KO, SEG, RT objects, ...) are reported with a reason instead
of being listed.

Examples:
    >>> parse_query(["StudyDate=20240101-", "Modality=CT"])
    (('StudyDate', '20240101-'), ('Modality', 'CT'))
    >>> sop_list_hash("1.2", ["1.2.3", "1.2.2"]) == sop_list_hash("1.2", ["1.2.2", "1.2.3"])
    True
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from medseg.errors import ConfigError

NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "PR": "presentation state",
    "KO": "key object selection",
    "SEG": "segmentation",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTDOSE": "RT dose",
    "RTRECORD": "RT treatment record",
    "REG": "registration",
    "DOC": "encapsulated document",
    "FID": "fiducials",
    "AU": "audio",
    "ECG": "waveform",
}
STUDY_KEYS = {
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
}
SERIES_FIELDS = ("Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*$|^[0-9A-Fa-f]{8}$")


def parse_query(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings as pairs.

    Raises:
        ConfigError: An item without ``=`` or with a key that is not a DICOM keyword or tag.
    """
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key.strip()):
            msg = f"--query must be KEY=VALUE with a DICOM keyword as KEY (StudyDate=20240101-), got {item!r}"
            raise ConfigError(msg)
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def sop_list_hash(series_uid: str, sop_uids: Iterable[str]) -> str:
    """A hash of a series' SOPInstanceUID list (order-free): changes when an instance comes or goes."""
    h = hashlib.sha256(series_uid.encode())
    for uid in sorted(set(sop_uids)):
        h.update(b"|" + uid.encode())
    return h.hexdigest()[:24]


def _value(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


@dataclass(frozen=True)
class RemoteSeries:
    """One series as QIDO-RS lists it.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality.
        description: SeriesDescription.
        instances: NumberOfSeriesRelatedInstances (``-1`` when the server does not say).
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    instances: int = -1

    @classmethod
    def from_qido(cls, item: dict[str, Any], study_uid: str = "") -> RemoteSeries:
        """From one QIDO-RS series result (DICOM JSON)."""
        count = _value(item, "00201209", -1)
        return cls(
            study_uid=str(_value(item, "0020000D", study_uid) or study_uid),
            series_uid=str(_value(item, "0020000E")),
            modality=str(_value(item, "00080060")),
            description=str(_value(item, "0008103E")),
            instances=int(count) if str(count).lstrip("-").isdigit() else -1,
        )

    def reason_not_image(self) -> str | None:
        """Why this series holds nothing to segment (a non-image modality), or ``None``."""
        kind = NON_IMAGE_MODALITIES.get(self.modality.upper())
        return None if kind is None else f"DICOM {self.modality} series ({kind}): no image pixels to segment"


def list_series(
    client: Any,
    *,
    studies: Sequence[str] = (),
    series: Sequence[str] = (),
    query: Sequence[tuple[str, str]] = (),
) -> list[RemoteSeries]:
    """The series a selection names (each once), in the server's order.

    Args:
        client: A ``DICOMwebClient``.
        studies: StudyInstanceUIDs: every series of these studies.
        series: SeriesInstanceUIDs.
        query: QIDO-RS filters; study-level keys select studies, the others filter series.

    Returns:
        The :class:`RemoteSeries` found (with ``studies``/``series``, only those; with nothing, all).

    Raises:
        requests.RequestException: The server cannot be reached or refuses.
    """
    study_filters = {k: v for k, v in query if k in STUDY_KEYS}
    series_filters = {k: v for k, v in query if k not in STUDY_KEYS}
    found: list[RemoteSeries] = []
    if study_filters:
        hits = client.search_for_studies(search_filters=study_filters, fields=["StudyInstanceUID"])
        studies = [*studies, *(str(_value(h, "0020000D")) for h in hits)]
    for study in dict.fromkeys(studies):
        items = client.search_for_series(study, fields=list(SERIES_FIELDS), search_filters=series_filters)
        found += [RemoteSeries.from_qido(item, study) for item in items]
    for uid in dict.fromkeys(series):
        filters = {**series_filters, "SeriesInstanceUID": uid}
        items = client.search_for_series(fields=["StudyInstanceUID", *SERIES_FIELDS], search_filters=filters)
        found += [RemoteSeries.from_qido(item) for item in items]
    if not studies and not series and not study_filters:
        items = client.search_for_series(
            fields=["StudyInstanceUID", *SERIES_FIELDS], search_filters=series_filters
        )
        found += [RemoteSeries.from_qido(item) for item in items]
    unique = {s.series_uid: s for s in found if s.series_uid}
    return list(unique.values())


def list_instances(client: Any, series: RemoteSeries) -> list[str]:
    """The SOPInstanceUIDs of a series (QIDO-RS instance query)."""
    items = client.search_for_instances(series.study_uid, series.series_uid, fields=["SOPInstanceUID"])
    return [str(_value(item, "00080018")) for item in items if _value(item, "00080018")]
