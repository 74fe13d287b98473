"""A throw-away Orthanc archive with its DICOMweb plugin on loopback, test proxies, synthetic studies.

Orthanc runs as ``Orthanc CONFIG.json`` with its DICOM port off, a temporary storage folder, remote
access off and HTTP basic authentication on; optionally with TLS (a certificate signed by a CA made
with openssl in the test). The proxies sit between medseg and Orthanc: one cuts a response after N
bytes (a download that breaks half-way), one accepts only a bearer token (a token-checking gateway).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import signal
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from server_helpers import free_port

from medseg.synth import write_dicom_series

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medseg", "s3cret-pass"


def orthanc_binary() -> str:
    """The Orthanc program, or skip the test saying how to install it."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if exe is None or not ORTHANC_PLUGIN.is_file():
        pytest.skip("needs Orthanc and its DICOMweb plugin; Debian: apt-get install orthanc orthanc-dicomweb")
    return exe


@dataclass
class Orthanc:
    """A running Orthanc: its base URL (``http[s]://127.0.0.1:PORT``), DICOMweb root and process."""

    base: str
    proc: subprocess.Popen
    config: Path
    ca: Path | None = None

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root URL."""
        return f"{self.base}/dicom-web"

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """An authenticated REST call to Orthanc's own API."""
        req = urllib.request.Request(f"{self.base}{path}", data=body, method=method)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        with urllib.request.urlopen(req, timeout=60, context=context) as answer:
            return answer.read()

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files in the archive (Orthanc's REST API)."""
        for f in files:
            self.request("POST", "/instances", f.read_bytes())

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return json.loads(self.request("GET", "/instances"))

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _wait_up(server: Orthanc, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {server.proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            server.request("GET", "/system")
            return
        time.sleep(0.2)
    pytest.fail(f"Orthanc did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def make_ca_and_cert(folder: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl); returns (ca.pem, cert+key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a test certificate authority")
    folder.mkdir(parents=True, exist_ok=True)
    run = {"check": True, "capture_output": True, "cwd": folder, "timeout": 60}
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=medseg test CA",
        ],
        **run,
    )
    subprocess.run(
        [
            openssl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        **run,
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        **run,
    )
    bundle = folder / "server-bundle.pem"
    bundle.write_bytes((folder / "server.pem").read_bytes() + (folder / "server.key").read_bytes())
    return folder / "ca.pem", bundle


@contextlib.contextmanager
def orthanc_server(home: Path, *, tls: bool = False) -> Iterator[Orthanc]:
    """Orthanc on 127.0.0.1 (free port), DICOM off, basic auth on, storage in ``home``; stopped on exit.

    With ``tls``, Orthanc serves HTTPS itself (``SslEnabled``). Debian 12's Orthanc 1.10.1 crashes
    (SIGSEGV) on the first TLS handshake, so the tests put TLS in front of it with :func:`proxy` instead.
    """
    exe = orthanc_binary()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, object] = {
        "Name": "medseg-test",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpServerThreads": 8,
    }
    ca = None
    if tls:
        ca, bundle = make_ca_and_cert(home / "tls")
        config.update({"SslEnabled": True, "SslCertificate": str(bundle)})
    path = home / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    log = home / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, str(path)], stdout=out, stderr=subprocess.STDOUT, cwd=home)
    server = Orthanc(f"{'https' if tls else 'http'}://127.0.0.1:{port}", proc, path, ca)
    try:
        _wait_up(server, log)
        yield server
    finally:
        server.stop()


