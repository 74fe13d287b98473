"""DICOMweb archives as source and destination, against a real Orthanc on loopback.

Orthanc (with its DICOMweb plugin) is started by a fixture, loaded with real series from
``../shared/data`` and synthetic studies (image series plus SR, PR and KO objects), and reached with
HTTP basic authentication; TLS, bearer tokens and broken downloads go through small local proxies or a
second Orthanc. Tests skip, saying why, where Orthanc or the shared data are absent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bundle_helpers import passthrough_bundle as tiny_bundle
from dicomweb_helpers import (
    NON_IMAGE,
    PASSWORD,
    SEG_CLASS,
    USER,
    Orthanc,
    Study,
    affine,
    env_credentials,
    make_ca_and_cert,
    orthanc_server,
    private_roots,
    proxy,
    read_manifest,
    volume,
)
from export_helpers import dciodvfy_errors, expected_frame
from geometry_helpers import SHARED_DATA
from typer.testing import CliRunner

from medseg.batch.runner import BatchSummary, PredictionSettings, run_prediction
from medseg.cli import app
from medseg.errors import ConfigError
from medseg.sources import open_scan_source
from medseg.sources.dicomweb.retrieve import folder_mode
from medseg.sources.folder import dicom_case_id
from medseg.synth import write_dicom_series

pytest.importorskip("dicomweb_client", reason="the DICOMweb tests need dicomweb-client (medseg[pacs])")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, dict[str, Study]]]:
    """One Orthanc for the module: two synthetic studies and the real series of ../shared/data."""
    home = tmp_path_factory.mktemp("orthanc")
    with orthanc_server(home / "server") as server:
        studies = {name: Study(home / name, seed) for seed, name in enumerate(["first", "second"])}
        for study in studies.values():
            server.upload(study.files)
        if SHARED_DATA.is_dir():
            for folder in ("mr_study", "ct_seg_reference/ct-3slice", "dicom_geometry"):
                server.upload(
                    sorted(p for p in (SHARED_DATA / folder).rglob("*") if p.is_file() and _is_dicom(p))
                )
        yield server, studies


def _is_dicom(path: Path) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:
        return False
    return path.suffix not in {".gz", ".nii", ".nrrd", ".json"}


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    env_credentials(monkeypatch)


def _client(url: str, ca: Path | None = None):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    session.verify = str(ca) if ca else True
    return DICOMwebClient(url, session=session)


def predict(source: str | Path, out: Path, bundle: Path, echo=None, **settings) -> BatchSummary:
    """``run_prediction`` with one model and settings given as keywords."""
    return run_prediction(source, out, models=[bundle], settings=PredictionSettings(**settings), echo=echo)


def _check_seg_against(
    seg: pydicom.Dataset, files: list[Path], labels: np.ndarray, affine: np.ndarray
) -> None:
    """Rebuild the label map under each source instance from the SEG's frame references alone."""
    headers = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    rebuilt = {uid: np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8) for uid, ds in headers.items()}
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert number in numbers
        rebuilt[uid][frame > 0] = number
    for uid, ds in headers.items():
        np.testing.assert_array_equal(rebuilt[uid], expected_frame(ds, labels, affine), err_msg=uid)


def test_query_segment_store_back_and_validate(archive, bundle: Path, creds, tmp_path: Path) -> None:
    server, studies = archive
    study = studies["first"]
    out = tmp_path / "out"
    args = ["predict", f"dicomweb:{server.dicomweb}", str(out), "--model", str(bundle), "--study", study.uid]
    args += ["--store-to", f"dicomweb:{server.dicomweb}", "--export", "dicom-seg", "--no-crf"]
    before = len(server.instances())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["counts"]["ok"] == 2
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    for kind in NON_IMAGE:
        assert f"DICOM {kind} series" in reasons
    text = (out / "manifest.json").read_text() + result.output
    assert study.uid not in text
    assert PASSWORD not in text
    assert "PID-SECRET" not in text
    assert len(server.instances()) == before + 2
    client = _client(server.dicomweb)
    for series_uid, (files, vol, aff) in study.series.items():
        entry = next(e for e in manifest["scans"] if e["case_id"] == dicom_case_id(series_uid))
        assert entry["store"]["status"] == "stored", entry["store"]
        assert entry["store"]["instances"][0]["answer"] == "sent"
        assert entry["store"]["instances"][0]["study"].startswith("sha256:")
        local = pydicom.dcmread(out / entry["case_id"] / "segmentation.dcm")
        [seg] = client.retrieve_series(study.uid, str(local.SeriesInstanceUID))
        assert seg.SOPClassUID == SEG_CLASS
        assert seg.SOPInstanceUID == local.SOPInstanceUID
        stored = tmp_path / f"{entry['case_id']}.dcm"
        seg.save_as(stored, enforce_file_format=True)
        assert dciodvfy_errors(stored) == []
        _check_seg_against(seg, files, vol, aff)
    # a re-run stores nothing twice: its record says so, and so does a crash before recording
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(server.instances()) == before + 2
    first_case = dicom_case_id(next(iter(study.series)))
    (out / first_case / "stored.json").unlink()
    third = CliRunner().invoke(app, args)
    assert third.exit_code == 0, third.output
    assert len(server.instances()) == before + 2
    entry = next(e for e in read_manifest(out)["scans"] if e["case_id"] == first_case)
    assert entry["store"]["instances"][0]["answer"] == "already on the server"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (real DICOM series)")
