"""``vrmoe routers``: the registered routers, read from the registry (their docs, keys and signals)."""

from __future__ import annotations

import dataclasses
import inspect

from ...config import ConfigError, RouterConfig
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

    if argv and argv[0] in ("-h", "--help"):
        print("usage: vrmoe routers [--markdown]\n\nThe registered routers (router=<name>), their keys and "
              "defaults, and their uncertainty signals; --markdown prints the table as Markdown.")
        return
    if argv and argv[0] not in ("--markdown",):
        raise ConfigError(f"vrmoe routers: unknown argument {argv[0]!r}; use --markdown or nothing")
    rows = router_rows()
    if argv:
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
