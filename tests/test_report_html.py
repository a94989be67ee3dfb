"""report.html: real tables with interval bars and the curves inline, checked as a page in headless
Chromium (skipped where it is not installed); report.md of a committed sweep stays byte for byte."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bbpt.report import report

REPO = Path(__file__).resolve().parent.parent
PROBE = """<script>addEventListener("load", () => {
  const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; };
  const p = document.createElement("pre");
  p.id = "bbpt-probe";
  p.textContent = JSON.stringify({width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
    images: [...document.images].map(i => ({complete: i.complete, naturalWidth: i.naturalWidth, box: box(i)})),
    tables: [...document.querySelectorAll("table")].map(box),
    bars: [...document.querySelectorAll("svg.iv")].filter(s => box(s)[2] > 0 && box(s)[3] > 0).length});
  document.body.append(p);
});</script>"""


def _fake_run(root: Path, method: str, dataset: str, seed: int, test: float, status: str = "finished") -> None:
    r = {"method": method, "dataset": dataset, "shots": 16, "seed": seed, "status": status,
         "accuracy": {"test": test, "val": test}, "queries": {"api_calls": 0 if method == "z" else 400},
         "curve": [{"api_calls": x, "val_accuracy": test * f} for x, f in ((0, 0.5), (100, 0.8), (400, 1.0))],
         "config": {"options": {}}}
    if method == "z":
        r["curve"] = [{"api_calls": 0, "val_accuracy": test}]
    if status == "failed":
        r = {**r, "accuracy": {}, "error": "budget too small for one step; raise --set budget"}
    d = root / method / dataset / f"s{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(r))


@pytest.fixture
def fixture_report(tmp_path):
    """Three methods on two tasks over three seeds, one refused run, two compared pairs."""
    acc = {("a", "d1"): [0.80, 0.82, 0.84], ("a", "d2"): [0.60, 0.66, 0.63], ("b", "d1"): [0.70, 0.74, 0.72],
           ("b", "d2"): [0.64, 0.60, 0.68], ("z", "d1"): [0.5] * 3, ("z", "d2"): [0.62] * 3}
    for (m, d), xs in acc.items():
        for seed, x in enumerate(xs, 1):
            _fake_run(tmp_path / "runs", m, d, seed, x)
    _fake_run(tmp_path / "runs", "c", "d1", 1, 0.0, status="failed")
    report(tmp_path / "runs", [("a", "b"), ("*", "z")], out=tmp_path / "rep")
    return tmp_path / "rep"


def test_the_page_has_real_tables_bars_and_inline_plots(fixture_report):
    page = (fixture_report / "report.html").read_text()
    assert "<pre>" not in page and "<script" not in page and not re.search(r"(src|href)=['\"]?(https?:|//)", page)
    assert page.count("<table>") == 2 and page.count("<img ") == 2  # accuracy + paired; d1, d2
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in re.findall(r"src='([^']+)'", page))
    # the accuracy of a on d1 (80, 82, 84) with its bar, and the refused run in its cell and below the table
    assert "<td>82.0 ± 2.0 [77.0, 87.0]<svg class='iv'" in page and "<title>mean 82.0, 95 % CI [77.0, 87.0]</title>" in page
    assert "<td class='failed'>failed</td>" in page and "c on d1, seed 1: budget too small for one step" in page
    # a − b on d1 is +10 [5.0, 15.0]: above 0, so green and "yes"; a − b on d2 covers 0: grey and "unclear"
    diff = re.search(r"<td>10\.0 ± 2\.0 \[5\.0, 15\.0\]</td><td><svg.*?</svg></td><td class='yes'>yes</td>", page)
    assert diff and "fill='#1a7f37'" in diff.group(0)
    assert re.search(r"<td>-1\.0 ± [\d.]+ \[-[\d.]+, [\d.]+\]</td><td><svg[^>]*>.*?fill='#6e7781'.*?</svg></td>"
                     r"<td class='unclear'>unclear</td>", page)
    bars = page.count("<svg class='iv'")
    # 6 accuracy cells (a, b, z on two tasks; c failed) + 3 pairs (a − b, a − z, b − z) x (2 tasks + average)
    assert bars == 6 + 3 * 3


def test_report_md_of_a_committed_sweep_is_unchanged(tmp_path, monkeypatch):
    """report.md is what bench/readme_tables.py copies into the README: the HTML work leaves it as it was."""
    monkeypatch.chdir(REPO)  # the sweep files' paths are relative to the repository
    name = "seed_methods_augment"  # the smallest committed sweep; its baseline table as well
    rep = report(f"bench/sweeps/{name}.toml", out=tmp_path)
    assert (tmp_path / "report.md").read_bytes() == (REPO / "bench/results/sweeps" / name / "report.md").read_bytes()
    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 2 and page.count("data:image/png;base64,") == len(rep["datasets"]) == 4
    assert "<h2>Against seed_methods</h2>" in page


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return exe


def _browse(page: Path, tmp_path: Path):
    """The page's geometry as Chromium lays it out (from a copy with a probe script) and a
    screenshot of the page itself at that size."""
    from PIL import Image

    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={tmp_path / 'profile'}"]
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    p = subprocess.run([exe, *flags, "--window-size=1400,900", "--dump-dom", probe.as_uri()], capture_output=True,
                       text=True, timeout=120)
    m = re.search(r'<pre id="bbpt-probe">(.*?)</pre>', p.stdout, re.S)
    assert m, f"chromium printed no probe (exit {p.returncode}): {p.stderr[-500:]}"
    geo = json.loads(html.unescape(m.group(1)))
    shot = tmp_path / "shot.png"
    size = f"--window-size={max(geo['width'], 1400)},{geo['height']}"
    p = subprocess.run([exe, *flags, size, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                       timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {p.returncode}): {p.stderr[-500:]}"
    return geo, Image.open(shot).convert("RGB")


def _ink(img, box) -> tuple[float, int]:
    """The share of a box's pixels that are not near-white, and how many colours it holds."""
    import numpy as np

    x, y, w, h = (round(v) for v in box)
    px = np.asarray(img.crop((x, y, min(x + w, img.width), min(y + h, img.height)))).reshape(-1, 3).astype(int)
    return float((px.sum(1) < 690).mean()) if len(px) else 0.0, len(np.unique(px, axis=0))


