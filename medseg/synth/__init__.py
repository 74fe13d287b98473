"""Synthetic data for tests and demos: phantoms with known labels, written as DICOM and NIfTI.

* :func:`make_phantom` draws one multi-label case (image, label map, oblique affine).
* :func:`write_dicom_series` and :func:`write_nifti` write a volume with exact geometry.
* :func:`generate_dataset` writes a whole data set with its ``spec.yaml``.
"""

from medseg.synth.dataset import generate_dataset
from medseg.synth.dicom_writer import dicom_reader_view, write_dicom_series, write_nifti
from medseg.synth.phantom import LABELS, make_phantom

__all__ = [
    "LABELS",
    "dicom_reader_view",
    "generate_dataset",
    "make_phantom",
    "write_dicom_series",
    "write_nifti",
]
