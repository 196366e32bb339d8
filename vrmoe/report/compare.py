"""``vrmoe compare``: runs side by side, as a terminal table, markdown, CSV or JSON.

One record per run: the overrides that differ between the runs, then the metric
columns (final losses from ``summary.json``, the headline numbers of ``eval.json``
from ``vrmoe.eval.schema.METRICS``, throughput, status). A column appears only when
at least one run has the number, and a run without it shows a blank.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..config import ConfigError
from ..console import CommandParser, log_line
from ..eval import schema
from ..tracking import METRICS_FILE
from .runs import Run, load_runs, override_values, setting, typed_value, varied_override_keys

JACCARD_COLUMN = f"jaccard@{schema.JACCARD_GAMMA:g}"
# The eval.json numbers compare shows, in the table's order (names of schema.METRICS).
EVAL_COLUMNS = ("ece", "mcq_ece", "auroc_near", "auroc_near_score", "auroc_far", "auroc_far_score", JACCARD_COLUMN)


def _eval_column(name: str) -> Callable[[Run], Any]:
    read = schema.METRICS[name]
    return lambda run: read(run.evaluation)


def _error(run: Run) -> str | None:
    return run.summary.get("error") or (f"{METRICS_FILE} ends in a truncated line" if run.metrics_truncated else None)


# Metric columns: name -> how to read it from a run. Order is the table's order.
METRIC_COLUMNS: dict[str, Callable[[Run], Any]] = {
    "train_loss": lambda r: schema.number(r.summary.get("final_train_loss")),
    "val_loss": lambda r: schema.number(r.summary.get("final_val_loss")),
    **{name: _eval_column(name) for name in EVAL_COLUMNS},
    "tokens_per_s": lambda r: schema.number(r.summary.get("tokens_per_s")),
    "status": lambda r: r.status,
    "error": _error,
}

# Display precision per numeric column: losses and calibration need 4 digits to tell routers apart.
CELL_FORMATS = {"train_loss": "{:.4f}", "val_loss": "{:.4f}", "ece": "{:.4f}", "mcq_ece": "{:.4f}",
                "auroc_near": "{:.3f}", "auroc_far": "{:.3f}", JACCARD_COLUMN: "{:.3f}",
                "tokens_per_s": "{:,.0f}"}


def is_numeric_column(column: str) -> bool:
    """Whether a column holds numbers (right-aligned when shown)."""
    return column in CELL_FORMATS


def run_record(run: Run, override_keys: Iterable[str]) -> dict[str, Any]:
    """Every value a run can be shown, sorted or filtered by (before dropping empty columns)."""
    record: dict[str, Any] = {"run": run.label}
    for key in override_keys:
        record[key] = setting(run, key)
    for name, read in METRIC_COLUMNS.items():
        record[name] = read(run)
    return record


# ---------------------------------------------------------------------------
# Selecting and sorting
# ---------------------------------------------------------------------------

@dataclass
class Comparison:
    columns: list[str]
    records: list[dict[str, Any]]
    runs: list[Run]


def _parse_filters(filters: Sequence[str]) -> list[tuple[str, str]]:
    parsed = []
    for item in filters:
        if "=" not in item:
            raise ConfigError(f"--filter {item}: expected KEY=VALUE, e.g. --filter router=topk")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), value.strip()))
    return parsed


def _matches(value: Any, wanted: str) -> bool:
    if value is None:
        return wanted in ("", "null", "None")
    return value == typed_value(wanted) or str(value) == wanted  # K=2 matches 2 and 2.0; router=topk the text


def _lookup(run: Run, record: dict[str, Any], key: str) -> tuple[bool, Any]:
    """A filter key's value in a run: a column, an override, or any recorded config key."""
    if key in record:
        return True, record[key]
    value = setting(run, key)
    return value is not None or key in override_values(run), value


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None or value == "":
        return (2, 0)
    number = schema.number(value)
    if number is None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return (1, str(value))
    return (0, number)


def compare(paths: Sequence[str | Path], sort: str | None = None, filters: Sequence[str] = (),
            reverse: bool = False) -> Comparison:
    """The comparison of the runs at or below ``paths``: one record per run, the columns that
    hold a value for some run."""
    runs = load_runs(paths)
    wanted = _parse_filters(filters)
    if wanted:
        every_key = varied_override_keys(runs)
        full = [(run, run_record(run, every_key)) for run in runs]
        for key, _ in wanted:
            if not any(_lookup(run, record, key)[0] for run, record in full):
                raise ConfigError(f"--filter {key}=...: no run has {key}; filter on a column "
                                  f"({', '.join(['run', *every_key, *METRIC_COLUMNS])}) or a config key")
        runs = [run for run, record in full
                if all(_matches(_lookup(run, record, key)[1], value) for key, value in wanted)]
    keys = varied_override_keys(runs) if len(runs) > 1 else []
    pairs = []
    for run in runs:
        record = run_record(run, keys)
        record["path"] = str(run.path)
        pairs.append((record, run))
    columns = ["run", *keys] + [c for c in METRIC_COLUMNS if any(r[c] is not None for r, _ in pairs)]
    if sort:
        if sort not in ("run", "path", *keys, *METRIC_COLUMNS):
            raise ConfigError(f"--sort {sort}: no such column; choose one of {', '.join(columns)}")
        present = [p for p in pairs if _sort_key(p[0].get(sort))[0] < 2]
        blank = [p for p in pairs if _sort_key(p[0].get(sort))[0] == 2]  # blanks last in either direction
        present.sort(key=lambda p: _sort_key(p[0].get(sort)), reverse=reverse)
        pairs = present + blank
    return Comparison(columns=columns, records=[r for r, _ in pairs], runs=[run for _, run in pairs])


