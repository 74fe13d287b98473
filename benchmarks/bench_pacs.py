"""DICOMweb source and destination: the same synthetic CT series from a folder and from Orthanc.

Writes ``--scans`` synthetic CT series (256 x 256 x 200 by default) and loads them into an Orthanc
started on loopback (DICOMweb plugin, basic authentication); then, in one run and with the demo
network (untrained unless ``--model`` is given), times:

- ``folder_s``: ``run_prediction`` over the folder (segmentation alone, local reads);
- ``plain_download_s``: a plain dicomweb-client ``iter_series`` download of every series (stored
  transfer syntax, nothing written); ``retrieve_s``: medseg's own retrieval of the same series into
  private folders (QIDO-RS listing, WADO-RS, verification), with ``retrieve_mb_s`` and
  ``retrieve_vs_plain`` = plain_download_s / retrieve_s;
- ``dicomweb_s``: ``run_prediction`` over ``dicomweb:URL``; ``dicomweb_over_folder`` = dicomweb_s /
  folder_s (target <= 1.15) and ``dicomweb_over_max`` = dicomweb_s / max(plain_download_s, folder_s)
  (target <= 1.1: downloads overlap segmentation);
- ``stow_s_per_seg``: seconds per DICOM SEG sent back with STOW-RS (QIDO-RS check included), from a
  run with ``--export dicom-seg`` and ``--store-to``.

Prints one JSON line. Needs Orthanc and its DICOMweb plugin (Debian: ``orthanc orthanc-dicomweb``).

Usage:
    .venv/bin/python benchmarks/bench_pacs.py [--scans 20] [--size 256,256,200] [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.batch.runner import PredictionSettings, run_prediction
from medseg.bundle import build_network, save_bundle
from medseg.config.spec import DatasetSpec
from medseg.demo import demo_pipeline
from medseg.sources import open_scan_source
from medseg.sources.destinations import open_destination
from medseg.synth import make_phantom, write_dicom_series
from medseg.synth.dataset import dataset_spec

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "bench", "bench-pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def orthanc(home: Path) -> Iterator[str]:
    """Orthanc on 127.0.0.1 (DICOM off, basic auth, storage in ``home``); yields its base URL."""
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(exe).is_file() or not Path(PLUGIN).is_file():
        raise SystemExit(
            "needs Orthanc and its DICOMweb plugin (Debian: apt-get install orthanc orthanc-dicomweb)"
        )
    port = _free_port()
    config = {
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
    }
    home.mkdir(parents=True, exist_ok=True)
    (home / "orthanc.json").write_text(json.dumps(config))
    with (home / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([exe, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _rest(base, "GET", "/system")
                break
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _rest(base: str, method: str, path: str, body: bytes | None = None) -> bytes:
    req = urllib.request.Request(f"{base}{path}", data=body, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(req, timeout=120) as answer:
        return answer.read()


def make_series(root: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    """``n`` synthetic CT series (one folder each)."""
    folders = []
    for i in range(n):
        image, _label, affine = make_phantom(shape=shape, spacing=(1.5,) * 3, seed=200 + i)
        folder = root / f"ct{i:02d}"
        if not folder.is_dir():
            write_dicom_series(image, affine, folder, patient_name=f"Bench^{i}")
        folders.append(folder)
    return folders


class TimedDestination:
    """A destination that adds up the seconds its ``store`` calls take."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.location, self.seconds, self.calls = inner, inner.location, 0.0, 0

    def store(self, case_dir: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return self.inner.store(case_dir)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def plain_download(url: str) -> float:
    """Seconds for dicomweb-client alone to download every series (stored syntax, nothing written)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    client = DICOMwebClient(url, session=session)
    t0 = time.perf_counter()
    for item in client.search_for_series():
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        for _ in client.iter_series(study, series, media_types=(("application/dicom", "*"),)):
            pass
    return time.perf_counter() - t0


def medseg_retrieve(url: str) -> float:
    """Seconds for medseg's source to list, download and verify every series."""
    t0 = time.perf_counter()
    with open_scan_source(f"dicomweb:{url}") as source:
        for scan in source.discover().scans:
            with source.fetch(scan):
                pass
    return time.perf_counter() - t0


def main() -> None:
    """Write and load the series, run the four measurements, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--size", default="256,256,200", help="X,Y,Z of each series")
    parser.add_argument("--model", default=None, help="bundle folder (default: untrained demo network)")
    parser.add_argument("--workdir", default=None, help="keep the series here between runs")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.size.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medseg-bench-pacs-"))
    folder = work / f"series_{'x'.join(map(str, shape))}_{args.scans}"
    series = make_series(folder, args.scans, shape)  # type: ignore[arg-type]
    megabytes = sum(f.stat().st_size for s in series for f in s.iterdir()) / 1e6
    model = args.model
    if model is None:
        cfg = demo_pipeline(1.0)
        spec = DatasetSpec.model_validate({**dataset_spec("bench", "CT"), "case_patterns": None, "cases": []})
        model = str(save_bundle(work / "untrained", cfg, spec, build_network(cfg, spec)))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.update({"MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": PASSWORD})
    with orthanc(work / f"orthanc_{time.time_ns()}") as base:
        for s in series:
            for f in sorted(s.iterdir()):
                _rest(base, "POST", "/instances", f.read_bytes())
        url = f"{base}/dicom-web"
        # warm-up (imports, MLflow store, first model load), not timed
        quiet = PredictionSettings(tracking_uri=uri)
        run_prediction(series[0], work / f"out_warm_{time.time_ns()}", models=[model], settings=quiet)
        t0 = time.perf_counter()
        run_prediction(folder, work / f"out_folder_{time.time_ns()}", models=[model], settings=quiet)
        folder_s = time.perf_counter() - t0
        plain_s = plain_download(url)
        retrieve_s = medseg_retrieve(url)
        t0 = time.perf_counter()
        remote = run_prediction(
            f"dicomweb:{url}", work / f"out_web_{time.time_ns()}", models=[model], settings=quiet
        )
        dicomweb_s = time.perf_counter() - t0
        destination = TimedDestination(open_destination(f"dicomweb:{url}"))
        storing = PredictionSettings(tracking_uri=uri, exports=("dicom-seg",), destination=destination)
        stored = run_prediction(
            f"dicomweb:{url}", work / f"out_stow_{time.time_ns()}", models=[model], settings=storing
        )
    result = {
        "scans": args.scans,
        "shape": list(shape),
        "megabytes": round(megabytes, 1),
        "folder_s": round(folder_s, 2),
        "plain_download_s": round(plain_s, 2),
        "retrieve_s": round(retrieve_s, 2),
        "retrieve_mb_s": round(megabytes / retrieve_s, 1),
        "plain_download_mb_s": round(megabytes / plain_s, 1),
        "retrieve_vs_plain": round(plain_s / retrieve_s, 3),
        "dicomweb_s": round(dicomweb_s, 2),
        "dicomweb_over_folder": round(dicomweb_s / folder_s, 3),
        "dicomweb_over_max": round(dicomweb_s / max(plain_s, folder_s), 3),
        "stow_s_per_seg": round(destination.seconds / max(1, destination.calls), 3),
        "stored_failed": stored.store_failed,
        "failed": remote.failed + stored.failed,
        "model_s": round(remote.model_seconds, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
