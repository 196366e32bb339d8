"""The paper's recipe as the README gives it: experiments/paper_recipe.sh run as written, for each of
the paper's three models, each hub id replaced by a tiny random stand-in of its family (built
locally with the real configuration's structure) and each dataset by a local copy in its real
format (OpenBookQA at its real split sizes). Only the step counts and S are made small."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from vrmoe.eval.schema import auroc, calibration, calibration_number, cost_number, jaccard_at  # noqa: E402
from vrmoe.tracking import EVAL_FILE, SUMMARY_FILE  # noqa: E402

from hf_models import PAPER_MODELS, save_paper_standin  # noqa: E402
from mcq_fixtures import SIZES, write_paper_datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "paper_recipe.sh"
QUICK = ("logger=none train.max_steps=2 train.warmup_steps=1 train.batch_size=4 train.eval_every=100 "
         "S=2 eval.gammas=[0.01] eval.stability_windows=2 eval.windows=4")
OOD_SETS = ("arc_easy", "arc_challenge", "medmcqa", "mmlu_law")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return write_paper_datasets(tmp_path_factory.mktemp("mcq"))


def run_recipe(model_dir: Path, out: Path, datasets: dict[str, Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "VRMOE_RECIPE_ARGS": QUICK, "VRMOE_OBQA": str(datasets["openbookqa"]),
           "VRMOE_ARC_EASY": str(datasets["arc_easy"]), "VRMOE_ARC_CHALLENGE": str(datasets["arc_challenge"]),
           "VRMOE_MEDMCQA": str(datasets["medmcqa"]), "VRMOE_MMLU_LAW": str(datasets["mmlu_law"]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), str(model_dir), str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", list(PAPER_MODELS))
def test_the_papers_recipe_runs_as_written(tmp_path, datasets, hub_id):
    model_dir = save_paper_standin(hub_id, tmp_path / "model")
    out = tmp_path / "recipe"
    done = run_recipe(model_dir, out, datasets)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    finetune = json.loads((out / "topk" / SUMMARY_FILE).read_text())
    assert finetune["status"] == "completed"
    # Step 1 trains every weight, in fp32 master weights under bf16 autocast.
    assert finetune["params_trainable"] == finetune["memory"]["params_total"]
    assert finetune["memory"]["weights_bytes"] == 4 * finetune["memory"]["params_total"]
    posthoc = json.loads((out / "variational_full" / SUMMARY_FILE).read_text())
    assert posthoc["config"]["router"]["load_balance_weight"] == 0.0  # the paper's L_task + beta * KL
    assert 0 < posthoc["params_trainable"] < posthoc["memory"]["params_total"] / 2

    for run in ("topk", "variational_diag", "variational_full"):
        result = json.loads((out / run / EVAL_FILE).read_text())
        labels = result["calibration"]["predictions"]["mcq"]["labels"]
        assert len(labels) == SIZES["openbookqa"]["test"], run  # the whole test split is scored
        predictives = ("routing_mean", "ts") if run == "topk" else ("routing_mean", "bma", "ts")
        for predictive in predictives:
            for key in ("accuracy", "nll", "ece_10"):
                value = calibration_number(result, "mcq", key, predictive)
                assert value is not None and math.isfinite(value), (run, predictive, key)
        assert calibration(result, "mcq_ts")["temperature"] > 0
        for name in OOD_SETS:  # near (ARC) and far (MedMCQA's unlabelled test split, MMLU-Law's long prompts)
            assert 0 <= auroc(result, name, "predictive_entropy") <= 1, (run, name)
        if run != "topk":
            assert 0 <= auroc(result, "medmcqa", "logit_variance") <= 1
        assert 0 <= jaccard_at(result) <= 1
        overhead = cost_number(result, "router_overhead_vs_topk")
        assert overhead == 0 if run == "topk" else overhead > 0

    table = json.loads((out / "table.json").read_text())
    assert list(table) == ["Top-K", "Top-K + temperature scaling", "variational, mean-field",
                           "variational, full covariance"]
    for label, values in table.items():
        for key in ("accuracy", "nll", "ece_10", "auroc_near", "auroc_far", "jaccard@0.01", "extra_flops"):
            assert values[key] is not None and math.isfinite(values[key]), (label, key)
    assert (out / "table.md").read_text().startswith("| method |")
