"""report.html: self-contained, rendered by headless Chromium with the front plot showing."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qpruner.pareto import TrialLog
from qpruner.plan import PrecisionPlan
from qpruner.report import hypervolume_curve, write_report
from qpruner.trial import TrialResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _results(tmp_path) -> Path:
    log = TrialLog(tmp_path, "accuracy")
    for i, (code, acc, mb) in enumerate([("4444", 0.20, 1.0), ("8888", 0.30, 2.0), ("4848", 0.25, 1.5),
                                         ("8484", 0.22, 1.5)]):
        plan = PrecisionPlan.from_bits([{"4": 4, "8": 8}[c] for c in code])
        log.add(f"t{i}", TrialResult(plan=plan, status="ok", objective=acc, weight_bytes=int(mb * 1e6),
                                     weight_bytes_predicted=int(mb * 1e6), avg_bits=6.0, accuracy=acc,
                                     perplexity=1 / acc, seconds={"total": 1.0}))
    plan = PrecisionPlan.from_bits([16] * 4)
    log.add("x1", TrialResult(plan=plan, status="infeasible", objective=-1000.5, weight_bytes=int(4e6),
                              weight_bytes_predicted=int(4e6), avg_bits=16.0))
    return tmp_path


def test_report_is_self_contained(tmp_path):
    out = write_report(_results(tmp_path), "accuracy")
    text = out.read_text()
    for name in ("pareto.png", "bits.png", "hypervolume.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert text.count("data:image/png;base64,") == 3
    assert not re.search(r'(src|href)="(https?:)?//', text)   # nothing to fetch: opens offline
    assert text.count("<tr") >= 5 + 6 and 'class="front"' in text


def test_hypervolume_curve_grows_with_the_front(tmp_path):
    import pandas as pd
    trials = pd.read_parquet(_results(tmp_path) / "trials.parquet")
    curve = hypervolume_curve(trials, "accuracy")
    assert len(curve) == 5 and curve == sorted(curve) and curve[-1] > curve[0]


def test_report_hypervolume_uses_the_searchs_fixed_reference(tmp_path):
    """report.html, `qpruner status` and the search's log give one hypervolume for one run."""
    import json
    import pandas as pd
    from qpruner.rundir import MARKER, RunDir
    directory = _results(tmp_path)
    (directory / MARKER).write_text(json.dumps({"job": "t", "hv_reference": [0.1, 3e6]}))
    ref = RunDir(directory).reference()
    expected = TrialLog(directory, "accuracy").summary(ref)["hypervolume"]
    trials = pd.read_parquet(directory / "trials.parquet")
    assert hypervolume_curve(trials, "accuracy", ref)[-1] == pytest.approx(expected)
    assert hypervolume_curve(trials, "accuracy")[-1] != pytest.approx(expected)   # the fallback differs
    text = write_report(directory, "accuracy").read_text()
    assert f"<td>{expected:.4g}</td>" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chromium_renders_the_front_plot(tmp_path):
    out = write_report(_results(tmp_path), "accuracy")
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1400", "--dump-dom",
                          out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert int(re.search(r'data-front-loaded="(\d+)"', body).group(1)) > 100  # the front PNG decoded
    assert re.search(r'data-rows="(\d+)"', body).group(1) == "5"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}2", "--window-size=1200,1400",
                    f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    from PIL import Image, ImageChops, ImageStat
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50                     # a rendered page with plots, not a blank or error page
    # where the page laid out the front plot (inside its 1px border), the screenshot shows pareto.png
    x, y, w, h = (int(v) for v in re.search(r'data-front-box="([\d,]+)"', body).group(1).split(","))
    assert w > 300 and h > 200 and y + h <= 1400
    shown = image.crop((x, y, x + w, y + h))
    plot = Image.open(out.parent / "pareto.png").convert("RGB").resize((w, h))
    def distance(a, b):
        return max(ImageStat.Stat(ImageChops.difference(a, b)).mean)
    blank = Image.new("RGB", (w, h), "white")
    print("screenshot vs plot", distance(shown, plot), "plot vs blank", distance(plot, blank))
    assert distance(shown, plot) < 0.2 * distance(plot, blank)   # that plot, not an empty box or another plot
    other = Image.open(out.parent / "hypervolume.png").convert("RGB").resize((w, h))
    assert distance(shown, other) > 0.5 * distance(plot, blank)


def test_report_refuses_a_directory_qpruner_did_not_write(tmp_path, capsys):
    """#25.3: `qpruner report` on a copied trials.parquet with the user's own report.html: refused, untouched."""
    from qpruner.cli import main
    theirs = tmp_path / "notours"
    theirs.mkdir()
    shutil.copy(_results(tmp_path / "src") / "trials.parquet", theirs / "trials.parquet")
    (theirs / "report.html").write_text("mine")
    assert main(["report", str(theirs)]) == 2
    assert "not written by qpruner" in capsys.readouterr().err
    assert (theirs / "report.html").read_text() == "mine" and sorted(p.name for p in theirs.iterdir()) == \
        ["report.html", "trials.parquet"]


def test_report_files_are_replaced_whole(tmp_path, monkeypatch):
    """A report (or the search rewriting it) never leaves half a file: each is written aside, then renamed."""
    import os
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real(a, b)))
    write_report(_results(tmp_path), "accuracy")
    assert {"report.html", "pareto.png", "bits.png", "hypervolume.png"} <= set(renamed)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
