#!/usr/bin/env bash
# aira_moe recipe "math": GSM8K (multiple choice), every technique, 150 calibration batches.
# Settings: configs/math.yaml. Runs on 2 GPUs by default with torchrun + DeepSpeed ZeRO-2.
# Usage: ./scripts/aira_moe/math.sh [key=value ...]     (any cwd)
#        TINY=1 ./scripts/aira_moe/math.sh              (tiny default on CPU, ~1.5 minutes)
#        MODEL=/path/to/model NPROC_PER_NODE=8 OUTPUT_DIR=... DEEPSPEED=none EXTRA="learning_rate=1e-4" ./scripts/aira_moe/math.sh
# Every variable is described in scripts/aira_moe/common.sh and scripts/aira_moe/README.md.
set -euo pipefail
RECIPE=math
NPROC_DEFAULT=2
# shellcheck source=scripts/aira_moe/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

aira_train

# Evaluation: remove the leading "# " from the lines between the markers to score the base model and the adapter after
# training (results in $OUTPUT_DIR/eval_<task>{_base,}/results.json; task files in $TASK_DIR, see docs/evaluation.md).
# >>> eval
# aira_eval gsm8k --n_shot 0
# <<< eval
