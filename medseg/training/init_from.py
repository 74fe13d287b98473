"""Start training from a trained bundle's weights (fine-tuning, e.g. on reviewers' corrections).

Only the weights are taken: the pipeline being trained decides the model, and the bundle's weights
must fit it exactly (same parameter names and shapes). Optimizer state, epochs and the MLflow run
start afresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medseg.errors import ConfigError


def load_initial_weights(network: torch.nn.Module, bundle: str | Path) -> str:
    """Copy a bundle's weights into ``network`` after checking that every tensor fits.

    Args:
        network: The freshly built network of the pipeline being trained.
        bundle: A model bundle folder (its weights' hash is checked on loading).

    Returns:
        The bundle's SHA-256 (to record where the weights came from).

    Raises:
        ConfigError: An unreadable bundle, or weights whose names or shapes differ from the network's.
    """
    from medseg.bundle import load_bundle

    source = load_bundle(bundle, device="cpu")
    theirs = source.network.state_dict()
    ours = network.state_dict()
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing or extra:
        msg = (
            f"--init-from {bundle}: weights must have the pipeline model's parameters, got "
            f"{len(missing)} missing (e.g. {missing[:2]}) and {len(extra)} unknown (e.g. {extra[:2]})"
        )
        raise ConfigError(msg)
    for key, value in ours.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            msg = (
                f"--init-from {bundle}: weight '{key}' must have shape {tuple(value.shape)}, "
                f"got {tuple(theirs[key].shape)} (another model or label count)"
            )
            raise ConfigError(msg)
    network.load_state_dict(theirs)
    return source.sha256
