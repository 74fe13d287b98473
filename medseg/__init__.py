"""medseg: a medical image segmentation pipeline.

The pipeline's stages, in order, each a subpackage of its own::

    io → preprocess → tiling → models → (stitch, in tiling) → refine → export → tracking
"""

from medseg.errors import ConfigError, GeometryError, InputError, MedsegError

__version__ = "0.1.0"

__all__ = ["ConfigError", "GeometryError", "InputError", "MedsegError", "__version__"]
