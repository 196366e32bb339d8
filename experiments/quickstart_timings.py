"""The README's quick start run as written, one step at a time, with the seconds each step takes.

    python experiments/quickstart_timings.py            # the whole quick start (minutes on 2 CPU cores)
    python experiments/quickstart_timings.py --smoke    # every step at model=tiny and 20 steps: a check in a minute
    python experiments/quickstart_timings.py --keep DIR # run in DIR and keep its outputs/

Reads the commands from the README's Quick start block (``quick_start`` in
``experiments/docs_pages.py``, the parser ``tests/test_docs.py`` uses too), runs them in order in a
fresh working folder, each placeholder path (``outputs/<date>/<time>_topk``) standing for the newest
run directory the steps before made that matches it, and prints a Markdown table: each step and its
seconds. ``--smoke`` sets ``model=tiny model.seq_len=64 train.max_steps=20`` on every ``vrmoe
train`` (in place of its own ``model`` and ``train.max_steps``): the sequence checked end to end,
not its timing.

"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_pages import quick_start  # experiments/docs_pages.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"<[^<>\s]*>")
SMOKE = ["model=tiny", "model.seq_len=64", "train.max_steps=20"]


def resolve(word: str, work: Path) -> str:
    """``word`` with a placeholder path (``outputs/<date>/<time>_topk``) replaced by the newest existing
    path under ``work`` that matches it (run directories sort by launch time); unchanged without one."""
    if not PLACEHOLDER.search(word):
        return word
    key, eq, value = word.partition("=") if "=" in word else ("", "", word)
    pattern = PLACEHOLDER.sub("*", value)
    matches = sorted(p for p in work.glob(pattern) if p.is_dir())
    if not matches:
        raise SystemExit(f"{word}: no run directory made so far matches {pattern}")
    return f"{key}{eq}{matches[-1].relative_to(work)}"


def step_words(line: str, work: Path, smoke: bool) -> list[str]:
    """A quick-start line as the arguments to run: comments dropped, placeholders resolved, and with
    ``smoke`` the tiny overrides on a ``vrmoe train``."""
    words = [resolve(w, work) for w in shlex.split(line, comments=True)]
    if smoke and words[:2] == ["vrmoe", "train"]:
        words = [w for w in words if not w.startswith(("model=", "train.max_steps="))] + SMOKE
    return words


def vrmoe_script() -> str:
    script = Path(sys.executable).with_name("vrmoe")  # the console script, as a user runs it
    return str(script) if script.exists() else "vrmoe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"every vrmoe train at {' '.join(SMOKE)}: checks the sequence, does not time it")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="run in DIR and keep what the steps write (default: a temporary folder)")
    args = parser.parse_args(argv)
    lines = quick_start((ROOT / "README.md").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="vrmoe-quickstart-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for line in lines:
            words = step_words(line, work, args.smoke)
            print("$ " + shlex.join(words), flush=True)
            start = time.perf_counter()
            proc = subprocess.run([vrmoe_script() if words[0] == "vrmoe" else words[0], *words[1:]], cwd=work)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{shlex.join(words)} exited {proc.returncode}")
            rows.append((" ".join(line.split("#")[0].split()), seconds))
    print(f"\n| step (README.md, Quick start) | seconds{' (--smoke)' if args.smoke else ''} |\n|---|---|")
    for step, seconds in rows:
        print(f"| `{step}` | {seconds:.0f} |")
    print(f"\ntotal: {sum(seconds for _, seconds in rows):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
