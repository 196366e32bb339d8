"""The README's "What you get": a `vrmoe compare` table and a screenshot of the dashboard, from runs
trained here.

    python experiments/readme_showcase.py             # 3 to 4 minutes measured on a busy 2-core CPU
    python experiments/readme_showcase.py --keep DIR  # keep the runs and report.html in DIR

Trains a Top-K language model at ``model=tiny`` (300 steps, seed 0), fine-tunes it on multiple
choice twice, 200 steps each, once with Top-K and once with the full-covariance variational router
(the two runs differ in the router alone, so the dashboard names them by it), evaluates both with
``S=8``, and writes

* ``docs/images/compare.md``: what ``vrmoe compare <the two runs> --format markdown`` prints, and
  the same table in README.md's block ``compare`` (``tests/test_docs.py`` holds the two equal);
* ``docs/images/dashboard.png``: the top of ``vrmoe dashboard <the runs> -o report.html`` in a
  1280 x 1600 window, shot by headless Chromium (without one, the script says so in one line and
  leaves the image as it is).

The runs train in a temporary folder (or ``--keep DIR``), as a user runs them: the ``vrmoe``
console script, one command each, printed with its seconds. The throughput column varies from run
to run; the other numbers are those of the fixed seed on this machine's torch build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_pages import render  # experiments/docs_pages.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND = "python experiments/readme_showcase.py"  # the README's block names the command that writes it
IMAGES = ROOT / "docs" / "images"
COMPARE = IMAGES / "compare.md"
SCREENSHOT = IMAGES / "dashboard.png"
WINDOW = "1280,1600"
TINY = ["model=tiny", "model.seq_len=64", "logger=none", "seed=0"]


def vrmoe() -> str:
    """The console script next to this Python (the one a user runs), else ``vrmoe`` on the PATH."""
    script = Path(sys.executable).with_name("vrmoe")
    return str(script) if script.exists() else "vrmoe"


def run(args: list[str], cwd: Path) -> str:
    """Run ``vrmoe <args>`` in ``cwd``, printing the command; its stdout."""
    print("$ vrmoe " + " ".join(args), end="", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([vrmoe(), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"vrmoe {args[0]} exited {proc.returncode}")
    return proc.stdout


def train_and_evaluate(work: Path) -> list[str]:
    """A Top-K language model, then two fine-tunings of it on multiple choice that differ only in the
    router (Top-K, the full-covariance variational router), each evaluated; the two run dirs."""
    run(["train", *TINY, "train.max_steps=300", "hydra.run.dir=runs/base_lm"], work)
    finetunes = []
    for router in ("topk", "variational"):
        run(["train", *TINY, f"router={router}", *(["router.covariance=full"] if router == "variational" else []),
             "task=mcq", "train.max_steps=200", "train.init_from=runs/base_lm", f"hydra.run.dir=runs/{router}"], work)
        run(["eval", f"run=runs/{router}", "S=8"], work)
        finetunes.append(f"runs/{router}")
    return finetunes


def screenshot(html: Path, png: Path, profile: Path) -> bool:
    """The page as headless Chromium draws it in a 1280 x 1600 window; False without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("no headless Chromium (apt-get install -y chromium): docs/images/dashboard.png is left as it is")
        return False
    proc = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--no-first-run", "--disable-background-networking", f"--user-data-dir={profile}",
                           "--virtual-time-budget=5000", f"--window-size={WINDOW}", f"--screenshot={png}",
                           html.as_uri()], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not png.exists():
        raise SystemExit(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="train in DIR and keep the runs and report.html there (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vrmoe-showcase-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        names = train_and_evaluate(work)
        table = run(["compare", *names, "--format", "markdown"], work)
        IMAGES.mkdir(parents=True, exist_ok=True)
        COMPARE.write_text(table.rstrip("\n") + "\n", encoding="utf-8")
        README.write_text(render(README.read_text(), {"compare": table.rstrip("\n")}, COMMAND))
        print(f"wrote {COMPARE.relative_to(ROOT)} and its copy in README.md")
        run(["dashboard", *names, "-o", "report.html", "--title", "vrmoe dashboard"], work)
        if screenshot(work / "report.html", SCREENSHOT, Path(tmp) / "chromium-profile"):
            print(f"wrote {SCREENSHOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
