"""Reaching a DICOMweb server: its URL, credentials, TLS, and errors worded for people.

Credentials never come from the command line: HTTP basic authentication from
``MEDSEG_DICOMWEB_USER`` and ``MEDSEG_DICOMWEB_PASSWORD``, or a bearer token from
``MEDSEG_DICOMWEB_TOKEN``, or a JSON file named with ``--credentials`` (``{"username": ...,
"password": ...}`` or ``{"token": ...}``). A URL that holds a user or password is refused. TLS
certificates are verified (against the system's CAs, or a bundle given with ``--ca-bundle``).

Examples:
    >>> public_url("https://pacs.example.org:8443/dicom-web/?x=1")
    'https://pacs.example.org:8443/dicom-web'
    >>> Credentials(username="ann", password="pw")
    Credentials(basic, user set)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from medseg.errors import ConfigError, InputError, optional_import

ENV_USER = "MEDSEG_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
TIMEOUT_S = (10.0, 120.0)  # connect, read
RETRIES = 3


@dataclass(frozen=True)
class Credentials:
    """HTTP basic credentials or a bearer token (their values never appear in ``repr``)."""

    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        if self.token:
            return "Credentials(bearer token set)"
        if self.username:
            return "Credentials(basic, user set)"
        return "Credentials(none)"

    @property
    def kind(self) -> str:
        """``bearer``, ``basic`` or ``none`` (what the manifest may say)."""
        return "bearer" if self.token else "basic" if self.username else "none"


def read_credentials(file: str | Path | None = None, env: Mapping[str, str] | None = None) -> Credentials:
    """Credentials from a JSON file, else from the environment, else none.

    Args:
        file: A JSON file ``{"username": ..., "password": ...}`` or ``{"token": ...}``.
        env: The environment (default ``os.environ``).

    Returns:
        The :class:`Credentials`.

    Raises:
        ConfigError: An unreadable or malformed file.

    Examples:
        >>> read_credentials(env={"MEDSEG_DICOMWEB_TOKEN": "abc"}).kind
        'bearer'
        >>> read_credentials(env={}).kind
        'none'
    """
    if file is not None:
        path = Path(file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            msg = f"credentials file must be readable JSON, got {type(exc).__name__} reading {path}"
            raise ConfigError(msg) from None
        if not isinstance(data, dict) or not (data.get("token") or data.get("username")):
            msg = (
                f'credentials file must hold {{"username", "password"}} or {{"token"}}, got neither in {path}'
            )
            raise ConfigError(msg)
        return Credentials(
            str(data.get("username", "")), str(data.get("password", "")), str(data.get("token", ""))
        )
    env = os.environ if env is None else env
    if env.get(ENV_TOKEN):
        return Credentials(token=env[ENV_TOKEN])
    if env.get(ENV_USER):
        return Credentials(env[ENV_USER], env.get(ENV_PASSWORD, ""))
    return Credentials()


def public_url(url: str) -> str:
    """The URL as recorded: scheme, host, port and path; no user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def check_url(url: str) -> str:
    """Validate a DICOMweb root URL given as ``dicomweb:URL``; returns it without a trailing slash.

    Raises:
        ConfigError: Not http(s), no host, or credentials inside the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        msg = f"DICOMweb URL must be http(s)://HOST[:PORT]/PATH, got {public_url(url) or url!r}"
        raise ConfigError(msg)
    if parts.username or parts.password:
        msg = (
            f"DICOMweb URL must not hold credentials, got a user in {public_url(url)}; set "
            f"{ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}, or pass --credentials FILE"
        )
        raise ConfigError(msg)
    return url.rstrip("/")


@dataclass(frozen=True)
class Connection:
    """Where a DICOMweb server is and how to reach it.

    Attributes:
        url: The DICOMweb root (``https://host/dicom-web``).
        credentials: Basic credentials or a bearer token.
        ca_bundle: A CA bundle to verify the server's certificate with (default: the system's).
    """

    url: str
    credentials: Credentials = Credentials()
    ca_bundle: Path | None = None

    @property
    def public(self) -> str:
        """The URL as it may be recorded."""
        return public_url(self.url)

    def session(self) -> Any:
        """A ``requests.Session`` with these credentials and TLS settings."""
        import requests

        session = requests.Session()
        session.verify = str(self.ca_bundle) if self.ca_bundle else True
        session.trust_env = False  # no proxy or .netrc credentials from the environment
        if self.credentials.token:
            session.headers["Authorization"] = f"Bearer {self.credentials.token}"
        elif self.credentials.username:
            session.auth = (self.credentials.username, self.credentials.password)
        return session

    def client(self, session: Any = None) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` on ``session`` (default: a new :meth:`session`)."""
        optional_import("dicomweb_client", "DICOMweb archives", "pacs")
        # their warnings repeat request URLs, which hold Study/Series UIDs; medseg reports failures itself
        for name in ("dicomweb_client", "retrying"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, session=session or self.session(), timeout=TIMEOUT_S)
        # a few quick retries (busy or briefly unreachable server), not a minute of back-off
        client.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=250)
        return client


def open_connection(url: str, options: Mapping[str, Any], prefix: str = "") -> Connection:
    """The :class:`Connection` for ``url`` and the source's or destination's options.

    Args:
        url: The DICOMweb root.
        options: ``credentials`` (a file) and ``ca_bundle`` (keys prefixed with ``prefix``).
        prefix: ``""`` for a source, ``"store_"`` for a destination (falls back to the unprefixed key).

    Raises:
        ConfigError: A bad URL, credentials file or CA bundle.
    """

    def option(key: str) -> Any:
        return options.get(prefix + key) or options.get(key)

    ca = option("ca_bundle")
    if ca is not None and not Path(ca).is_file():
        msg = f"--ca-bundle must be a PEM file, got missing {ca}"
        raise ConfigError(msg)
    return Connection(check_url(url), read_credentials(option("credentials")), Path(ca) if ca else None)


def describe_failure(exc: BaseException, connection: Connection) -> str:
    """One sentence for a failed request, naming the server (without credentials) and the cause."""
    import requests

    where = connection.public
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"TLS certificate of {where} must be trusted, got one that could not be verified; "
            "pass --ca-bundle with the CA that signed it"
        )
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return (
                f"DICOMweb server {where} refused the credentials "
                f"(HTTP {code}, {connection.credentials.kind} "
                f"auth); check {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --credentials"
            )
        return f"DICOMweb server {where} answered HTTP {code} {exc.response.reason}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
        return f"download from {where} broke off before the end (incomplete response; nothing of it is kept)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"DICOMweb server {where} must be reachable, got a connection error ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"DICOMweb server {where} did not answer in time"
    # the exception's own text may hold request URLs, and with them Study/Series UIDs: not repeated
    return f"DICOMweb request to {where} failed ({type(exc).__name__})"


def is_refusal(exc: BaseException) -> bool:
    """Whether a request failed because of credentials or TLS (the run cannot start)."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return True
    return (
        isinstance(exc, requests.exceptions.HTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    )


def raise_for(exc: BaseException, connection: Connection) -> None:
    """Re-raise a request's failure as a medseg error: refusals as ConfigError, others as InputError."""
    msg = describe_failure(exc, connection)
    if is_refusal(exc):
        raise ConfigError(msg) from None
    raise InputError(msg) from None
