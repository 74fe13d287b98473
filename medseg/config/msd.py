"""Import a Medical Segmentation Decathlon / nnU-Net ``dataset.json`` as a :class:`DatasetSpec`.

Both layouts are understood:

* MSD and nnU-Net v1: ``modality`` (index → name), ``labels`` (value → name) and a ``training``
  list of ``{"image", "label"}``; an image path may name one (possibly 4D) file, or, as in
  nnU-Net v1's ``imagesTr``, stand for ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...
* nnU-Net v2: ``channel_names`` (index → name), ``labels`` (name → value), ``file_ending``;
  cases are the files ``imagesTr/<case>_0000<file_ending>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medseg.config.base import read_json, validate
from medseg.config.spec import SPEC_READERS, DatasetSpec, Modality
from medseg.errors import ConfigError

_MR_NAMES = re.compile(r"^(mri?|t1.*|t2.*|flair|adc|dwi|pd|swi|mra|t1gd|t1ce)$", re.IGNORECASE)


def modality_from_name(name: str) -> Modality:
    """Map a channel name from a dataset.json to a modality.

    Args:
        name: For example ``"CT"``, ``"MRI"``, ``"T2"`` or ``"FLAIR"``.

    Returns:
        The modality (anything unknown is ``OTHER``, which is z-scored like MR).

    Examples:
        >>> modality_from_name("MRI").value, modality_from_name("ct").value, modality_from_name("US").value
        ('MR', 'CT', 'US')
    """
    text = name.strip()
    if text.upper() == "CT":
        return Modality.CT
    if text.upper() in ("PT", "PET"):
        return Modality.PT
    if text.upper() == "US":
        return Modality.US
    if _MR_NAMES.match(text):
        return Modality.MR
    return Modality.OTHER


def _channels(index_to_name: dict[str, str], path: Path, field: str) -> list[dict[str, Any]]:
    try:
        ordered = sorted(index_to_name.items(), key=lambda kv: int(kv[0]))
    except ValueError as exc:
        msg = f"{path}: field '{field}' must map channel indices (0, 1, ...) to names, got {index_to_name}"
        raise ConfigError(msg) from exc
    names = [n for _, n in ordered]
    unique = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    return [{"name": u, "modality": modality_from_name(n)} for u, n in zip(unique, names)]


def _strip(p: str) -> str:
    return p[2:] if p.startswith("./") else p


def _nifti_stem(p: str) -> tuple[str, str]:
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if p.endswith(ending):
            return p[: -len(ending)], ending
    return p, ""


def spec_from_dataset_json(path: str | Path) -> DatasetSpec:
    """Read a ``dataset.json`` (MSD, nnU-Net v1 or v2) into a spec whose data root is its folder.

    Args:
        path: The ``dataset.json`` file.

    Returns:
        The spec (``data_root`` is ``"."``: paths are relative to the JSON's folder).

    Raises:
        ConfigError: If the file is missing, is not JSON, or lacks the fields of either layout.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"dataset.json must exist, got missing path {path}"
        raise ConfigError(msg)
    data = read_json(path)
    root = path.parent
    name = str(data.get("name") or root.name)
    description = str(data.get("description", ""))

    if "channel_names" in data:  # nnU-Net v2
        channels = _channels(data["channel_names"], path, "channel_names")
        labels = {str(k): int(v) for k, v in data.get("labels", {}).items() if not isinstance(v, list)}
        ending = str(data.get("file_ending", ".nii.gz"))
        patterns = {
            "images": [f"imagesTr/{{case}}_{i:04d}{ending}" for i in range(len(channels))],
            "label": f"labelsTr/{{case}}{ending}",
        }
        raw = {"name": name, "description": description, "channels": channels, "labels": labels}
        raw["case_patterns"] = patterns
        return validate(DatasetSpec, raw, str(path))

    for key in ("modality", "labels", "training"):
        if key not in data:
            msg = f"{path}: field '{key}' is required in an MSD/nnU-Net v1 dataset.json, got none"
            raise ConfigError(msg)
    channels = _channels(data["modality"], path, "modality")
    try:
        labels = {str(v): int(k) for k, v in data["labels"].items()}
    except ValueError as exc:
        msg = f"{path}: field 'labels' must map integer values to names, got {data['labels']}"
        raise ConfigError(msg) from exc
    cases = []
    for i, entry in enumerate(data["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            msg = f"{path}: field 'training.{i}' must be a mapping with 'image' and 'label', got {entry!r}"
            raise ConfigError(msg)
        image = _strip(str(entry["image"]))
        stem, ending = _nifti_stem(image)
        if (root / image).exists() or (len(channels) == 1 and not (root / f"{stem}_0000{ending}").exists()):
            images = [image]
        else:
            images = [f"{stem}_{c:04d}{ending}" for c in range(len(channels))]
        label = _strip(str(entry["label"])) if entry.get("label") else None
        cases.append({"id": Path(stem).name, "images": images, "label": label})
    raw = {"name": name, "description": description, "channels": channels, "labels": labels, "cases": cases}
    return validate(DatasetSpec, raw, str(path))


SPEC_READERS[".json"] = spec_from_dataset_json
