"""The review page in a real Chromium: the viewer shows the scan and labels of labels.nii.gz's grid, and
verdicts set on two case pages come back through review.json and ``medseg review import``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.bundle import build_network, save_bundle
from medseg.cli import app
from medseg.config.pipeline import PipelineConfig
from medseg.config.spec import DatasetSpec
from medseg.synth import write_nifti

LABELS = {"background": 0, "organ": 1, "lesion": 2}
COLORS = {1: (230, 25, 75), 2: (60, 180, 75)}
SHAPE = (20, 18, 8)
# voxel i runs to patient left (1 mm), j to superior (2 mm), k to posterior (1.5 mm)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 0, -1.5, 20], [0, 2.0, 0, -5], [0, 0, 0, 1]])
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _bundle(path: Path) -> Path:
    spec = DatasetSpec.model_validate(
        {
            "name": "identity",
            "channels": [{"name": "ct", "modality": "CT", "intensity": {"scheme": "none"}}],
            "labels": LABELS,
            "cases": [],
        }
    )
    cfg = PipelineConfig.model_validate({"name": "identity", "model": {"name": "passthrough"}})
    return save_bundle(path, cfg, spec, build_network(cfg, spec))


def _scan(shift: int) -> np.ndarray:
    """A scan whose rounded, clamped values are its labels: negative background that varies with
    position (label 0), an organ of value 1, a lesion of values 10.. (label 2)."""
    i, j, k = np.indices(SHAPE)
    v = -(1 + (i + 2 * j + 3 * k + shift) % 60)
    v[2:12, 3:14, 1:6] = 1
    v[4:7, 5:8, 2:4] = 10 + i[4:7, 5:8, 2:4]
    return v.astype(np.int16)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("review")
    for n, name in enumerate(("a", "b", "c")):
        write_nifti(_scan(n), AFFINE, root / "in" / f"{name}.nii.gz")
    (root / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # nothing to review there
    result = CliRunner().invoke(
        app, ["predict", str(root / "in"), str(root / "out"), "--model", str(_bundle(root / "bundle"))]
    )
    assert result.exit_code == 1, result.output
    return root / "out"


def _driver(download_dir: Path, profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install medseg[dev])")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not CHROMEDRIVER.is_file():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    return driver


def _wait(driver, script: str, *args: object, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def _canvas(driver, plane: str) -> np.ndarray:
    data = driver.execute_script(
        f"var c = document.querySelector('#mv-{plane} canvas.mv-img');"
        "var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return [c.width, c.height, Array.from(d)];"
    )
    w, h, px = data
    return np.asarray(px, dtype=np.int16).reshape(h, w, 4)


def _canonical(batch: Path, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan, labels and original voxel indices in nibabel's closest-RAS order (independent of medseg)."""
    img = nib.load(batch / case / "labels.nii.gz")
    labels = np.asarray(img.dataobj)
    scan = np.asarray(nib.load(batch.parent / "in" / f"{case}.nii.gz").dataobj)
    idx = np.stack(np.indices(labels.shape), axis=-1).astype(np.int16)

    def ras(a: np.ndarray) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(a, img.affine)).dataobj)

    return ras(scan), ras(labels), np.stack([ras(idx[..., d]) for d in range(3)], axis=-1)


