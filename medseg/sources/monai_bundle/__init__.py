"""MONAI bundles as a model source: ``--model monai-bundle:PATH``.

PATH is a bundle folder as the MONAI Model Zoo lays it out (``configs/metadata.json``,
``configs/inference.json`` or ``.yaml``, ``models/model.pt``). medseg builds the network from
``network_def``, runs the bundle's ``preprocessing`` and ``postprocessing`` transforms around its own
tiling engine with the ``inferer``'s windows, and hands the labels on the scan's own grid to its
writers, exports and tracking. Modules, in the order a bundle is read:

* :mod:`.layout`: the files, read as data, and their hashes;
* :mod:`.metadata`: channels and label names from ``network_data_format``;
* :mod:`.resolver`: the code-free subset of MONAI's config language (literals, ``@`` references,
  MONAI networks, transforms and inferers), everything else named and refused;
* :mod:`.sections`: the four sections medseg reads, built without or (trusted) with MONAI's parser;
* :mod:`.inferer`: the inferer's windows as medseg's tiling settings;
* :mod:`.postprocess`: the bundle's postprocessing, ending in labels on the source grid;
* :mod:`.model`: :class:`~medseg.sources.monai_bundle.model.MonaiBundleModel`.

Options (``load_model(..., options=...)``): ``trust_model_code`` (the CLI's
``--trust-model-code``) builds the config with MONAI's own ``ConfigParser``, which evaluates its
``$``-expressions as Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medseg.errors import ConfigError
from medseg.sources.models import register_model_source

SCHEME = "monai-bundle"
TRUST_OPTION = "trust_model_code"
OPTIONS = (TRUST_OPTION,)
"""What ``options`` may set: ``trust_model_code`` (build the config with MONAI's own parser)."""


@register_model_source(SCHEME)
def load_monai_bundle(locations: Sequence[str], *, device: str = "cpu", options: Mapping[str, Any]) -> Any:
    """Load one MONAI bundle folder.

    Args:
        locations: One bundle folder (MONAI bundles are not ensembled).
        device: Where the network runs.
        options: See :data:`OPTIONS` (refinement switches such as ``crf`` are medseg bundles' and
            are refused here).

    Returns:
        The :class:`~medseg.sources.monai_bundle.model.MonaiBundleModel`.

    Raises:
        ConfigError: Not exactly one folder, an option this source does not know, or a bundle medseg
            cannot run (naming the file).
    """
    from medseg.sources.monai_bundle.layout import find_bundle_files
    from medseg.sources.monai_bundle.model import MonaiBundleModel

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        msg = f"monai-bundle model options must be among {list(OPTIONS)}, got {unknown}"
        raise ConfigError(msg)
    if len(locations) != 1:
        msg = f"monai-bundle models must be one bundle folder (no ensembles), got {list(locations)}"
        raise ConfigError(msg)
    files = find_bundle_files(locations[0])
    return MonaiBundleModel(files, device=device, trust_code=bool(options.get(TRUST_OPTION, False)))


__all__ = ["OPTIONS", "SCHEME", "TRUST_OPTION", "load_monai_bundle"]
