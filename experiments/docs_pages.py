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


# page (relative to the repository root) -> the generated blocks it holds.
PAGES: dict[str, tuple[str, ...]] = {
    "README.md": ("routers",),
    "docs/routers.md": ("routers",),
    "docs/configuration.md": ("configuration",),
}
BLOCKS = {"routers": router_table, "configuration": configuration_block}


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
