"""The built-in model source: medseg bundle folders and MLflow ``runs:/`` / ``models:/`` URIs.

Importing this module registers :func:`load_medseg_bundles` under the ``medseg`` scheme.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medseg.errors import ConfigError
from medseg.sources.models import DEFAULT_SCHEME, register_model_source
from medseg.tiling.runtime import OPTION_NAMES, InferenceOptions

OPTIONS = ("crf", "postprocess", "refine", *OPTION_NAMES)
"""What ``options`` may set: ``crf`` / ``postprocess`` switch refinement on or off (``None``: as the
bundle says); ``refine`` replaces the bundle's refinement settings (a ``RefineConfig``);
``precision``, ``batch_size``, ``memory_format`` and ``tuning`` override the bundle's inference
settings (see :class:`~medseg.tiling.runtime.InferenceOptions`)."""


@register_model_source(DEFAULT_SCHEME)
def load_medseg_bundles(locations: Sequence[str], *, device: str = "cpu", options: Mapping[str, Any]) -> Any:
    """Load medseg bundles (several are an ensemble) into a :class:`~medseg.pipeline.Predictor`.

    Args:
        locations: Bundle folders or MLflow URIs.
        device: Where the network runs.
        options: See :data:`OPTIONS` (bundles imported from nnU-Net take the nnunet source's).

    Returns:
        The :class:`~medseg.pipeline.Predictor`.

    Raises:
        ConfigError: An option this source does not know.
    """
    from medseg.pipeline import Predictor
    from medseg.sources.nnunet.manifest import is_nnunet_bundle
    from medseg.tracking.models import is_mlflow_uri, resolve_bundle_uri

    local = [resolve_bundle_uri(str(p)) if is_mlflow_uri(str(p)) else p for p in locations]
    if local and all(is_nnunet_bundle(p) for p in local):  # imported by `medseg import nnunet`
        from medseg.sources.nnunet import load_nnunet_model

        return load_nnunet_model([str(p) for p in local], device=device, options=options)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        msg = f"medseg model options must be among {list(OPTIONS)}, got {unknown}"
        raise ConfigError(msg)
    inference = InferenceOptions.from_mapping(options)
    predictor = Predictor.load_bundles(
        *local, device=device, refine=options.get("refine"), inference=inference
    )
    return predictor.switched(crf=options.get("crf"), postprocess=options.get("postprocess"))