class _Threaded(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _forward(
    handler: http.server.BaseHTTPRequestHandler, target: str, auth: str | None
) -> urllib.request.Request:
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else None
    req = urllib.request.Request(f"{target}{handler.path}", data=body, method=handler.command)
    for key, value in handler.headers.items():
        if key.lower() not in {"host", "authorization", "content-length", "connection", "accept-encoding"}:
            req.add_header(key, value)
    if auth:
        req.add_header("Authorization", auth)
    return req


@contextlib.contextmanager
def proxy(
    target: str, *, cut_after: int | None = None, token: str | None = None, tls: Path | None = None
) -> Iterator[dict[str, int]]:
    """A local HTTP proxy to ``target`` (an Orthanc), with basic auth added on the way in.

    Args:
        target: The server's base URL.
        cut_after: Drop the connection after this many bytes of any WADO-RS series download.
        token: Accept only requests carrying ``Authorization: Bearer TOKEN`` (others get 401).
        tls: Serve HTTPS with this PEM file (certificate then key), e.g. from :func:`make_ca_and_cert`.

    Yields:
        ``{"port": ..., "cuts": ..., "refused": ..., "rejected": ...}`` (counters update as requests
        come); set ``cut_after`` to change the cut, ``reject_stow`` to 1 to answer STOW-RS with 409,
        ``delay_s`` to hold each series download that many seconds before answering.
    """
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    stats = {"port": free_port(), "cuts": 0, "refused": 0, "cut_after": cut_after or 0, "reject_stow": 0}
    stats["rejected"] = stats["delay_s"] = 0

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *_args: object) -> None:
            pass

        def _handle(self) -> None:
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                stats["refused"] += 1
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="medseg-test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            is_series = self.command == "GET" and "/series/" in self.path and "instances" not in self.path
            if is_series and stats["delay_s"]:
                time.sleep(stats["delay_s"])
            if stats["reject_stow"] and self.command == "POST" and "/dicom-web/studies" in self.path:
                stats["rejected"] += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(409, "Conflict")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            try:
                answer = urllib.request.urlopen(_forward(self, target, basic), timeout=60)
            except urllib.error.HTTPError as exc:
                answer = exc
            body = answer.read()
            self.send_response(answer.status if hasattr(answer, "status") else answer.code)
            for key, value in answer.headers.items():
                if key.lower() not in {"content-length", "transfer-encoding", "connection"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if stats["cut_after"] and is_series and len(body) > stats["cut_after"]:
                stats["cuts"] += 1
                self.wfile.write(body[: stats["cut_after"]])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

    server = _Threaded(("127.0.0.1", stats["port"]), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def env_credentials(monkeypatch: pytest.MonkeyPatch, user: str = USER, password: str = PASSWORD) -> None:
    """Put the archive's credentials in medseg's environment variables (and no token)."""
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", user)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", password)
    monkeypatch.delenv("MEDSEG_DICOMWEB_TOKEN", raising=False)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a medseg child process: this one plus ``extra``."""
    return {**os.environ, **extra}


NON_IMAGE = {
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
    "PR": "1.2.840.10008.5.1.4.1.1.11.1",
    "KO": "1.2.840.10008.5.1.4.1.1.88.59",
}
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def volume(seed: int, shape: tuple[int, int, int] = (20, 18, 6)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, dtype=np.int16)
    lo = rng.integers(1, 5, size=3)
    v[lo[0] : lo[0] + 8, lo[1] : lo[1] + 7, 1 : shape[2] - 1] = 1
    v[lo[0] + 2 : lo[0] + 5, lo[1] + 2 : lo[1] + 5, 2 : shape[2] - 2] = 2
    return v


def affine(angle: float) -> np.ndarray:
    a = np.radians(angle)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [1.0, 1.2, 2.5]
    )
    aff[:3, 3] = [5.0, -3.0, 10.0]
    return aff


def non_image(path: Path, kind: str, study_uid: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NON_IMAGE[kind]
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = kind, "Doe^Jane", "PID-SECRET-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, pydicom.uid.generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class Study:
    """A synthetic study: two image series (volumes and affines known) and SR/PR/KO objects."""

    def __init__(self, root: Path, seed: int) -> None:
        self.uid = pydicom.uid.generate_uid()
        self.series: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}
        for i in range(2):
            vol, aff = volume(seed + i), affine(10.0 * (i + seed))
            files = write_dicom_series(
                vol, aff, root / f"s{seed}-{i}", modality="CT", study_uid=self.uid,
                patient_name="Doe^Jane", patient_id="PID-SECRET-1", series_number=i + 1,
            )  # fmt: skip
            self.series[str(pydicom.dcmread(files[0]).SeriesInstanceUID)] = (files, vol, aff)
        self.others = [non_image(root / f"s{seed}-{k}.dcm", k, self.uid) for k in NON_IMAGE]

    @property
    def files(self) -> list[Path]:
        return [f for files, _, _ in self.series.values() for f in files] + self.others


def private_roots() -> set[Path]:
    """medseg's private download folders that exist now."""
    return set(Path(tempfile.gettempdir()).glob("medseg-dicomweb-*"))


def read_manifest(out: Path) -> dict:
    """A batch's ``manifest.json``."""
    return json.loads((out / "manifest.json").read_text())
