#!/usr/bin/env bash
# Shared driver of the aira_moe recipe scripts: source it, set RECIPE (and NPROC_DEFAULT), then call aira_train.
# The recipe's settings live in configs/$RECIPE.yaml; this file only resolves where/how to run it.
#
# Environment (all optional):
#   MODEL            model path or hub id                  (default: the YAML's model_name_or_path)
#   NPROC_PER_NODE   GPUs per node                          (default: NPROC_DEFAULT of the script, 2 or 4)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT             multi-node torchrun settings (read by llamafactory-cli)
#   OUTPUT_DIR       where the adapter, checkpoints, allocation report and eval results go
#   DATASET_DIR      directory with dataset_info.json and the data files (default: <repo>/data)
#   TASK_DIR         evaluation files for the eval block (layout: docs/evaluation.md; default: <repo>/evaluation);
#                    checked before training when the eval block is uncommented
#   TEMPLATE         chat template (default: the YAML's)
#   DEEPSPEED        DeepSpeed config, or "none"            (default: configs/deepspeed/ds_z2_config.json)
#   EXTRA            extra key=value overrides, space-separated; arguments given to the script are overrides too
#   TINY=1           run the same pipeline on the bundled tiny default on CPU (random 4-layer Llama, synthetic data,
#                    built in TINY_DIR, default ${TMPDIR:-/tmp}/aira_moe_tiny)
#   DRY_RUN=1        print the resolved command and stop
#   AIRA_MOE_REPO    repository root holding configs/ and data/ (default: two levels above this file)
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  echo "common.sh is sourced by the recipe scripts (e.g. scripts/aira_moe/math.sh); run one of those." >&2
  exit 2
fi

AIRA_REPO="${AIRA_MOE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
CONFIG="$AIRA_REPO/configs/$RECIPE.yaml"
[[ -f "$CONFIG" ]] || { echo "aira_moe: missing recipe config $CONFIG" >&2; exit 2; }

yaml_value() {  # the value of a top-level key in the recipe YAML
  sed -n "s/^$1: *\([^#]*\).*/\1/p" "$CONFIG" | head -n 1 | sed 's/ *$//'
}

OVERRIDES=()
if [[ "${TINY:-0}" == "1" ]]; then
  TINY_DIR="${TINY_DIR:-${TMPDIR:-/tmp}/aira_moe_tiny}"
  # only the TINY_*= lines: libraries may print warnings on stdout while importing
  TINY_ENV="$(aira-moe tiny --output_dir "$TINY_DIR" --num_layers 4 --shell | grep -E '^TINY_[A-Z_]+=')"
  eval "$TINY_ENV"
  MODEL="$TINY_MODEL"
  DATASET_DIR="$TINY_DATASET_DIR"
  TASK_DIR="$TINY_TASK_DIR"
  TEMPLATE="default"
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
  DEEPSPEED="${DEEPSPEED:-none}"
  OUTPUT_DIR="${OUTPUT_DIR:-$TINY_DIR/runs/$RECIPE-$(date +%Y%m%d-%H%M%S)}"
  # same method keys as the recipe, sized for a 4-layer, 64-wide model on CPU
  OVERRIDES+=(dataset="$TINY_DATASET" lora_rank=4 lora_alpha=8 cutoff_len=128 max_samples=256
              per_device_train_batch_size=8 gradient_accumulation_steps=1 max_steps=20 save_steps=10 logging_steps=5
              bf16=false use_cpu=true preprocessing_num_workers=1 dataloader_num_workers=0 learning_rate=1.0e-3)
  # only the keys the recipe's switches use (a key whose switch is off is an error)
  if [[ "$(yaml_value use_layer_wise_rank)" == "true" ]]; then
    OVERRIDES+=(rank_budget=auto min_rank=2 max_rank=8)
  fi
  if grep -qE '^use_(layer_wise_rank|awsvd_init|activation_aware): *true' "$CONFIG"; then
    OVERRIDES+=(awsvd_collect_steps=4)
  fi
fi