def _expected(
    scan: np.ndarray,
    labels: np.ndarray,
    plane: str,
    cursor: list[int],
    window: tuple[float, float],
    shown: set[int],
) -> np.ndarray:
    """The RGB a radiological view should show: patient right on the left, anterior/superior up."""
    x, y, z = cursor
    if plane == "axial":
        s, lab = scan[::-1, ::-1, z].T, labels[::-1, ::-1, z].T
    elif plane == "coronal":
        s, lab = scan[::-1, y, ::-1].T, labels[::-1, y, ::-1].T
    else:
        s, lab = scan[x, ::-1, ::-1].T, labels[x, ::-1, ::-1].T
    level, width = window
    grey = np.clip((s.astype(float) - (level - width / 2)) * 255.0 / width, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in shown:
        m = lab == value
        rgb[m] = 0.6 * grey[m][:, None] + 0.4 * np.asarray(COLORS[value], float)
    return rgb


def _check_views(driver, scan, labels, window, shown) -> None:
    cursor = driver.execute_script("return window.medsegViewer.state.cursor.slice();")
    for plane in ("axial", "coronal", "sagittal"):
        got = _canvas(driver, plane)
        want = _expected(scan, labels, plane, cursor, window, shown)
        assert got.shape[:2] == want.shape[:2], plane
        assert (got[..., 3] == 255).all()
        diff = np.abs(got[..., :3] - want)
        assert diff.max() <= 1, (plane, cursor, window, np.argwhere(diff > 1)[:5])


@pytest.mark.slow
def test_viewer_and_verdicts_in_chromium(batch: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _driver(downloads, tmp_path / "profile")
    try:
        scan, labels, index = _canonical(batch, "a")
        driver.get((batch / "report" / "cases" / "a.html").as_uri())
        _wait(driver, "return document.getElementById('medseg-viewer').getAttribute('data-ready');")
        assert "could not" not in driver.find_element(By.ID, "medseg-viewer").text
        n = scan.shape  # display grid: x (R), y (A), z (S)
        start = driver.execute_script("return window.medsegViewer.state.cursor.slice();")
        assert start == [s // 2 for s in n]

        # every slice reachable: arrow keys (axial), the slider's keys (coronal), the wheel (sagittal)
        target = [n[0] - 2, 1, n[2] - 1]  # sagittal x, coronal y, axial z
        axial = driver.find_element(By.ID, "mv-axial")
        ActionChains(driver).click(axial.find_element(By.CLASS_NAME, "mv-title")).perform()
        for _ in range(target[2] - start[2] + 3):  # past the last slice: it stays on the last
            axial.send_keys(Keys.ARROW_UP)
        slider = driver.find_element(By.CSS_SELECTOR, "#mv-coronal input.mv-slider")
        for _ in range(start[1] - target[1]):
            slider.send_keys(Keys.ARROW_LEFT)
        sagittal = driver.find_element(By.CSS_SELECTOR, "#mv-sagittal .mv-stage")
        for _ in range(target[0] - start[0]):
            ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(sagittal), 0, -100).perform()
        wanted = ",".join(map(str, target))
        cursor = _wait(
            driver, "var c = window.medsegViewer.state.cursor; return c.join() == arguments[0] && c;", wanted
        )
        assert cursor == target
        assert slider.get_attribute("value") == str(target[1])

        soft = (40.0, 400.0)  # a CT opens in the soft-tissue window
        _check_views(driver, scan, labels, soft, {1, 2})

        # another window preset, then the organ hidden
        driver.find_element(By.CSS_SELECTOR, "button[data-window='lung']").click()
        _check_views(driver, scan, labels, (-600.0, 1500.0), {1, 2})
        driver.find_element(By.CSS_SELECTOR, "input[data-label='1']").click()
        _check_views(driver, scan, labels, (-600.0, 1500.0), {2})

        # drag to window (shift + drag): wider to the right, lower level upwards
        stage = driver.find_element(By.CSS_SELECTOR, "#mv-axial .mv-stage")
        (
            ActionChains(driver)
            .key_down(Keys.SHIFT)
            .move_to_element(stage)
            .click_and_hold()
            .move_by_offset(40, -30)
            .release()
            .key_up(Keys.SHIFT)
            .perform()
        )
        level, width = driver.execute_script(
            "return [window.medsegViewer.state.level, window.medsegViewer.state.width];"
        )
        assert width > 1500.0
        assert level > -600.0
        assert driver.execute_script("return window.medsegViewer.state.cursor.slice();") == target
        _check_views(driver, scan, labels, (level, width), {2})

        # the voxel under the mouse: its index on labels.nii.gz's grid, its value and label
        canvas = stage.find_element(By.CSS_SELECTOR, "canvas.mv-img")
        nc, nr = n[0], n[1]
        for x, y in ((4, 2), (n[0] - 6, n[1] - 3)):  # column, row of the axial canvas
            rx, ry = n[0] - 1 - x, n[1] - 1 - y
            rect = canvas.rect
            ActionChains(driver).move_to_element_with_offset(
                canvas,
                int((x + 0.5) * rect["width"] / nc - rect["width"] / 2),
                int((y + 0.5) * rect["height"] / nr - rect["height"] / 2),
            ).perform()
            info = driver.find_element(By.CLASS_NAME, "mv-info").text
            voxel = tuple(int(v) for v in index[rx, ry, target[2]])
            name = {0: "background", 1: "organ", 2: "lesion"}[int(labels[rx, ry, target[2]])]
            assert f"voxel ({voxel[0]}, {voxel[1]}, {voxel[2]})" in info, info
            assert f"value {int(scan[rx, ry, target[2]])} " in info, info
            assert name in info
        # radiological markers
        sides = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#mv-axial .mv-side")]
        assert sides == ["R", "L", "A", "P"]

        # verdicts on two cases, typed once, kept in the browser
        driver.find_element(By.CSS_SELECTOR, "#medseg-verdict input.mv-reviewer").send_keys("Dr. Test")
        driver.find_element(By.CSS_SELECTOR, "#medseg-verdict button[data-verdict='accept']").click()
        driver.get((batch / "report" / "cases" / "b.html").as_uri())
        assert (
            driver.find_element(By.CSS_SELECTOR, "#medseg-verdict input.mv-reviewer").get_attribute("value")
            == "Dr. Test"
        )
        driver.find_element(By.CSS_SELECTOR, "#medseg-verdict textarea").send_keys("lesion missed")
        driver.find_element(By.CSS_SELECTOR, "#medseg-verdict button[data-verdict='reject']").click()
        driver.get((batch / "report" / "index.html").as_uri())
        bar = driver.find_element(By.ID, "medseg-review-bar")
        assert "reviewed 2 of 3" in bar.text
        from selenium.webdriver.support.ui import Select

        Select(bar.find_element(By.CLASS_NAME, "mv-filter")).select_by_value("reject")
        shown = [
            r.get_attribute("data-case")
            for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-case]")
            if r.is_displayed()
        ]
        assert shown == ["b"]
        Select(bar.find_element(By.CLASS_NAME, "mv-filter")).select_by_value("unreviewed")
        shown = [
            r.get_attribute("data-case")
            for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-case]")
            if r.is_displayed()
        ]
        assert shown == ["c"]
        Select(bar.find_element(By.CLASS_NAME, "mv-filter")).select_by_value("all")
        shown = [
            r.get_attribute("data-case")
            for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-case]")
            if r.is_displayed()
        ]
        assert sorted(shown) == ["a", "b", "broken", "c"]
        bar.find_element(By.CLASS_NAME, "mv-download").click()
        end = time.monotonic() + 20
        while not (downloads / "review.json").is_file() and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        driver.quit()
    review = json.loads((downloads / "review.json").read_text())
    manifest = json.loads((batch / "manifest.json").read_text())
    assert review["batch_id"] == manifest["batch_id"]
    assert review["model_sha256"] == manifest["model_sha256"]

    result = CliRunner().invoke(app, ["review", "import", str(batch), str(downloads / "review.json")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((batch / "manifest.json").read_text())
    by_id = {e["case_id"]: e for e in manifest["scans"]}
    assert by_id["a"]["review"]["verdict"] == "accept"
    assert by_id["a"]["review"]["reviewer"] == "Dr. Test"
    assert by_id["b"]["review"] | {"reviewed_at": ""} == {
        "verdict": "reject",
        "note": "lesion missed",
        "reviewer": "Dr. Test",
        "reviewed_at": "",
    }
    assert "review" not in by_id["c"]
    assert json.loads((batch / "b" / "case.json").read_text())["review"]["verdict"] == "reject"

    from medseg.tracking.store import client

    run = client(manifest["tracking_uri"]).get_run(manifest["run_id"])
    assert run.data.tags["review/a"] == "accept"
    assert run.data.tags["review/b"] == "reject"
    assert run.data.tags["review/b/note"] == "lesion missed"
    assert run.data.metrics["review/accepted_fraction"] == pytest.approx(0.5)
    assert run.data.metrics["review/rejected_fraction"] == pytest.approx(0.5)
