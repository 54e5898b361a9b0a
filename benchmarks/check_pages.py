"""Render every HTML page each study writes in headless Chromium and check that its plots drew.

    python benchmarks/check_pages.py [--out DIR] [--keep] [--studies compare ablate sweep bench]

Runs each study at a tiny size into ``DIR/<study>`` (a fresh temporary folder by default), then,
for every ``*.html`` page, runs Chromium (``chromium`` from the distribution's packages, or
``$CHROMIUM``) with networking disabled:

* ``--dump-dom``: the rendered DOM must hold one plotly ``main-svg`` per plot on the page (pages
  without plots, such as compare's ``index.html``, must still load), and no page may reference a
  network URL;
* ``--screenshot``: the picture must not be blank (more than one colour in a grid of samples);
* ``--enable-logging=stderr``: no console error (``Uncaught``, ``ERROR:CONSOLE``).

Screenshots are kept under ``DIR/screenshots`` for a reader to look at. The RRG commands write
tables only (no HTML), so there is nothing of theirs to render. Exit status 1 if any page fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

TINY = {
    "compare": ["compare", "--steps", "60", "--quiet"],
    "ablate": ["ablate", "--problem", "toy", "--steps", "60", "--seeds", "3x"],
    "sweep": ["sweep", "--problem", "toy", "--method", "came_grad", "--space", "kappa=grid:1,2",
              "--space", "nu=grid:0,0.5", "--space", "rho=grid:0.3,0.6", "--steps", "60",
              "--record-every", "20", "--scheduler", "asha"],
    "bench": ["bench", "--K", "2", "4", "--d", "1e3", "1e4", "--repeats", "3", "--warmup", "1"],
}
NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def chromium() -> str:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium (or set CHROMIUM)")
    return exe


def browser(exe: str, page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
            "--virtual-time-budget=15000", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


def n_plots(page_text: str) -> int:
    return len(re.findall(r'class="plotly-graph-div"', page_text))


def not_blank(png: Path) -> bool:
    img = Image.open(png).convert("RGB")
    w, h = img.size
    colours = {img.getpixel((x * w // 20, y * h // 20)) for x in range(20) for y in range(20)}
    return len(colours) > 2


def check(exe: str, page: Path, shots: Path) -> list[str]:
    problems = []
    text = page.read_text(encoding="utf-8")
    if NETWORK.search(text):
        problems.append("references a network URL")
    if n_plots(text) and not (page.parent / "plotly.min.js").is_file():
        problems.append("plotly.min.js is missing beside the page")
    dom = browser(exe, page, "--dump-dom")
    drawn = dom.stdout.count('class="main-svg"')
    want = n_plots(text)
    if want and drawn < want:  # plotly draws 1-2 main-svg layers per plot
        problems.append(f"{want} plot(s) on the page, {drawn} rendered svg layer(s)")
    if dom.returncode != 0 or "</html>" not in dom.stdout:
        problems.append(f"chromium failed (exit {dom.returncode})")
    shot = shots / (page.parent.name + "__" + page.stem + ".png")
    log = browser(exe, page, f"--screenshot={shot}", "--window-size=1280,1000", "--enable-logging=stderr", "--v=0")
    errors = [line for line in log.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    if errors:
        problems.append("console: " + " | ".join(errors[:3]))
    if not shot.is_file() or not not_blank(shot):
        problems.append("blank screenshot")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--studies", nargs="+", choices=sorted(TINY), default=list(TINY))
    parser.add_argument("--reuse", action="store_true", help="check pages already under --out")
    args = parser.parse_args(argv)
    exe = chromium()
    root = args.out or Path(tempfile.mkdtemp(prefix="check-pages-"))
    root.mkdir(parents=True, exist_ok=True)
    mtl_opt = Path(sys.executable).with_name("mtl-opt")
    for study in args.studies:
        folder = root / study
        if args.reuse and folder.exists():
            continue
        cmd = [str(mtl_opt), *TINY[study], "--out", str(folder)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    shots = root / "screenshots"
    shots.mkdir(exist_ok=True)
    failures = 0
    pages = sorted(p for s in args.studies for p in (root / s).rglob("*.html"))
    for page in pages:
        problems = check(exe, page, shots)
        failures += bool(problems)
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {page.relative_to(root)} ({n_plots(page.read_text(encoding='utf-8'))} plot(s))"
              + ("" if not problems else ": " + "; ".join(problems)), flush=True)
    print(f"{len(pages)} page(s), {failures} failing; screenshots in {shots}")
    return 1 if failures or not pages else 0


if __name__ == "__main__":
    sys.exit(main())
