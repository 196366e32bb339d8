"""The documentation holds: links and images resolve, every `vrmoe train` command in a bash block
composes, the generated parts equal what the code writes now, the README's two commands are the
ones CI runs, the layout in docs/architecture.md lists every file of the package, and the
citation files agree."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vrmoe.compose import check_overrides, compose_config
from vrmoe.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TRAIN_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install . "
                 "&& vrmoe train")
TEST_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install '.[test]' "
                "&& python -m pytest -q")



def load_experiment(name: str):
    """A script of experiments/ as a module, importing its neighbours as it does when run there."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "experiments"))


DOCS_PAGES = load_experiment("docs_pages")
FENCE, bash_blocks, command_lines = DOCS_PAGES.FENCE, DOCS_PAGES.bash_blocks, DOCS_PAGES.command_lines
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.MULTILINE)
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
# Keys whose value names a run dir: a placeholder or an example path, not one that exists here.
RUN_DIR_KEYS = ("train.init_from", "train.resume")


def without_code(text: str) -> str:
    """The page with its fenced blocks and inline code spans blanked (links there are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "``", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group("title"))  # a link's text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    text = page.read_text()
    broken = []
    for match in LINK.finditer(without_code(text)):
        target = match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {path.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#real-heading) ![img](missing.png) [x](b.md#nope) `[code](gone.md)`\n"
                    "```\n[block](gone.md)\n```\n")
    assert broken_links(page) == ["missing.png (no such file)", "b.md#nope (no heading #nope in b.md)"]


# ---------------------------------------------------------------------------
# `vrmoe train` commands
# ---------------------------------------------------------------------------

def train_commands(text: str) -> list[tuple[str, list[str]]]:
    """(the command line, its arguments after `vrmoe train`) for each `vrmoe train` of a bash block,
    continuation lines joined, comments dropped and $VARIABLES expanded as the shell would; a
    `<placeholder>` becomes one word."""
    found = []
    for block in bash_blocks(text):
        for line in command_lines(block):
            words = [os.path.expandvars(w) for w in shlex.split(PLACEHOLDER.sub("<placeholder>", line), comments=True)]
            for i in range(len(words) - 1):
                if words[i] == "vrmoe" and words[i + 1] == "train":
                    found.append((line.strip(), words[i + 2:]))
                    break
    return found


def composable(args: list[str]) -> tuple[list[str], bool]:
    """The overrides to compose for a documented command line, and whether it can be composed here.

    Hydra's own flags and overrides go (composition does not read them), so do ``...``, a resume
    (it names a run dir that is not here) and any key whose value is a placeholder; a run to start
    from becomes a stand-in path (composition does not read it). A sweep (-m) composes its first
    combination. ``model=hf`` reads the checkpoint's config to compose, so it is only checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in args)
    parser = OverridesParser.create()
    out, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg == "--cfg":
            skip_next = True
            continue
        if arg in ("-m", "--multirun", "--help", "-h", "--hydra-help", "..."):
            continue
        assert not arg.startswith("-"), f"unknown flag {arg}"
        key, _, value = arg.partition("=")
        if key.startswith("hydra") or key == "train.resume":
            continue
        if key == "train.init_from":
            out.append("train.init_from=a_run_dir")
            continue
        if "<placeholder>" in value or value == "...":
            continue
        if multirun:
            parsed = parser.parse_overrides([arg])[0]
            if parsed.is_sweep_override():
                arg = f"{key}={next(iter(parsed.sweep_string_iterator()))}"
        out.append(arg)
    return out, not any(o.startswith("model=hf") for o in out)


def command_problem(args: list[str]) -> str | None:
    """Why a documented command would fail or set a knob that changes nothing; None when it is fine."""
    from vrmoe.knobs import duplicate_jobs, ignored_knobs, ignored_message

    overrides, can_compose = composable(args)
    try:
        app = compose_config(overrides) if can_compose else check_overrides(overrides)
    except ConfigError as exc:
        return str(exc)
    if app is not None and (ignored := ignored_knobs(app.router, overrides)):  # every knob shown must matter
        return ignored_message(app.router, ignored)
    if any(a in ("-m", "--multirun") for a in args) and (same := duplicate_jobs([a for a in args if "=" in a])):
        return f"the sweep runs the same job twice: {same[0]}"
    return None


def user_presets(tmp_path: Path) -> None:
    """The presets the docs show in ./conf (configuration.md's my_study), where vrmoe looks for them."""
    for block in FENCE.finditer((ROOT / "docs" / "configuration.md").read_text()):
        path = re.search(r"^# \./(conf/\S+\.yaml)$", block.group("body"), re.MULTILINE)
        if block.group("lang").strip() == "yaml" and path:
            (tmp_path / path.group(1)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path.group(1)).write_text(block.group("body"))


