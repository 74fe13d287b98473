"""The ``nnunet`` model source: trained nnU-Net v2 model folders (and their exported zips).

``--model nnunet:PATH`` runs the folder's configuration over scans with nnU-Net's own preprocessing,
sliding window, mirroring, fold ensembling and resampling back, reproduced in medseg (nnU-Net itself
is not needed; its network classes come from ``dynamic-network-architectures``: install
``medseg[nnunet]``). Options (``load_model(..., options=...)`` or the CLI): ``folds`` ("0,1,2";
default every fold present), ``checkpoint`` (final or best), ``mirroring`` (true/false),
``postprocessing`` (apply the folder's ``postprocessing.pkl``), ``step``, ``configuration`` (in a
zip of several), ``trainers`` (more trainer names to accept) and ``label_codes`` (a file of DICOM
codes per label name, for SEG).

Modules: :mod:`.plans` (plans and dataset records), :mod:`.folder` (folds, checkpoints, zips),
:mod:`.checkpoint` (weights-only loading), :mod:`.network` (allow-listed networks),
:mod:`.settings` (options), :mod:`.channels` (``_0000`` files), :mod:`.preprocess`,
:mod:`.resample`, :mod:`.sliding`, :mod:`.postprocess`, :mod:`.predictor` (the model) and
:mod:`.bundle` (``medseg import nnunet``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medseg.sources.models import register_model_source

SCHEME = "nnunet"


@register_model_source(SCHEME)
def load_nnunet_model(locations: Sequence[str], *, device: str = "cpu", options: Mapping[str, Any]) -> Any:
    """Load an nnU-Net model folder (see :func:`medseg.sources.nnunet.predictor.load_nnunet`)."""
    from medseg.sources.nnunet.predictor import load_nnunet

    return load_nnunet(locations, device=device, options=options)
