"""Make docs/img/report.png, the README's picture of `mvc report`: the demo model through the
bird-bone recipe, its magnitude scores, the report, and a headless Chromium screenshot of it.

    .venv/bin/python scripts/report_screenshot.py [--repo DIR] [--out docs/img/report.png]

--repo reuses a demo repository that already ran bird-bone (else one is made in a temporary
directory: about two minutes on two cores). Needs the report extra and `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mvc(*args: str, cwd: str) -> None:
    subprocess.run([sys.executable, "-m", "mvc", "-q", *args], cwd=cwd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", help="a demo repository that already ran bird-bone")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "report.png"))
    ap.add_argument("--size", default="1280,1900", help="the browser window, WIDTH,HEIGHT")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo
        if repo is None:
            repo = os.path.join(tmp, "demo")
            subprocess.run([sys.executable, "-m", "mvc", "init", "--demo", repo], check=True, stdout=subprocess.DEVNULL)
            mvc("compress", "run", "bird-bone", cwd=repo)
        scores = os.path.join(tmp, "scores.json")
        mvc("compress", "score", "--method", "magnitude", "HEAD~1", "-o", scores, cwd=repo)
        page = os.path.join(tmp, "report.html")
        mvc("report", "-o", page, "--scores", scores, cwd=repo)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", "--virtual-time-budget=15000",
                        f"--user-data-dir={os.path.join(tmp, 'profile')}", f"--screenshot={args.out}",
                        "file://" + page], check=True, capture_output=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