@pytest.mark.parametrize("which", ["fixture", "committed"])
def test_chromium_shows_the_tables_and_loads_the_images(which, fixture_report, tmp_path, monkeypatch):
    _chromium()
    if which == "fixture":
        page, tables, images, bars = fixture_report / "report.html", 2, 2, 15
    else:
        monkeypatch.chdir(REPO)
        report("bench/sweeps/seed_methods_augment.toml", out=tmp_path / "rep")
        page, tables, images, bars = tmp_path / "rep" / "report.html", 2, 4, 5 * 4 + 5 * 5
    geo, img = _browse(page, tmp_path)
    assert len(geo["tables"]) == tables and len(geo["images"]) == images and geo["bars"] == bars
    assert img.size == (max(geo["width"], 1400), geo["height"])
    for i in geo["images"]:
        assert i["complete"] and i["naturalWidth"] == 792, i  # the 7.2 in x 110 dpi curve plot, decoded
        ink, colours = _ink(img, i["box"])
        assert i["box"][2] > 300 and ink > 0.02 and colours > 50, (i, ink, colours)  # axes, lines and bands
    for box in geo["tables"]:
        ink, colours = _ink(img, box)
        assert box[2] > 200 and box[3] > 50 and ink > 0.03 and colours > 20, (box, ink, colours)  # text and bars


def test_the_chromium_check_sees_a_broken_page(fixture_report, tmp_path):
    """The same probe and pixels on a page whose plots do not decode and whose tables are hidden."""
    _chromium()
    page = (fixture_report / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("base64,iVBORw0KGgo", "base64,AAAA").replace("</style>", "table{visibility:hidden}</style>"))
    geo, img = _browse(broken, tmp_path)
    assert [i["naturalWidth"] for i in geo["images"]] == [0, 0]
    assert all(_ink(img, box) == (0.0, 1) for box in geo["tables"])  # laid out, but nothing drawn
