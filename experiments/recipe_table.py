"""The paper's table from the runs of ``experiments/paper_recipe.sh``: one row per method.

    python experiments/recipe_table.py outputs/recipe/<model>

Reads each run's ``eval.json`` (through ``vrmoe.eval.schema``) and writes ``table.md`` and
``table.json`` into the recipe's output directory. Rows: Top-K (the fine-tuned baseline), Top-K
with temperature scaling (one temperature fit on the calibration split), and the variational
router, mean-field and full covariance, fit post hoc. Columns: accuracy, NLL and ECE (10 bins)
on the test split; OOD AUROC of the predictive entropy, averaged over the near sets (ARC-Easy,
ARC-Challenge) and the far sets (MedMCQA, MMLU-Law), and the router's own signal where it has
one; the mean Jaccard of the Top-K sets at gamma = 0.01; extra FLOPs per token over Top-K.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from vrmoe.eval.schema import auroc, calibration_number, cost_number, jaccard_at
from vrmoe.report.runs import read_record
from vrmoe.tracking import EVAL_FILE

NEAR = ("arc_easy", "arc_challenge")
FAR = ("medmcqa", "mmlu_law")
# (row label, run directory under the recipe's output, predictive)
ROWS = (("Top-K", "topk", "routing_mean"), ("Top-K + temperature scaling", "topk", "ts"),
        ("variational, mean-field", "variational_diag", "routing_mean"),
        ("variational, full covariance", "variational_full", "routing_mean"))
COLUMNS = ("accuracy", "nll", "ece_10", "auroc_near", "auroc_far", "auroc_near_router", "auroc_far_router",
           "jaccard@0.01", "extra_flops")


def mean_auroc(result: dict[str, Any], sets: tuple[str, ...], score: str) -> float | None:
    values = [auroc(result, name, score) for name in sets]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def row(result: dict[str, Any], predictive: str) -> dict[str, float | None]:
    router_score = next((s for s in ("logit_variance", "temperature", "mutual_information")
                         if auroc(result, NEAR[0], s) is not None), None)
    out: dict[str, float | None] = {key: calibration_number(result, "mcq", key, predictive)
                                    for key in ("accuracy", "nll", "ece_10")}
    out["auroc_near"] = mean_auroc(result, NEAR, "predictive_entropy")
    out["auroc_far"] = mean_auroc(result, FAR, "predictive_entropy")
    out["auroc_near_router"] = mean_auroc(result, NEAR, router_score) if router_score else None
    out["auroc_far_router"] = mean_auroc(result, FAR, router_score) if router_score else None
    out["jaccard@0.01"] = jaccard_at(result)
    out["extra_flops"] = cost_number(result, "router_overhead_vs_topk")
    return out


def cell(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.3f}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python experiments/recipe_table.py <recipe output dir>", file=sys.stderr)
        return 2
    out = Path(argv[0])
    table: dict[str, dict[str, float | None]] = {}
    for label, run, predictive in ROWS:
        result = read_record(out / run / EVAL_FILE)
        if result is None:
            print(f"error: {out / run} has no readable eval.json; run that step of experiments/paper_recipe.sh",
                  file=sys.stderr)
            return 1
        table[label] = row(result, predictive)
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {label} | " + " | ".join(cell(values[c]) for c in COLUMNS) + " |" for label, values in table.items()]
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "table.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
