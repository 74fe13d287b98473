"""``medseg watch`` over a folder and over a real Orthanc, and SIGTERM while downloading.

Each test runs medseg in a child process (as a service would) and stops it with SIGTERM: series are
segmented only once complete, and nothing partial is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundle_helpers import passthrough_bundle as tiny_bundle
from dicomweb_helpers import PASSWORD, USER, Study, orthanc_server, private_roots, proxy

from medseg.sources.folder import dicom_case_id

pytest.importorskip("dicomweb_client", reason="the DICOMweb tests need dicomweb-client (medseg[pacs])")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


def _start_watch(source: str, out: Path, bundle: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``medseg watch`` in a child process (quiet period 3 s, polls every 0.5 s)."""
    cmd = [sys.executable, "-m", "medseg.cli", "watch", source, str(out), "--model", str(bundle)]
    cmd += ["--quiet-seconds", "3", "--poll-seconds", "0.5", "--export", "none", "--threads", "1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)


def _wait_for(check, proc, log: Path, timeout_s: float = 120.0) -> None:
    """Wait until ``check()``; fail if the child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        assert proc.poll() is None, f"watch exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def _no_partial_output(out: Path) -> None:
    assert not list(out.glob(".tmp-*")), "an unfinished output folder was left"
    for case in (p for p in out.iterdir() if p.is_dir() and p.name.startswith("dicom-")):
        assert (case / "result.json").is_file(), f"{case.name} has outputs without its result"


@pytest.mark.slow
def test_watch_folder_segments_a_slowly_copied_series_once_complete(bundle: Path, tmp_path: Path) -> None:
    study = Study(tmp_path / "data", seed=40)
    (uid_a, (files_a, _, _)), (_uid_b, (files_b, _, _)) = study.series.items()
    inbox, out, log = tmp_path / "inbox", tmp_path / "out", tmp_path / "watch.log"
    inbox.mkdir()
    proc = _start_watch(str(inbox), out, bundle, log)
    try:
        case_a = out / dicom_case_id(uid_a)
        for f in files_a:  # one file a second: never quiet for 3 s until the last
            shutil.copy(f, inbox / f"a-{f.name}")
            time.sleep(1.0)
            assert not case_a.exists(), "a series still being copied was segmented"
        _wait_for(lambda: (case_a / "result.json").is_file(), proc, log)
        result = json.loads((case_a / "result.json").read_text())
        assert result["details"]["shape"][2] == len(files_a)
        assert log.read_text().count("series ready") == 1
        for f in files_b:  # a second series; stop the watch while its batch runs
            shutil.copy(f, inbox / f"b-{f.name}")
        _wait_for(lambda: log.read_text().count("series ready") == 2, proc, log)
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "watch stopped (SIGTERM)" in log.read_text()
    _no_partial_output(out)


@pytest.mark.slow
def test_watch_archive_segments_a_series_once_its_instance_count_settles(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)
    study = Study(tmp_path / "data", seed=50)
    (uid_a, (files_a, _, _)), _ = study.series.items()
    out, log = tmp_path / "out", tmp_path / "watch.log"
    before = private_roots()
    with orthanc_server(tmp_path / "server") as server:
        proc = _start_watch(f"dicomweb:{server.dicomweb}", out, bundle, log, "--study", study.uid)
        try:
            case_a = out / dicom_case_id(uid_a)
            for f in files_a:  # one instance a second: the count settles only after the last
                server.upload([f])
                time.sleep(1.0)
                assert not case_a.exists(), "a series still arriving was segmented"
            _wait_for(lambda: (case_a / "result.json").is_file(), proc, log)
            result = json.loads((case_a / "result.json").read_text())
            assert result["details"]["shape"][2] == len(files_a)
            assert _stop(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert text.count("series ready") == 1
    assert PASSWORD not in text
    _no_partial_output(out)
    assert private_roots() <= before, "the watch left downloads behind"


@pytest.mark.slow
def test_sigterm_during_a_download_removes_the_private_folders(bundle: Path, tmp_path: Path) -> None:
    study = Study(tmp_path / "data", seed=70)
    before = private_roots()
    with orthanc_server(tmp_path / "server") as server, proxy(server.base) as gate:
        server.upload(study.files)
        gate["delay_s"] = 4  # each series download waits: SIGTERM comes while one is in flight
        url = f"dicomweb:http://127.0.0.1:{gate['port']}/dicom-web"
        cmd = [sys.executable, "-m", "medseg.cli", "predict", url, str(tmp_path / "out")]
        cmd += ["--model", str(bundle), "--study", study.uid, "--export", "none"]
        env = {**os.environ, "MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": PASSWORD}
        log = tmp_path / "predict.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not any(p.is_dir() for r in private_roots() - before for p in r.glob("dicom-*")):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
    assert private_roots() == before, "downloads were left behind"
    assert not list((tmp_path / "out").glob("dicom-*"))
