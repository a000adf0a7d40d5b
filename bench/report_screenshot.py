"""Render a search's report.html with headless Chromium (Debian's `chromium`) and save a screenshot.

    .venv/bin/python bench/report_screenshot.py [results/smollm2_demo] [results/bench/report_screenshot.png]

Regenerates the report from the results directory first, then renders it offline (no network flags),
and prints what the page reported about itself (front image decoded, table rows).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qpruner.report import write_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(results: str = "results/smollm2_demo", out: str = "results/bench/report_screenshot.png") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install chromium)")
    html = write_report(results)  # the metric is read from the saved job.yaml
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}/a", "--window-size=1280,1800",
                              "--dump-dom", html.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        body = re.search(r"<body[^>]*>", dom)
        print("page:", body.group(0) if body else "(no body rendered)")
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}/b", "--window-size=1280,1800",
                        "--hide-scrollbars", f"--screenshot={Path(out).resolve()}", html.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    print("wrote", out)


if __name__ == "__main__":
    main(*sys.argv[1:])
