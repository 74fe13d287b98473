"""Load scans (DICOM series, NIfTI, NRRD, MHA) with exact patient geometry; write label maps.

Conventions used everywhere in medseg:

* A loaded image is a MONAI ``MetaTensor`` of shape ``(C, X, Y, Z)`` (channel first).
* Its ``affine`` maps voxel indices ``(i, j, k, 1)`` to world millimetres in **RAS+**
  (MONAI's default space; DICOM/ITK LPS is converted by negating the first two rows).
* For DICOM, ``i`` runs along a row (the first ImageOrientationPatient cosine), ``j`` down a
  column (the second cosine) and ``k`` along the slice normal, in the order of the slices'
  positions (never InstanceNumber).
* The meta dict keeps ``original_affine`` and ``spatial_shape`` of the file as loaded, so
  outputs can be written back on the source grid.
"""

from medseg.io.load import load_case, load_image, make_load_transform
from medseg.io.write import write_label_map, write_volume

__all__ = ["load_case", "load_image", "make_load_transform", "write_label_map", "write_volume"]