# ---------------------------------------------------------------------------
# Showing a comparison
# ---------------------------------------------------------------------------

def format_cell(column: str, value: Any, width: int | None = None) -> str:
    """One value as text, at its column's precision, cut to ``width`` characters."""
    if value is None:
        return ""
    if is_numeric_column(column) and schema.number(value) is not None:
        text = CELL_FORMATS[column].format(value)
    else:
        text = str(value)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def display_columns(comparison: Comparison) -> list[str]:
    """The columns a table shows: a best-AUROC's score name goes in the same cell as the number."""
    return [c for c in comparison.columns if not c.endswith("_score")]


def display_cell(record: dict[str, Any], column: str, width: int | None = None) -> str:
    """A table cell: the formatted value, with the score name after a best AUROC."""
    text = format_cell(column, record.get(column), width)
    score = record.get(f"{column}_score")
    return f"{text} ({score})" if text and score else text


OUTPUT_FORMATS = ("table", "markdown", "csv", "json")


def render(comparison: Comparison, output_format: str) -> str:
    """The comparison as text: ``json``, ``csv`` (every column, plus each run's path) or ``markdown``."""
    columns, records = comparison.columns, comparison.records
    if output_format == "json":
        return json.dumps([{c: r.get(c) for c in [*columns, "path"]} for r in records], indent=2) + "\n"
    if output_format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*columns, "path"])
        for r in records:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in [*columns, "path"]])
        return out.getvalue()
    shown = display_columns(comparison)
    if output_format == "markdown":
        lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
        for r in records:
            cells = [display_cell(r, c, 60 if c in ("run", "error") else None).replace("|", "\\|") for c in shown]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown output format {output_format!r}; choose json, csv or markdown")


def print_comparison(comparison: Comparison) -> None:
    """The comparison as a rich table on stdout. Numbers and settings are never cut; only the
    free-text run label and error message are shortened, so a row stays one line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    shown = display_columns(comparison)
    limits = {"run": 32, "error": 40}
    rows = [[display_cell(r, c, limits.get(c)) for c in shown] for r in comparison.records]
    table = Table(header_style="bold")
    for i, column in enumerate(shown):
        widest = max([len(column), *(len(row[i]) for row in rows)])
        table.add_column(column, justify="right" if is_numeric_column(column) else "left", no_wrap=True,
                         min_width=widest)
    status_style = {"completed": "green", "failed": "red", "incomplete": "yellow", "running": "yellow"}
    for record, cells in zip(comparison.records, rows):
        styled = []
        for column, text in zip(shown, cells):
            style = status_style.get(str(record.get("status"))) if column == "status" else None
            styled.append(f"[{style}]{escape(text)}[/]" if style else escape(text))
        table.add_row(*styled)
    console = Console()
    # Piped output has no terminal width to respect: print the table whole rather than squeezed to 80.
    Console(width=console.width if console.is_terminal else 10_000).print(table)


# ---------------------------------------------------------------------------
# Command line (shared with vrmoe dashboard)
# ---------------------------------------------------------------------------

def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The dirs to read and the --sort/--reverse/--filter options."""
    parser.add_argument("dirs", nargs="+", help="run dirs or sweep dirs (searched recursively for summary.json)")
    parser.add_argument("--sort", metavar="KEY", help="sort by a column, e.g. val_loss or ece")
    parser.add_argument("--reverse", action="store_true", help="sort descending (blanks stay last)")
    parser.add_argument("--filter", metavar="KEY=VALUE", action="append", default=[],
                        help="keep runs whose column or config key equals VALUE (repeatable; all must match)")


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="vrmoe compare", description="Runs side by side: the overrides that differ, final "
                           "losses, calibration, OOD AUROC, routing stability, throughput and status.")
    add_selection_arguments(parser)
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table",
                        help="table (default, for a terminal), markdown, csv or json")
    args = parser.parse_args(argv)
    comparison = compare(args.dirs, sort=args.sort, filters=args.filter, reverse=args.reverse)
    if not comparison.records:
        log_line(f"no run matches {' '.join('--filter ' + f for f in args.filter)}")
    if args.format == "table":
        if comparison.records:
            print_comparison(comparison)
        return
    sys.stdout.write(render(comparison, args.format))


__all__ = ["METRIC_COLUMNS", "EVAL_COLUMNS", "CELL_FORMATS", "Comparison", "compare", "run_record", "format_cell",
           "display_columns", "display_cell", "render", "print_comparison",
           "add_selection_arguments", "main"]
