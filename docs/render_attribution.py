"""Render an attribution page (``jaxval attribute``'s attribution.html) to a PNG with headless Chromium.

    python docs/render_attribution.py out/smollm2/attribution/attribution.html docs/attribution.png [--height 2200]

Needs Debian's ``chromium`` package (``apt-get install chromium``); the page is self-contained (no network).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile


def render(page: str, png: str, width: int = 1180, height: int = 2200, browser: str | None = None) -> str:
    exe = browser or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("no chromium found: apt-get install chromium (or pass --browser)")
    page, png = os.path.abspath(page), os.path.abspath(png)
    os.makedirs(os.path.dirname(png), exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
               "file://" + page]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    if not os.path.exists(png):
        raise SystemExit(f"chromium wrote no screenshot ({' '.join(cmd)})")
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1180)
    p.add_argument("--height", type=int, default=2200)
    p.add_argument("--browser", default=None)
    a = p.parse_args(argv)
    print(render(a.page, a.png, a.width, a.height, a.browser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
