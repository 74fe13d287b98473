"""Model bundles in MLflow: resolve ``runs:/``/``models:/`` URIs to a local bundle; register bundles."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from medseg.errors import ConfigError
from medseg.tracking.store import mlflow_module, tracking_uri

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def is_mlflow_uri(text: str) -> bool:
    """Whether ``text`` is an MLflow ``runs:/`` or ``models:/`` URI (not a local path)."""
    return str(text).startswith(("runs:/", "models:/"))


def _client(uri: str):
    return mlflow_module().MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_bundle_uri(model: str, cache_dir: str | Path | None = None, uri: str | None = None) -> Path:
    """Download the bundle behind an MLflow URI (once; later calls reuse the copy).

    Args:
        model: ``runs:/<run_id>/bundle``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
        cache_dir: Where downloads are kept (default ``~/.cache/medseg/models``).
        uri: Tracking (and registry) URI; default :func:`tracking_uri`.

    Returns:
        The local bundle folder.

    Raises:
        ConfigError: For an unknown run, model, version or alias.
    """
    mlflow = mlflow_module()
    uri = uri or tracking_uri()
    source = model
    if model.startswith("models:/"):
        m = _MODEL_URI.match(model)
        if m is None:
            msg = f"model URI must be models:/<name>/<version> or models:/<name>@<alias>, got {model!r}"
            raise ConfigError(msg)
        client = _client(uri)
        try:
            if m.group("version"):
                version = client.get_model_version(m.group("name"), m.group("version"))
            else:
                version = client.get_model_version_by_alias(m.group("name"), m.group("alias"))
        except mlflow.exceptions.MlflowException as exc:
            msg = f"model URI must name a registered model version in {uri}, got {model!r}"
            raise ConfigError(msg) from exc
        source = version.source
    key = hashlib.sha256(f"{uri}|{source}".encode()).hexdigest()[:16]
    dest = Path(cache_dir or Path.home() / ".cache" / "medseg" / "models") / key
    if (dest / "bundle.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=uri)
    except mlflow.exceptions.MlflowException as exc:
        msg = f"model URI must point at a logged bundle in {uri}, got {model!r}: {exc}"
        raise ConfigError(msg) from exc
    local_path = Path(local)
    if local_path != dest and (local_path / "bundle.json").is_file():
        for f in local_path.iterdir():
            f.replace(dest / f.name)
    if not (dest / "bundle.json").is_file():
        msg = f"model URI must point at a folder holding bundle.json, got {model!r} ({source})"
        raise ConfigError(msg)
    return dest


def register_bundle(run_id: str, name: str, alias: str | None = None, uri: str | None = None) -> str:
    """Register the bundle logged by a training run in the MLflow Model Registry.

    Args:
        run_id: The training run (its ``bundle`` artifact folder is registered).
        name: Registered model name (created if missing).
        alias: Optional alias to point at the new version (e.g. ``champion``).
        uri: Tracking (and registry) URI.

    Returns:
        The new version number, as a string.
    """
    mlflow = mlflow_module()
    uri = uri or tracking_uri()
    client = _client(uri)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={"medseg.kind": "bundle"})
    version = client.create_model_version(name, source=f"runs:/{run_id}/bundle", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
