"""Load images through MONAI ``LoadImage`` with medseg's readers registered first."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged

from medseg.errors import GeometryError, InputError
from medseg.io.limits import check_inputs
from medseg.io.readers import DicomSeriesReader, NiftiReader, SimpleITKReader

GRID_ATOL_MM = 1e-3

# MONAI builds its optional GPU DICOM reader with every LoadImage and says, each time, that the
# GPU codec is missing; on a CPU machine that is expected, not news.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec.*", category=UserWarning)


def _readers(series_uid: str | None, min_slices: int, allow_tilt: bool) -> list[Any]:
    # LoadImage tries the readers it was given last-first, before MONAI's own.
    return [
        DicomSeriesReader(series_uid=series_uid, min_slices=min_slices, allow_tilt=allow_tilt),
        SimpleITKReader(),
        NiftiReader(),
    ]


def make_load_transform(
    keys: Sequence[str] | None = None,
    *,
    series_uid: str | None = None,
    min_slices: int = 3,
    allow_tilt: bool = False,
    dtype: Any = None,
) -> LoadImage | LoadImaged:
    """A MONAI load transform with medseg's DICOM, SimpleITK and NIfTI readers.

    Args:
        keys: Dictionary keys to load (``LoadImaged``); ``None`` gives an array transform.
        series_uid: Which DICOM series to read where a folder holds several.
        min_slices: Fewest DICOM slices accepted as a volume.
        allow_tilt: Accept gantry tilt in DICOM series (sheared affine).
        dtype: Output dtype; ``None`` keeps the file's own (int16 CT stays int16).

    Returns:
        ``LoadImage`` or ``LoadImaged`` giving channel-first ``MetaTensor`` images.
    """
    readers = _readers(series_uid, min_slices, allow_tilt)
    loader: LoadImage | LoadImaged
    if keys is None:
        inner = loader = LoadImage(reader=readers, image_only=True, ensure_channel_first=True, dtype=dtype)
    else:
        loader = LoadImaged(
            keys=list(keys),
            reader=readers,  # type: ignore[arg-type]  # MONAI's annotation omits the list it accepts
            image_only=True,
            ensure_channel_first=True,
            dtype=dtype,
        )
        inner = loader._loader
    # Given readers, MONAI tries each in turn and swallows their errors; choosing by suffix instead
    # lets our specific errors (GeometryError, ...) reach the caller.
    inner.auto_select = True
    return loader


@functools.lru_cache(maxsize=8)
def _cached_loader(series_uid: str | None, min_slices: int, allow_tilt: bool, dtype: Any) -> LoadImage:
    # Building a LoadImage instantiates every MONAI reader: build one per setting, once.
    loader = make_load_transform(
        series_uid=series_uid, min_slices=min_slices, allow_tilt=allow_tilt, dtype=dtype
    )
    assert isinstance(loader, LoadImage)  # no keys: the array transform
    return loader


def _check_path(path: Path) -> None:
    if not path.exists():
        msg = f"image path must exist, got missing {path}"
        raise InputError(msg)
    if path.is_file() and path.stat().st_size == 0:
        msg = f"{path}: image file must not be empty, got 0 bytes"
        raise InputError(msg)


def load_image(
    path: str | Path | Sequence[str | Path],
    *,
    series_uid: str | None = None,
    min_slices: int = 3,
    allow_tilt: bool = False,
    dtype: Any = None,
) -> MetaTensor:
    """Load one image (DICOM series folder, NIfTI, NRRD, MHA, ...) as ``(C, X, Y, Z)``.

    Args:
        path: A file, a folder holding a DICOM series, or the files of one DICOM series.
        series_uid: Which DICOM series to read where a folder holds several.
        min_slices: Fewest DICOM slices accepted as a volume.
        allow_tilt: Accept gantry tilt in DICOM series.
        dtype: Output dtype; ``None`` keeps the file's own.

    Returns:
        A channel-first ``MetaTensor`` whose ``affine`` is RAS+.

    Raises:
        InputError: Missing, empty or unreadable input.
        GeometryError: A DICOM series that is not a valid volume.
    """
    loader = _cached_loader(series_uid, min_slices, allow_tilt, dtype)
    if isinstance(path, (str, Path)):
        path = Path(path)
        _check_path(path)
        check_inputs([path])  # readable, and no larger than the memory budget by its header
        call = functools.partial(loader, str(path))
    else:  # the files of one DICOM series, whatever their names
        files = [Path(p) for p in path]
        for f in files:
            _check_path(f)
        check_inputs(files)  # readable, and no larger than the memory budget by their headers
        dicom = next(r for r in loader.readers if isinstance(r, DicomSeriesReader))
        call = functools.partial(loader, [str(f) for f in files], reader=dicom)
        path = files[0].parent if files else Path()
    try:
        return call()
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # readers of third parties raise anything
        msg = f"{path}: must be a readable image, got {type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise InputError(msg) from exc


def same_grid(a: MetaTensor, b: MetaTensor, atol: float = GRID_ATOL_MM) -> bool:
    """Whether two images share one voxel grid (spatial shape and affine).

    Args:
        a: First image, channel first.
        b: Second image, channel first.
        atol: Tolerance on the affine, in millimetres.

    Returns:
        True when every voxel of one sits on a voxel of the other.
    """
    return a.shape[1:] == b.shape[1:] and np.allclose(
        np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64), atol=atol
    )


def load_case(paths: Sequence[str | Path], **kwargs: Any) -> MetaTensor:
    """Load several co-registered channels of one case and stack them as ``(C, X, Y, Z)``.

    Args:
        paths: One image per channel.
        **kwargs: Passed to :func:`load_image`.

    Returns:
        The stacked image with the first channel's meta data.

    Raises:
        GeometryError: If the channels are not on one voxel grid.
    """
    images = [load_image(p, **kwargs) for p in paths]
    first = images[0]
    for path, img in zip(paths[1:], images[1:]):
        if not same_grid(first, img):
            msg = (
                f"channels of a case must share one voxel grid, got {paths[0]} with shape "
                f"{tuple(first.shape[1:])} and {path} with shape {tuple(img.shape[1:])} "
                f"(or different affines)"
            )
            raise GeometryError(msg)
    if len(images) == 1:
        return first
    import torch

    dtype = torch.promote_types(*(img.dtype for img in images[:2]))
    for img in images[2:]:
        dtype = torch.promote_types(dtype, img.dtype)
    stacked = torch.cat([img.as_tensor().to(dtype) for img in images], dim=0)
    return MetaTensor(stacked, meta=first.meta)
