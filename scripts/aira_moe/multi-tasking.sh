#!/usr/bin/env bash
# aira_moe recipe "multi-tasking": All domains combined, 2x3 routed experts, every technique, rank_budget=256, 4 GPUs.
# Settings: configs/multi-tasking.yaml. Runs on 4 GPUs by default with torchrun + DeepSpeed ZeRO-2.
# Usage: ./scripts/aira_moe/multi-tasking.sh [key=value ...]     (any cwd)
#        TINY=1 ./scripts/aira_moe/multi-tasking.sh              (tiny default on CPU, ~1 minute)
#        MODEL=/path/to/model NPROC_PER_NODE=8 OUTPUT_DIR=... DEEPSPEED=none EXTRA="learning_rate=1e-4" ./scripts/aira_moe/multi-tasking.sh
# Every variable is described in scripts/aira_moe/common.sh and scripts/aira_moe/README.md.
set -euo pipefail
RECIPE=multi-tasking
NPROC_DEFAULT=4
# shellcheck source=scripts/aira_moe/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

aira_train

# Evaluation: remove the leading "# " from the lines between the markers to score the base model and the adapter after
# training (results in $OUTPUT_DIR/eval_<task>{_base,}/results.json; task files in $TASK_DIR, see docs/evaluation.md).
# >>> eval
# aira_eval gsm8k --n_shot 0
# aira_eval fineval --n_shot 0
# aira_eval mmlu_law --n_shot 5
# aira_eval mmlu_medicine --n_shot 5
# <<< eval
