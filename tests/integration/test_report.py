"""``ebmscale report RUN_DIR``: the page of a real (tiny) run rendered in headless Chromium --
no console or load errors, every image decoded, a screenshot that is not blank -- and a run
directory with missing pieces still giving a page that says what is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from ebmscale.config import load_config
from ebmscale.report import build_report
from ebmscale.trainer import train
from tests.conftest import run_cli

TINY = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=16", "sampler.steps=3",
        "buffer.capacity=64", "train.progress=false", "buffer.backend=local", "train.precision=fp32",
        "train.threads=1", "train.device=cpu", "train.steps=6", "train.log_every=2", "train.sample_every=2",
        "train.checkpoint_every=2", "train.rollback_max=0", "model.conditional=true", "model.num_classes=10"]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

# Injected into a copy of the page (a test seam: the report itself has no script). Load errors of
# any element and script errors are caught from the first moment; after 'load' the verdict is
# written into the DOM, which --dump-dom prints.
PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push((e.target && e.target.tagName) ? 'load failed: ' +
  e.target.tagName : 'script: ' + e.message), true);</script>"""
PROBE_TAIL = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({images: imgs.length, broken: bad, svgs: document.querySelectorAll('svg').length,
                                    errors: window.__errors});
  document.body.appendChild(out);
});</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it when it can)")
    return path


def _browser(chromium: str, page: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, "file://" + page],
                          capture_output=True, text=True, timeout=120)


def _probe(chromium: str, page: str, tmp_path) -> tuple[dict, list[str]]:
    """Load a probed copy of ``page``: (the probe's verdict, console lines Chromium logged)."""
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    probed = str(tmp_path / ("probed-" + os.path.basename(page)))
    with open(probed, "w", encoding="utf-8") as fh:
        fh.write(text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1))
    proc = _browser(chromium, probed, str(tmp_path / f"profile-{os.path.basename(page)}"),
                    "--virtual-time-budget=10000", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    verdict = json.loads(proc.stdout[start:proc.stdout.index("</pre>", start)].replace("&quot;", '"'))
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    return verdict, console


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("report") / "run")
    train(load_config(None, TINY), run)
    # What a run with train.fid_every and an evaluation adds (in the format they write it).
    with open(os.path.join(run, "fid.jsonl"), "w") as fh:
        for step, fid in ((2, 310.5), (4, 280.25), (6, 251.0)):
            fh.write(json.dumps({"step": step, "fid": fid, "n": 100, "steps": 3, "init": "buffer"}) + "\n")
    with open(os.path.join(run, "eval_classifier.json"), "w") as fh:
        json.dump({"accuracy": 0.41, "ece": 0.12, "n": 360}, fh)
    return run


def test_training_writes_the_report_and_a_browser_renders_it(run_dir, tmp_path, cli_env):
    chromium = _chromium()
    assert os.path.isfile(os.path.join(run_dir, "report.html"))  # written at the end of train
    out = str(tmp_path / "page.html")
    proc = run_cli(["report", run_dir, "--out", out], cli_env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["report"] == out
    page = open(out, encoding="utf-8").read()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    for text in ("FID", "classifier", "accuracy", "buffer_age_mean", "Asked (config.yaml)", "Resolved (runtime.yaml)"):
        assert text in page, text
    verdict, console = _probe(chromium, out, tmp_path)
    # 3 sample steps x (negatives, buffer draw, class rows); curves: 4 training, FID, 4 health.
    assert verdict["images"] == 9 and verdict["broken"] == 0 and verdict["svgs"] == 9, verdict
    assert verdict["errors"] == [] and console == [], (verdict, console)
    shot = str(tmp_path / "shot.png")
    proc = _browser(chromium, out, str(tmp_path / "profile-shot"), "--window-size=1300,2400", f"--screenshot={shot}")
    assert proc.returncode == 0 and os.path.isfile(shot), proc.stderr[-3000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    # A blank page is one flat colour (std 0); this one has text, curves and sample grids.
    assert pixels.shape == (2400, 1300) and pixels.std() > 10 and (pixels < 250).mean() > 0.02


def test_the_probe_sees_a_broken_image(run_dir, tmp_path):
    """Control: the same checks fail on a page with an image that does not decode and a console error."""
    chromium = _chromium()
    page = str(tmp_path / "broken.html")
    with open(page, "w") as fh:
        fh.write('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                 '<script>console.error("boom")</script></body></html>')
    verdict, console = _probe(chromium, page, tmp_path)
    assert verdict["images"] == 1 and verdict["broken"] == 1 and verdict["errors"] == ["load failed: IMG"]
    assert any('"boom"' in line for line in console), console


def test_missing_pieces_are_said_on_the_page(run_dir, tmp_path, cli_env):
    bare = str(tmp_path / "bare")
    shutil.copytree(run_dir, bare)
    for name in ("tb", "checkpoints", "samples"):
        shutil.rmtree(os.path.join(bare, name))
    for name in ("fid.jsonl", "eval_classifier.json", "report.html"):
        os.remove(os.path.join(bare, name))
    page = build_report(bare)
    for text in ("No FID measured", "No TensorBoard event files", "No checkpoint under checkpoints/",
                 "No sample grids", "No eval_*.json", "Missing from this run directory"):
        assert text in page, text
    assert "buffer_age_mean" in page  # what is there is still shown
    os.remove(os.path.join(bare, "metrics.jsonl"))
    assert "No metrics.jsonl records" in build_report(bare)
    # Not a run directory at all: one line, exit 2.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(["report", str(empty)], cli_env, cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("ebmscale: error:") and "not an ebmscale run" \
        in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
