#!/usr/bin/env bash
# The paper's recipe on a pretrained MoE language model, step by step (docs/pretrained.md, "The paper's recipe"):
#   1. fine-tune the pretrained model on OpenBookQA until it is over-confident (every weight trains),
#      and evaluate it: Top-K, and Top-K with temperature scaling fit on the calibration split;
#   2. fit variational routers post hoc on the calibration split, mean-field and full covariance
#      (only their heads train; L_task + beta * KL), and evaluate each with S routing samples;
#   3. the table in the paper's format (experiments/recipe_table.py).
#
#   experiments/paper_recipe.sh <hub id or local model dir> [output dir]
#
# Datasets are read by their short names (downloaded by `datasets` on first use); each can be
# pointed elsewhere: VRMOE_OBQA, VRMOE_ARC_EASY, VRMOE_ARC_CHALLENGE, VRMOE_MEDMCQA, VRMOE_MMLU_LAW
# (a hub id, a save_to_disk directory or a directory of <split>.jsonl files).
# VRMOE_RECIPE_ARGS adds overrides to every command (e.g. logger=none, or fewer steps for a try).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: experiments/paper_recipe.sh <hub id or local model dir> [output dir]" >&2
  exit 2
fi
MODEL=$1
OUT=${2:-outputs/recipe/$(basename "$MODEL")}
EXTRA=(${VRMOE_RECIPE_ARGS:-})
OBQA=${VRMOE_OBQA:-openbookqa}
NEAR="${VRMOE_ARC_EASY:-arc_easy}:test,${VRMOE_ARC_CHALLENGE:-arc_challenge}:test"
FAR="${VRMOE_MEDMCQA:-medmcqa}:test,${VRMOE_MMLU_LAW:-mmlu_law}:test"

# OpenBookQA's three splits: fine-tune on train (4,957), fit post-hoc methods on validation (500),
# score test (500); ARC-Easy/-Challenge are near OOD, MedMCQA (unlabelled test) and MMLU-Law far OOD.
COMMON=(model=hf "model.hf_name=$MODEL" data=mcq "data.mcq_name=$OBQA" data.mcq_calibration_split=validation
        data.mcq_eval_split=test task=mcq train.precision=bf16 "eval.ood_mcq=[$NEAR,$FAR]")

# 1. The over-confident baseline, about 3 epochs of OpenBookQA's train split, then evaluated
#    (its eval.json also holds temperature scaling: calibration, mcq_ts).
vrmoe train "${COMMON[@]}" router=topk train.lr=1e-5 train.batch_size=8 train.max_steps=2000 \
  train.warmup_steps=100 eval.at_end=true "hydra.run.dir=$OUT/topk" "${EXTRA[@]}"

# 2. Post hoc: only the variational heads train, on the calibration split, then S = 32 at evaluation.
for COV in diag full; do
  vrmoe train "${COMMON[@]}" router=variational router.covariance=$COV "train.init_from=$OUT/topk" \
    train.freeze=backbone task.fit_split=calibration train.lr=1e-3 train.batch_size=8 train.max_steps=500 \
    train.warmup_steps=20 S=32 eval.at_end=true "hydra.run.dir=$OUT/variational_$COV" "${EXTRA[@]}"
done

# 3. The table.
python "$(dirname "$0")/recipe_table.py" "$OUT"