def test_real_series_from_the_archive_match_the_same_series_read_from_disk(
    archive, bundle: Path, creds, tmp_path: Path
) -> None:
    server, _ = archive
    ct = pydicom.dcmread(
        next((SHARED_DATA / "ct_seg_reference/ct-3slice").iterdir()), stop_before_pixels=True
    )
    mr = pydicom.dcmread(next((SHARED_DATA / "mr_study/13_HCropVolume").iterdir()), stop_before_pixels=True)
    options = {"studies": [str(mr.StudyInstanceUID)], "series": [str(ct.SeriesInstanceUID)]}
    remote = predict(f"dicomweb:{server.dicomweb}", tmp_path / "remote", bundle, source_options=options)
    assert remote.ok == 3
    assert remote.failed == 0
    for folder in ("mr_study/12-T1post-05670", "mr_study/13_HCropVolume", "ct_seg_reference/ct-3slice"):
        local = predict(SHARED_DATA / folder, tmp_path / "local" / folder, bundle)
        [entry] = local.entries
        a = np.asarray(__import__("nibabel").load(tmp_path / "local" / folder / entry["outputs"][0]).dataobj)
        b = np.asarray(__import__("nibabel").load(tmp_path / "remote" / entry["outputs"][0]).dataobj)
        np.testing.assert_array_equal(a, b, err_msg=folder)
    # a QIDO-RS filter selects by study-level keys too
    source = open_scan_source(f"dicomweb:{server.dicomweb}", options={"query": ["ModalitiesInStudy=MR"]})
    found = source.discover()
    assert dicom_case_id(str(mr.SeriesInstanceUID)) in {s.case_id for s in found.scans}
    assert dicom_case_id(str(ct.SeriesInstanceUID)) not in {s.case_id for s in found.scans}


def test_fetch_hands_over_complete_private_folders_and_removes_them(archive, creds) -> None:
    server, studies = archive
    study = studies["second"]
    with open_scan_source(f"dicomweb:{server.dicomweb}", options={"studies": [study.uid]}) as source:
        found = source.discover()
        assert len(found.scans) == 2
        assert len(found.skipped) == 3
        for scan in found.scans:
            with source.fetch(scan) as local:
                assert folder_mode(local.path) == 0o700
                expected = study.series[scan.series_uid][0]
                assert len(local.files) == len(expected)
                assert {pydicom.dcmread(f).SOPInstanceUID for f in local.files} == {
                    pydicom.dcmread(f).SOPInstanceUID for f in expected
                }
            assert not local.path.exists()


def test_a_series_that_gained_instances_is_segmented_again(bundle: Path, creds, tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "server") as server:
        study = Study(tmp_path / "data", seed=5)
        (first_uid, (files, _, _)), (_other_uid, _) = study.series.items()
        server.upload([f for f in study.files if f != files[-1]])
        url = f"dicomweb:{server.dicomweb}"
        assert predict(url, tmp_path / "out", bundle).ok == 2
        again = predict(url, tmp_path / "out", bundle)
        assert again.reused == 2
        server.upload([files[-1]])
        third = predict(url, tmp_path / "out", bundle)
        assert third.reused == 1
        assert third.ok == 2
        redone = next(e for e in third.entries if e["case_id"] == dicom_case_id(first_uid))
        assert redone["seconds"].get("network") is not None  # segmented in this run, not kept
        result = json.loads((tmp_path / "out" / redone["case_id"] / "result.json").read_text())
        assert result["details"]["shape"][2] == len(files)