MODEL="${MODEL:-$(yaml_value model_name_or_path)}"
TEMPLATE="${TEMPLATE:-$(yaml_value template)}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${NPROC_DEFAULT:-2}}"
OUTPUT_DIR="${OUTPUT_DIR:-$AIRA_REPO/$(yaml_value output_dir)}"
DATASET_DIR="${DATASET_DIR:-$AIRA_REPO/data}"
TASK_DIR="${TASK_DIR:-$AIRA_REPO/evaluation}"
DEEPSPEED="${DEEPSPEED:-$AIRA_REPO/configs/deepspeed/ds_z2_config.json}"
export NPROC_PER_NODE

OVERRIDES+=(model_name_or_path="$MODEL" template="$TEMPLATE" output_dir="$OUTPUT_DIR" dataset_dir="$DATASET_DIR")
if [[ "$DEEPSPEED" != "none" ]]; then
  OVERRIDES+=(deepspeed="$DEEPSPEED")
fi
read -r -a EXTRA_OVERRIDES <<< "${EXTRA:-}"
OVERRIDES+=("${EXTRA_OVERRIDES[@]}" "$@")

check_eval_tasks() {  # the tasks of the uncommented eval block must be readable from TASK_DIR before training starts
  local -a tasks
  mapfile -t tasks < <(sed -n '/^# >>> eval$/,/^# <<< eval$/s/^aira_eval \([^ ]*\).*/\1/p' "$0")
  if [[ ${#tasks[@]} -eq 0 ]]; then
    return 0
  fi
  python - "$TASK_DIR" "${tasks[@]}" <<'PY'
import sys

from aira_moe.errors import UserError
from aira_moe.evaluation.tasks import load_task

task_dir = sys.argv[1]
for task in sys.argv[2:]:
    try:
        load_task(task, task_dir)
    except UserError as error:  # reported, and the recipe stops before training
        print(f"aira_moe: the eval block scores {task} from TASK_DIR={task_dir}: {error}", file=sys.stderr)
        sys.exit(2)
PY
}

aira_train() {
  local -a cmd=(llamafactory-cli train "$CONFIG" "${OVERRIDES[@]}")
  local launch="FORCE_TORCHRUN=1 NPROC_PER_NODE=$NPROC_PER_NODE"
  if [[ -n "${NNODES:-}" ]]; then
    launch+=" NNODES=$NNODES NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}"
  fi
  if [[ "${TINY:-0}" == "1" ]]; then
    launch+=" CUDA_VISIBLE_DEVICES="
  fi
  echo "[aira_moe] $launch ${cmd[*]}"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    return 0
  fi
  # validate the whole config here, before torchrun: a bad value is one line and exit 2, not a trace per worker
  check_eval_tasks || exit $?
  LLAMAFACTORY_VERBOSITY=WARN aira-moe check "$CONFIG" "${OVERRIDES[@]}" || exit $?
  if [[ "${TINY:-0}" == "1" ]]; then
    env FORCE_TORCHRUN=1 CUDA_VISIBLE_DEVICES= "${cmd[@]}"
  else
    env FORCE_TORCHRUN=1 "${cmd[@]}"
  fi
}

aira_eval() {  # aira_eval TASK [extra aira-moe eval flags]: score the trained adapter; results in $OUTPUT_DIR/eval_TASK
  local task="$1"; shift
  local results="$OUTPUT_DIR/eval_$task/results.json"
  if [[ -f "$results" && " $* " != *" --overwrite_save_dir "* ]]; then  # a re-run of a finished recipe: show, keep
    echo "[aira_moe] $task results exist (pass --overwrite_save_dir to score again): $results"
    python -c "import json, sys; r = json.load(open(sys.argv[1])); print('%s: accuracy %.2f%% on %d questions' % (r['task'], 100 * r['accuracy'], r['num_questions']))" "$results"
    return 0
  fi
  local -a cmd=(aira-moe eval --model_name_or_path "$MODEL" --adapter_name_or_path "$OUTPUT_DIR"
                --finetuning_type aira_moe --template "$TEMPLATE" --task "$task" --task_dir "$TASK_DIR"
                --save_dir "$OUTPUT_DIR/eval_$task" "$@")
  if [[ "${TINY:-0}" == "1" ]]; then
    cmd+=(--device cpu)
  fi
  echo "[aira_moe] ${cmd[*]}"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    return 0
  fi
  "${cmd[@]}"
}