def test_every_documented_train_command_composes(tmp_path, monkeypatch):
    user_presets(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = {(page.relative_to(ROOT), line): args for page in DOCS for line, args in train_commands(page.read_text())}
    assert len(commands) > 30  # the pages have them: the parser found them
    problems, composed = [], {}
    for (page, line), args in commands.items():
        key = tuple(composable(args)[0])
        if key not in composed:
            composed[key] = command_problem(args)
        if composed[key]:
            problems.append(f"{page}: {line}\n    {composed[key]}")
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_misspelt_key():
    text = "```bash\nvrmoe train router=variational \\\n    router.sigma_intt=0.5   # a typo\n```\n"
    [(line, args)] = train_commands(text)
    assert "router.sigma_intt is not a config key" in command_problem(args)
    sweep = train_commands("```bash\nvrmoe train -m router=topk,variational 'router.layers=[0],[1]' seed=0,1\n```\n")
    assert composable(sweep[0][1]) == (["router=topk", "router.layers=[0]", "seed=0"], True)


# ---------------------------------------------------------------------------
# Generated parts, the two commands, the layout, the citation
# ---------------------------------------------------------------------------

def test_generated_pages_equal_what_the_code_writes_now():
    for path, text in DOCS_PAGES.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python experiments/docs_pages.py"


def test_the_readme_router_table_is_vrmoe_routers_markdown():
    assert DOCS_PAGES.router_table() in (ROOT / "README.md").read_text()


def test_the_readme_compare_table_is_what_the_showcase_wrote():
    blocks = DOCS_PAGES.generated_blocks((ROOT / "README.md").read_text(), "python experiments/readme_showcase.py")
    assert blocks == {"compare": (ROOT / "docs" / "images" / "compare.md").read_text().rstrip("\n")}


def test_the_performance_page_quotes_its_record_whole():
    page = (ROOT / "docs" / "performance.md").read_text()
    record = ROOT / "experiments" / "results" / "bench" / re.search(r"the record\s+\[`([^`]+)`\]", page).group(1)
    assert record.read_text().split("\n\n", 1)[1].rstrip("\n") in page  # the output below the record's header


def test_the_quick_start_runs_its_steps_in_order_on_the_dirs_they_make(tmp_path):
    timings = load_experiment("quickstart_timings")
    lines = DOCS_PAGES.quick_start((ROOT / "README.md").read_text())
    assert [line.split()[:2] for line in lines] == [["vrmoe", "train"]] * 4 + [["vrmoe", w] for w in
                                                                             ("eval", "compare", "dashboard")]
    day = tmp_path / "outputs" / "2026-12-03"
    for name in ("10-00-00-000001_topk", "10-05-00-000001_topk", "10-30-00-000001_topk", "11-00-00-000001_variational"):
        (day / name).mkdir(parents=True)
    # Each placeholder path is the newest run dir that matches it: the post-hoc step starts from the
    # fine-tuned run, the evaluation reads the post-hoc one.
    assert "train.init_from=outputs/2026-12-03/10-30-00-000001_topk" in timings.step_words(lines[3], tmp_path, False)
    assert timings.step_words(lines[4], tmp_path, False) == ["vrmoe", "eval",
                                                             "run=outputs/2026-12-03/11-00-00-000001_variational", "S=8"]
    smoke = timings.step_words(lines[0], tmp_path, True)
    assert smoke == ["vrmoe", "train", "model=tiny", "model.seq_len=64", "train.max_steps=20"]
    with pytest.raises(SystemExit, match="no run directory made so far matches outputs/\\*/\\*_swag"):
        timings.resolve("run=outputs/<date>/<time>_swag", tmp_path)



@pytest.mark.slow
def test_the_quick_start_runs_as_written():
    # Every step of the README's quick start, in order, as a user types it (at model=tiny and 20
    # steps): a step that the code no longer accepts fails here, not on a newcomer's machine.
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "quickstart_timings.py"), "--smoke"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| `vrmoe dashboard outputs/ -o report.html` |" in proc.stdout

def test_the_readmes_two_commands_are_the_ones_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci == [TEST_COMMAND]
    blocks = [block.strip() for block in bash_blocks((ROOT / "README.md").read_text())]
    assert TRAIN_COMMAND in blocks and TEST_COMMAND in blocks


def layout_entries(text: str) -> dict[str, str]:
    """Path -> the rest of its line, for every file and folder the layout block lists."""
    block = next(m.group("body") for m in FENCE.finditer(text) if m.group("body").startswith("vrmoe/"))
    entries: dict[str, str] = {}
    stack: list[str] = []
    for line in block.splitlines():
        name, _, rest = line.strip().partition(" ")
        if not (name.endswith("/") or re.fullmatch(r"[\w.-]+\.\w+|\.?[\w-]+/[\w.-]+", name)):
            continue  # a description's continuation
        depth = (len(line) - len(line.lstrip())) // 2
        stack[depth:] = [name.rstrip("/")]
        entries["/".join(stack)] = rest.strip()
    return entries


def test_the_layout_lists_every_file_of_the_package():
    entries = layout_entries((ROOT / "docs" / "architecture.md").read_text())
    missing_on_disk = [path for path in entries if not (ROOT / path).exists()]
    assert not missing_on_disk, f"docs/architecture.md lists what does not exist: {missing_on_disk}"
    unlisted = []
    for path in sorted((ROOT / "vrmoe").rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix()
        listed_in_folder = path.suffix == ".yaml" and re.search(rf"\b{re.escape(path.stem)}\b", entries.get(folder, ""))
        if rel not in entries and not listed_in_folder:
            unlisted.append(rel)
    assert not unlisted, f"docs/architecture.md does not list: {unlisted}"


def test_the_citation_files_agree():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(cff) and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert {"type", "title", "authors"} <= set(paper)
    readme = (ROOT / "README.md").read_text()
    bibtex = re.search(r"@article\{li2026variational,.*?\n\}", readme, re.DOTALL).group(0)
    assert f"title={{{paper['title']}}}" in bibtex
    authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in paper["authors"])
    assert f"author={{{authors}}}" in bibtex
    assert "arXiv:2603.09453" in bibtex and f"year={{{paper['year']}}}" in bibtex
    assert "MIT License" in (ROOT / "LICENSE").read_text()
