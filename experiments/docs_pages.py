"""The generated parts of the documentation, written from the code so that they cannot drift.

    python experiments/docs_pages.py            # rewrite the generated blocks
    python experiments/docs_pages.py --check    # exit 1, naming each page whose blocks are stale

A generated block sits between two marker lines in a page:

    <!-- BEGIN GENERATED: <name> (python experiments/docs_pages.py) -->
    ...
    <!-- END GENERATED: <name> -->

and everything outside the markers is written by hand. The blocks:

* ``configuration``: every key of the default configuration with its value and description, the
  reference ``vrmoe train --help`` prints (``vrmoe.reference.reference``, read from the comments on
  the dataclass fields), section by section; each config group's options with the first comment
  of their YAML files; and each router's own keys (``vrmoe train router=<name> --help``).
* ``routers``: the router table, the output of ``vrmoe routers --markdown`` (in README.md and
  docs/routers.md).
* ``study-<format>`` and ``study-<format>-on-ts``: the study's tables in docs/results.md, from
  ``experiments/results/results.json`` (``python experiments/paper_table.py``); ``sigmoid-study``:
  the table of ``experiments/results/sigmoid_study.md``; ``cost-paper-models``: each router's
  FLOPs on the paper's three models, from ``experiments/results/cost_paper_models.md``.

``tests/test_docs.py`` holds the committed pages equal to what this script writes now.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python experiments/docs_pages.py"


def marker(command: str) -> re.Pattern:
    """The generated blocks that ``command`` writes: ``name`` and ``body`` (the lines between the markers)."""
    return re.compile(rf"<!-- BEGIN GENERATED: (?P<name>[\w-]+) \({re.escape(command)}\) -->\n"
                      r"(?P<body>.*?)<!-- END GENERATED: (?P=name) -->", re.DOTALL)


MARKER = marker(COMMAND)
# The config groups whose options are YAML files, besides the groups of vrmoe.compose.CONFIG_GROUPS.
LAUNCHER_GROUP = "hydra/launcher"


def router_table() -> str:
    """``vrmoe routers --markdown``, exactly as the command prints it."""
    from vrmoe.model.routers.listing import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--markdown"])
    return out.getvalue().rstrip("\n")


def _sections(text: str) -> dict[str, list[list[str]]]:
    """The reference's text as section title -> its entries (each a key line and its description lines)."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), [])
        elif line.startswith("      "):
            current[-1].append(line)
        else:
            current.append([line])
    return sections


def _block(entries: list[list[str]]) -> list[str]:
    return ["```text", *(line for entry in entries for line in entry), "```"]


def yaml_description(path: Path) -> str:
    """The leading comment of a config file, joined into one paragraph: example commands (indented
    in the comment) as inline code, Hydra's ``@package`` line left out."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.strip().startswith("@package") or not text.strip():
            continue
        words.append(f"`{text.strip()}`" if text.startswith("   ") else text.strip())
    return _markdown_text(" ".join(words))


def _markdown_text(text: str) -> str:
    """Plain text for a Markdown table cell: ``|`` escaped, and ``<`` ``>`` outside code spans
    written as entities (GitHub would read ``<split>`` as an HTML tag and drop it)."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def group_table() -> list[str]:
    from vrmoe.compose import CONFIG_GROUPS, config_dir
    from vrmoe.model.routers.base import ROUTERS

    rows = ["| group | option | what it is (the first comment of its file) |", "|---|---|---|"]
    for group in (*CONFIG_GROUPS, LAUNCHER_GROUP):
        files = {p.stem: p for p in sorted((config_dir() / group).glob("*.yaml"))}
        names = sorted(set(files) | (set(ROUTERS) if group == "router" else set()))
        for name in names:
            where = f"`vrmoe/conf/{group}/{name}.yaml`" if name in files else "the router's dataclass alone"
            text = yaml_description(files[name]) if name in files else ""
            rows.append(f"| `{group}` | `{name}` | {text + ' ' if text else ''}({where}) |")
    return rows


def configuration_block() -> str:
    from vrmoe.compose import compose_config
    from vrmoe.config import RouterConfig
    from vrmoe.model.routers.base import ROUTERS
    from vrmoe.reference import reference

    lines = ["### Groups and their options", "", *group_table(), "",
             "### Every key of the default configuration", "",
             "`vrmoe train --help` (the default: `model=small router=topk data=stdlib_docs task=lm`):", ""]
    for title, entries in _sections(reference(compose_config([]))).items():
        lines += [f"#### {title}", "", *_block(entries), ""]
    lines += ["### Each router's own keys", "",
              "The router section of `vrmoe train router=<name> --help`: the keys a router adds to the shared "
              "ones above (`router.k`, `router.samples`, `router.load_balance_weight`, `router.z_loss_weight`, "
              "`router.layers`), and the value of `S` it defaults to.", ""]
    shared = {f"router.{f.name}" for f in dataclasses.fields(RouterConfig)}
    for name in sorted(ROUTERS):
        app = compose_config([f"router={name}"])
        own = [entry for entry in _sections(reference(app))["router"]
               if entry[0].split("=")[0].strip() not in shared]
        lines += [f"#### router={name}", "", f"`S` defaults to {app.router.samples}.", ""]
        lines += [*_block(own), ""] if own else ["No keys of its own.", ""]
    return "\n".join(lines).rstrip("\n")


