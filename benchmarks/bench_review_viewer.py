"""Benchmark how fast a case page with the viewer opens from ``file://`` in headless Chromium.

A synthetic CT (body ellipse in HU, noise, three labelled organs) of ``--shape`` voxels is packed for
the viewer (``<case>/viewer/volume.js``, in-plane step as the export chooses) and a case page is
written beside it, as the review page does. Chromium (through Selenium and Debian's
``/usr/bin/chromedriver``) then opens the page ``--repeats`` times; each time the page reports when
its views are drawn (``data-ready-ms``, milliseconds since navigation began). The reference in the
same run is the same page without viewer data (HTML, styles and scripts only), so the ratio says
what the volume costs on this machine.

One JSON line is printed: packing seconds, the data file's size, the median open time with and
without the volume, their ratio, and for the last opening when the data script had run, the voxels
were decoded and the views were drawn (milliseconds since navigation began).

Examples:
    The claim (a 512 x 512 x 300 CT opens in under 2 s)::

        python benchmarks/bench_review_viewer.py --repeats 5

    Smoke run::

        python benchmarks/bench_review_viewer.py --shape 64,64,20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.export import CaseExport, label_table
from medseg.export.review_panel import case_review_html
from medseg.export.viewer import VOLUME_PATH, write_viewer_data
from medseg.io.atomic import atomic_write_text

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def _phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = (  # broadcast, not meshed: full-size arrays only where combined
        np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if d == i else 1 for d in range(3)])
        for i, n in enumerate(shape)
    )
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(np.where(x**2 / 0.8 + y**2 / 0.5 < 1, 40, -1000), shape).astype(np.int16)
    image += rng.integers(-20, 20, shape, dtype=np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[(x + 0.3) ** 2 + y**2 + z**2 < 0.15] = 1
    labels[(x - 0.4) ** 2 + (y + 0.2) ** 2 + z**2 < 0.03] = 2
    labels[(x - 0.1) ** 2 + (y - 0.4) ** 2 + (z - 0.2) ** 2 < 0.02] = 3
    return image, labels


def _page(out: Path, with_volume: bool) -> Path:
    files = [VOLUME_PATH] if with_volume else []
    html = case_review_html(case_id="ct", segmented=True, files=files, base="../../ct/")
    page = out / "report" / "cases" / f"ct{'' if with_volume else '-reference'}.html"
    atomic_write_text(
        page, f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{html}</body></html>'
    )
    atomic_write_text(
        out / "report" / "batch.js", 'window.MEDSEG_BATCH = {"batch_id": "bench", "cases": []};\n'
    )
    return page


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def _open_ms(driver, page: Path, ready: str) -> float:
    driver.get("about:blank")
    driver.get(page.as_uri())
    end = time.monotonic() + 120
    while time.monotonic() < end:
        value = driver.execute_script(ready)
        if value:
            return float(value)
        time.sleep(0.01)
    raise RuntimeError(f"{page} did not get ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="512,512,300", help="X,Y,Z voxels of the CT")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    image, labels = _phantom(shape)  # type: ignore[arg-type]
    case = CaseExport(
        case_id="ct",
        labels=labels,
        affine=np.diag([0.8, 0.8, 1.5, 1.0]),
        label_table=label_table(LABELS),
        image=image,
        modality="CT",
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        (data,) = write_viewer_data(case, out / "ct")
        pack_s = time.perf_counter() - t0
        size_mb = data.stat().st_size / 1e6
        pages = {True: _page(out, True), False: _page(out, False)}
        driver = _driver(out / "profile")
        try:
            ready = {
                True: "var v = document.getElementById('medseg-viewer');"
                " return v.getAttribute('data-error') || v.getAttribute('data-ready-ms');",
                False: "return document.readyState == 'complete' && performance.now();",
            }
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for with_volume in (False, True):
                    ms = _open_ms(driver, pages[with_volume], ready[with_volume])
                    times[with_volume].append(ms)
            factor = driver.execute_script(
                "return window.medsegViewer && window.medsegViewer.volume.d.factor;"
            )
            stages = driver.execute_script(
                "var v = document.getElementById('medseg-viewer');"
                "return ['parsed', 'decoded', 'ready'].map(function (k) {"
                " return +v.getAttribute('data-' + k + '-ms'); });"
            )
        finally:
            driver.quit()
    viewer_ms, reference_ms = statistics.median(times[True]), statistics.median(times[False])
    print(
        json.dumps(
            {
                "shape": list(shape),
                "in_plane_factor": factor,
                "pack_s": round(pack_s, 3),
                "volume_js_mb": round(size_mb, 2),
                "open_ms_median": round(viewer_ms, 1),
                "reference_ms_median": round(reference_ms, 1),
                "ratio": round(viewer_ms / max(reference_ms, 1e-3), 2),
                "last_open_ms": dict(
                    zip(("data_script_run", "voxels_decoded", "views_drawn"), stages, strict=True)
                ),
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
