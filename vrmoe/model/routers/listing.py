"""``vrmoe routers``: the registered routers, read from the registry (their docs, keys and signals)."""

from __future__ import annotations

import dataclasses
import inspect

from ...config import RouterConfig
from .base import ROUTERS


def router_rows() -> list[dict[str, str]]:
    """One row per registered router: its name, the first line of its doc, its own keys with their
    defaults, whether it samples at evaluation and its OOD signal."""
    shared = {f.name for f in dataclasses.fields(RouterConfig)}
    rows = []
    for name, cls in ROUTERS.items():
        own = [f for f in dataclasses.fields(cls.Config) if f.name not in shared]
        rows.append({
            "router": name,
            "what it does": (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " "),
            "its own keys": ", ".join(f"router.{f.name}={f.default}" for f in own),
            "averages S at eval": "yes" if cls.Config().samples_at_eval() else "no",
            "OOD signal": cls.uncertainty_signal or "",
        })
    return rows


def main(argv: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ...console import CommandParser

    parser = CommandParser(prog="vrmoe routers", description="The registered routers (router=<name>), their own "
                           "keys and defaults, whether they average S samples at evaluation, and their OOD signals.")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (README.md and docs/routers.md)")
    args = parser.parse_args(argv)
    rows = router_rows()
    if args.markdown:
        headers = list(rows[0])
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        for row in rows:
            print("| " + " | ".join(row[h].replace("|", "\\|") for h in headers) + " |")
        return
    table = Table(title="routers (router=<name>)", title_justify="left")
    for header in rows[0]:
        table.add_column(header)
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    Console(width=console.width if console.is_terminal else 200).print(table)