RESULTS = ROOT / "experiments" / "results"


# How docs/results.md names each row's OOD score.
SCORE_NAMES = {"predictive_entropy": "entropy", "mutual_information": "MI", "logit_variance": "tr Σ",
               "temperature": "T", "scaled": "entropy"}


def study_block(fmt: str, on_ts: bool) -> str:
    """One table of docs/results.md from experiments/results/results.json (``python
    experiments/paper_table.py``): a format's comparison against Top-K, or on top of temperature
    scaling (every predictive scaled, against Top-K + TS)."""
    import json

    sys.path.insert(0, str(ROOT / "experiments"))
    from paper_table import fmt_interval as _interval  # the study's own format, as its table.md has it

    rows = json.loads((RESULTS / "results.json").read_text())["formats"][f"{fmt}_on_ts" if on_ts else fmt]
    reference = "Top-K + TS" if on_ts else "Top-K"
    lines = [f"| Method | predictive | Acc | ECE [95% CI] | ΔECE vs {reference} | ΔECE by seed | ΔNLL vs {reference} "
             f"| AUROC near: docstrings (score) | ΔAUROC near | AUROC far | ΔAUROC far | Jaccard γ=0.01 "
             "| FLOPs over Top-K |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        if row.get("not_run"):  # a router the study's invocation left out (--skip)
            lines.append(f"| {row['label']} | not run yet |" + " - |" * 11)
            continue
        first = name == ("topk_ts" if on_ts else "topk")
        diff = (lambda key: "reference") if first else (lambda key: _interval(row.get(key), True))
        by_seed = "reference" if first else " / ".join(f"{d:+.3f}" for d in row.get("d_ece_10_by_seed") or []) or "-"
        near = row.get("auroc_thirdparty_docs")
        score = SCORE_NAMES.get(row["ood_score"], row["ood_score"])
        flops, jaccard = row.get("flops"), row.get("jaccard")
        lines.append(f"| {row['label']} | {row['predictive']} | {row['acc']['estimate']:.3f} | {_interval(row['ece'])} "
                     f"| {diff('d_ece_10')} | {by_seed} | {diff('d_nll')} "
                     f"| {'-' if near is None else f'{_interval(near)} ({score})'} | {diff('d_auroc_thirdparty_docs')} "
                     f"| {_interval(row.get('auroc_far'))} | {diff('d_auroc_far')} "
                     f"| {'-' if jaccard is None else f'{jaccard:.3f}'} "
                     f"| {'-' if flops is None else f'{100 * flops:+.2f}%'} |")
    return "\n".join(lines)


SWEEP_ROWS = (("S", "S = {} (at evaluation)"), ("beta", "beta = {}"), ("sigma_init", "sigma_init = {}"),
              ("layers", "MoE layers with the router: {}"), ("model_size", "model: {}"))


def sweep_block(fmt: str) -> str:
    """One format's sweeps of the mean-field router (``python experiments/paper_table.py --sweep``):
    the test split's ECE of each predictive at each setting, from experiments/results/results.json
    (the intervals are in paper_table.md), or a line saying they have not run."""
    import json

    sweeps = json.loads((RESULTS / "results.json").read_text()).get("sweeps", {}).get(fmt)
    if not sweeps:
        # A format's sweeps reach results.json once all of their runs are on disk (sweeps_finished).
        return (f"The {fmt} format's sweeps are not in the study's results yet: `python experiments/paper_table.py "
                "--sweep --out <the study's folder>` runs what is missing and reports both formats.")
    ece = lambda point: "-" if point is None else f"{point[0]:.3f}"  # noqa: E731
    topk, topk_ts = (sweeps["S"]["series"][name][0] for name in ("Top-K", "Top-K + temperature scaling"))
    lines = [f"Top-K's ECE {ece(topk)}, Top-K + temperature scaling {ece(topk_ts)}.", "",
             "| setting | variational diag, routing mean | variational diag, BMA |", "|---|---:|---:|"]
    for name, label in SWEEP_ROWS:
        block = sweeps[name]
        cells = [" / ".join(ece(p) for p in block["series"][f"variational diag, {predictive}"])
                 for predictive in ("routing mean", "BMA")]
        lines.append(f"| {label.format(' / '.join(str(x) for x in block['x']))} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def sigmoid_study_block() -> str:
    """The table of experiments/results/sigmoid_study.md (``python experiments/sigmoid_study.py
    --write-results``), as that page has it."""
    text = (RESULTS / "sigmoid_study.md").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


# The paper's three models in experiments/results/cost_paper_models.md, and the rows of the cost table
# beside the paper's FLOPs claim: (label, router, S).
PAPER_MODELS = (("Granite-3B", "granite-3.0-3b-a800m-base"), ("Qwen1.5-MoE-A2.7B", "qwen1.5-moe-a2.7b"),
                ("DeepSeek-V2-Lite", "deepseek-v2-lite"))
COST_ROWS = (("MC-dropout, S = 32", "mc_dropout", "32"), ("SWAG, S = 32", "swag", "32"),
             ("VTSR", "vtsr", "1"), ("variational mean-field, S = 32", "variational diag", "32"),
             ("variational full covariance, S = 32", "variational full", "32"))


def cost_block() -> str:
    """Each router's FLOPs over Top-K's on the paper's three models, on every MoE layer and on the
    last one (default heads), from experiments/results/cost_paper_models.md (``vrmoe cost
    experiments/paper_models``)."""
    cells: dict[tuple[str, str, str], list[str]] = {}
    model = None
    for line in (RESULTS / "cost_paper_models.md").read_text().splitlines():
        if line.startswith("*") and not line.startswith("**"):  # a model's caption, or the summary's (no colon)
            model = line.strip("*").split(":", 1)[0] if ":" in line else None
        elif line.startswith("| ") and model is not None:
            parts = [p.strip() for p in line.strip("|").split("|")]
            cells[(model, parts[0], parts[1])] = [p.split()[0] for p in parts[2:]]
    head = " | ".join(f"{label}: all / last layer" for label, _ in PAPER_MODELS)
    lines = [f"| router | {head} |", "|---|" + "---:|" * len(PAPER_MODELS)]
    for label, router, samples in COST_ROWS:
        row = [cells[(name, router, samples)] for _, name in PAPER_MODELS]
        lines.append(f"| {label} | " + " | ".join(f"{c[0]} / {c[2]}" for c in row) + " |")
    return "\n".join(lines)


# page (relative to the repository root) -> the generated blocks it holds.
PAGES: dict[str, tuple[str, ...]] = {
    "README.md": ("routers",),
    "docs/routers.md": ("routers",),
    "docs/configuration.md": ("configuration",),
    "docs/results.md": ("study-cloze", "study-letter", "study-cloze-on-ts", "study-letter-on-ts", "sweeps-letter",
                        "sweeps-cloze", "sigmoid-study", "cost-paper-models"),
}
BLOCKS = {"routers": router_table, "configuration": configuration_block,
          "study-cloze": lambda: study_block("cloze", False), "study-letter": lambda: study_block("letter", False),
          "study-cloze-on-ts": lambda: study_block("cloze", True),
          "study-letter-on-ts": lambda: study_block("letter", True), "sigmoid-study": sigmoid_study_block,
          "sweeps-letter": lambda: sweep_block("letter"), "sweeps-cloze": lambda: sweep_block("cloze"),
          "cost-paper-models": cost_block}


def render(text: str, blocks: dict[str, str], command: str = COMMAND) -> str:
    """``text`` with each block that ``command`` generates replaced by its content in ``blocks``."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        return (f"<!-- BEGIN GENERATED: {name} ({command}) -->\n"
                f"{blocks[name]}\n<!-- END GENERATED: {name} -->")
    return marker(command).sub(fill, text)


def generated_blocks(text: str, command: str = COMMAND) -> dict[str, str]:
    """The blocks of ``text`` that ``command`` generates: name -> content (without its last newline)."""
    return {m.group("name"): m.group("body").removesuffix("\n") for m in marker(command).finditer(text)}


def rendered(root: Path = ROOT) -> dict[Path, str]:
    """Each page with its generated blocks as the code writes them now."""
    blocks = {name: build() for name, build in BLOCKS.items()}
    out = {}
    for page, names in PAGES.items():
        path = root / page
        text = path.read_text()
        found = [m.group("name") for m in MARKER.finditer(text)]
        if sorted(found) != sorted(names):
            raise SystemExit(f"{page}: generated blocks {found}, expected {list(names)}")
        out[path] = render(text, blocks)
    return out


# ---------------------------------------------------------------------------
# Reading the pages' commands
# ---------------------------------------------------------------------------

FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def bash_blocks(text: str) -> list[str]:
    """The bodies of a page's ``bash`` (or ``sh``, ``shell``) fenced blocks."""
    return [m.group("body") for m in FENCE.finditer(text) if m.group("lang").strip() in ("bash", "sh", "shell")]


def command_lines(block: str) -> list[str]:
    """A shell block's command lines: continuation lines joined, blank and comment-only lines dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def quick_start(readme: str) -> list[str]:
    """The command lines of the README's Quick start: the first bash block under ``## Quick start``."""
    section = re.search(r"^## Quick start\n(?P<body>.*?)(?=^## )", readme, re.DOTALL | re.MULTILINE)
    if section is None or not bash_blocks(section.group("body")):
        raise ValueError("README.md: no bash block under '## Quick start'")
    return command_lines(bash_blocks(section.group("body"))[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if path.read_text() != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run python experiments/docs_pages.py", file=sys.stderr)
        return 1
    for page in stale:
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
