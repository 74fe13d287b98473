"""Frozen, validated configs: data specs (``data_specs/*.yaml``) and pipelines (``pipelines/*.yaml``).

Importing the package registers the data spec readers of other formats (``dataset.json``).
"""

from medseg.config import msd as _msd  # noqa: F401  (registers the dataset.json reader)