def test_server_stopped_mid_batch_fails_the_rest_with_a_reason(
    bundle: Path, creds, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    before = private_roots()
    with orthanc_server(tmp_path / "server") as server:
        studies = [Study(tmp_path / f"data{i}", seed=10 + i) for i in range(2)]
        for study in studies:
            server.upload(study.files)
        lines: list[str] = []

        def echo(line: str) -> None:
            lines.append(line)
            server.stop()  # after the first series is done

        summary = predict(
            f"dicomweb:{server.dicomweb}",
            tmp_path / "out",
            bundle,
            echo=echo,
            source_options={"prefetch": 0},
            prefetch=False,  # one series at a time: the others are not downloaded yet
        )
    assert summary.ok == 1
    assert summary.failed == 3
    for entry in summary.entries:
        if entry["status"] == "failed":
            assert "must be reachable" in entry["error"]
            assert f"{server.dicomweb}" in entry["error"]
    assert private_roots() == before
    uids = [uid for study in studies for uid in study.series]
    text = caplog.text + json.dumps(summary.entries)
    assert not [uid for uid in uids if uid in text], "series UIDs reached the log or the manifest"


def test_download_cut_half_way_leaves_no_partial_input_and_is_retried(
    archive, bundle: Path, creds, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, studies = archive
    study = studies["second"]
    before = private_roots()
    with proxy(server.base, cut_after=3000) as gate:
        url = f"dicomweb:http://127.0.0.1:{gate['port']}/dicom-web"
        options = {"studies": [study.uid]}
        first = predict(url, tmp_path / "out", bundle, source_options=options)
        assert first.failed == 2
        assert gate["cuts"] >= 2
        for entry in first.entries:
            assert "download" in entry["error"] or "incomplete" in entry["error"], entry["error"]
            assert not (tmp_path / "out" / entry["case_id"]).exists()
        assert private_roots() == before  # nothing downloaded is left behind
        gate["cut_after"] = 0
        second = predict(url, tmp_path / "out", bundle, source_options=options)
        assert second.ok == 2
        assert second.reused == 0


def test_a_rejected_seg_is_an_export_error_retried_by_the_next_run(
    archive, bundle: Path, creds, tmp_path: Path
) -> None:
    server, _ = archive
    study = Study(tmp_path / "data", seed=60)
    server.upload(study.files)
    with proxy(server.base) as gate:
        url = f"dicomweb:http://127.0.0.1:{gate['port']}/dicom-web"
        args = ["predict", url, str(tmp_path / "out"), "--model", str(bundle), "--study", study.uid]
        args += ["--store-to", url, "--export", "dicom-seg"]
        gate["reject_stow"] = 1
        rejected = CliRunner().invoke(app, args)
        assert rejected.exit_code == 1, rejected.output
        assert "2 not stored" in rejected.output
        for entry in read_manifest(tmp_path / "out")["scans"]:
            assert entry["status"] == "ok"  # the label map is kept
            assert (tmp_path / "out" / entry["case_id"] / "labels.nii.gz").is_file()
            assert entry["store"]["status"] == "failed"
            assert "HTTP 409" in entry["store"]["error"]
            assert entry["store"]["server"]["http_status"] == 409
            facts = json.loads((tmp_path / "out" / entry["case_id"] / "case.json").read_text())
            assert "HTTP 409" in facts["errors"]["store-to-dicomweb"]  # flagged on the review page
        gate["reject_stow"] = 0
        retried = CliRunner().invoke(app, args)
        assert retried.exit_code == 0, retried.output
        for entry in read_manifest(tmp_path / "out")["scans"]:
            assert entry["store"]["status"] == "stored"
            assert entry["store"]["instances"][0]["answer"] == "sent"
            facts = json.loads((tmp_path / "out" / entry["case_id"] / "case.json").read_text())
            assert "store-to-dicomweb" not in facts["errors"]
        assert gate["rejected"] == 2


def test_wrong_credentials_exit_2_with_a_clear_error(
    archive, bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, _ = archive
    env_credentials(monkeypatch, password="wrong-pass")
    result = CliRunner().invoke(
        app, ["predict", f"dicomweb:{server.dicomweb}", str(tmp_path), "--model", str(bundle)]
    )
    assert result.exit_code == 2
    assert "refused the credentials (HTTP 401" in result.output
    assert "wrong-pass" not in result.output
    inline = server.dicomweb.replace("://", f"://{USER}:{PASSWORD}@")
    result = CliRunner().invoke(app, ["predict", f"dicomweb:{inline}", str(tmp_path), "--model", str(bundle)])
    assert result.exit_code == 2
    assert "must not hold credentials" in result.output
    assert PASSWORD not in result.output


def test_tls_is_verified_and_a_ca_bundle_is_accepted(archive, bundle: Path, creds, tmp_path: Path) -> None:
    # TLS terminates in a local proxy with a certificate from a CA made here (Debian's Orthanc 1.10.1
    # crashes on TLS handshakes with SslEnabled; see dicomweb_helpers.orthanc_server)
    server, studies = archive
    ca, cert = make_ca_and_cert(tmp_path / "tls")
    with proxy(server.base, tls=cert) as gate:
        url = f"dicomweb:https://127.0.0.1:{gate['port']}/dicom-web"
        args = ["predict", url, str(tmp_path / "o"), "--model", str(bundle), "--study", studies["first"].uid]
        refused = CliRunner().invoke(app, [*args, "--export", "none"])
        assert refused.exit_code == 2
        assert "--ca-bundle" in refused.output
        with pytest.raises(ConfigError, match="TLS certificate"):
            open_scan_source(url).discover()
        accepted = CliRunner().invoke(app, [*args, "--export", "none", "--ca-bundle", str(ca)])
        assert accepted.exit_code == 0, accepted.output
        assert read_manifest(tmp_path / "o")["counts"]["ok"] == 2


def test_bearer_token_from_environment_or_file(
    archive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, studies = archive
    with proxy(server.base, token="tok-123") as gate:
        url = f"dicomweb:http://127.0.0.1:{gate['port']}/dicom-web"
        options = {"studies": [studies["first"].uid]}
        monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-123")
        assert len(open_scan_source(url, options=options).discover().scans) == 2
        monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-bad")
        with pytest.raises(ConfigError, match="refused the credentials"):
            open_scan_source(url, options=options).discover()
        monkeypatch.delenv("MEDSEG_DICOMWEB_TOKEN")
        file = tmp_path / "token.json"
        file.write_text(json.dumps({"token": "tok-123"}))
        assert len(open_scan_source(url, options={**options, "credentials": file}).discover().scans) == 2
        assert gate["refused"] == 1


def test_compressed_series_arrive_in_their_stored_syntax_and_are_decoded(
    archive, bundle: Path, creds, tmp_path: Path
) -> None:
    import nibabel as nib
    from pydicom.uid import JPEG2000Lossless

    server, _ = archive
    vol = volume(7, (40, 36, 4))
    files = write_dicom_series(vol, affine(0.0), tmp_path / "j2k", modality="CT")
    for f in files:  # JPEG 2000 on the archive: the server must not transcode it for us
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless)
        ds.save_as(f, enforce_file_format=True)
    server.upload(files)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    with open_scan_source(f"dicomweb:{server.dicomweb}", options={"studies": [study]}) as source:
        [scan] = source.discover().scans
        with source.fetch(scan) as local:
            assert {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in local.files} == {JPEG2000Lossless}
    summary = predict(
        f"dicomweb:{server.dicomweb}", tmp_path / "out", bundle, source_options={"studies": [study]}
    )
    assert summary.ok == 1
    labels = np.asarray(nib.load(tmp_path / "out" / summary.entries[0]["outputs"][0]).dataobj)
    assert labels.shape == vol.shape
    np.testing.assert_array_equal(np.sort(np.unique(labels)), np.unique(vol))
    assert int((labels > 0).sum()) == int((vol > 0).sum())


def test_secondary_captures_go_with_the_seg(archive, bundle: Path, creds, tmp_path: Path) -> None:
    server, _ = archive
    study = Study(tmp_path / "data", seed=80)
    server.upload(study.files)
    url = f"dicomweb:{server.dicomweb}"
    before = len(server.instances())
    args = ["predict", url, str(tmp_path / "out"), "--model", str(bundle), "--study", study.uid]
    result = CliRunner().invoke(app, [*args, "--store-to", url, "--export", "dicom-seg,secondary-capture"])
    assert result.exit_code == 0, result.output
    sent = 0
    for entry in read_manifest(tmp_path / "out")["scans"]:
        files = [i["file"] for i in entry["store"]["instances"]]
        assert files[0] == "segmentation.dcm"
        assert files[1:]
        assert all(f.startswith("secondary_capture/") for f in files[1:])
        sent += len(files)
    assert len(server.instances()) == before + sent


def test_multipart_answers_split_anywhere_give_the_same_instances_and_cut_ones_fail() -> None:
    from medseg.sources.dicomweb.retrieve import IncompleteSeries, multipart_parts

    bodies = [b"\x00" * 5 + b"--bnd" + bytes(range(256)) * 3, b"", b"\r\n--bn\r\n"]
    msg = (
        b"".join(b"--bnd\r\nContent-Type: application/dicom\r\n\r\n" + b + b"\r\n" for b in bodies)
        + b"--bnd--"
    )
    for cut in range(1, len(msg)):
        assert list(multipart_parts([msg[:cut], msg[cut:]], b"bnd")) == bodies, cut
    assert list(multipart_parts([bytes([c]) for c in msg], b"bnd")) == bodies
    with pytest.raises(IncompleteSeries, match="closing boundary"):
        list(multipart_parts([msg[: len(msg) // 2]], b"bnd"))
