"""Method quality on a real pretrained LLM: SmolLM2-135M-Instruct (``aira-moe base smollm2``, from PyPI), real task
data, the chat template, loss on response tokens. CPU, no hub. The protocol (learning rate and LoRA+ ratio chosen on
val with seed 0, seeds 1..N reported on test, paired differences, ranks, the run cache) is ``quality.protocol``;
this file supplies the real model, the data and the methods.

Cells (``--tasks``): math (GSM8K multiple choice, the math recipe's training file), finance (FinEval-en), medicine
(GenMedGPT-5k dialogues) and multitask (the union of the three training sets; val/test per task and their mean).
Splits, fixed by ``--split_seed`` (default 0) and written into the results:
  * train / val: from ../shared/data/train/<task file> (val = ``--val_items`` items held out of training);
  * test: math and finance from the evaluation CSVs the recipes score on (../shared/data/eval/gsm8k/test.csv, the 33
    FinEval subject CSVs), rendered in the training file's own prompt format, never from train; medicine (no test
    CSV) from ``--test_items`` more items held out of GenMedGPT-5k.
  Examples are encoded with LLaMA-Factory's ``smollm2`` template exactly as ``llamafactory-cli train`` encodes them
  (its default system prompt, the Alpaca instruction + input as the user turn). An example longer than ``--cutoff``
  tokens is dropped when its prompt alone is too long and has its response cut otherwise (as LLaMA-Factory cuts).
Metrics: the decision metric, fixed in advance, is the held-out response loss (mean NLL per response token, pooled over
the split's tokens). For the multiple-choice cells the same forward pass also gives the accuracy by aira-moe eval's rule
(the argmax over the next-token logits of the letters A-D at the answer position; ``aira_moe.evaluation.scoring``),
on the training prompt format.
Methods: every method has the trainable parameters of LoRA r=8 on all 7 projections (2,442,240): aira_moe forms get
the integer rank budget that matches it (a near-uniform per-layer pattern when layer-wise allocation is off); the
difference is asserted per run (``EXACT_TOLERANCE``; EVA / DoRA / routed: ``EXTRA_TOLERANCE``).

    python benchmarks/quality_real.py --part profile --out benchmarks/results/smollm2_profile.json
    python benchmarks/quality_real.py --tasks medicine,math --methods stage1 \\
        --out benchmarks/results/quality_smollm2_cpu.json        # stage 1 (see benchmarks/README.md for the stages)
    # on a new machine: first fill the run cache from the committed tables, so only what they lack is trained
    python benchmarks/quality_real.py --seed_cache_from benchmarks/results --tasks medicine,math,finance \\
        --methods lora,aira_heuristic,cola_heuristic,aira_heuristic_no_layer_wise,aira_heuristic_no_awsvd,aira_heuristic_no_weighting \\
        --lrs 0.003,0.01 --out benchmarks/results/quality_smollm2_cpu_ablate_heuristic_cells.json   # stage 3's ablations
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import quality  # noqa: E402
from _common import device_name, write_json  # noqa: E402

ROOT = quality.ROOT
TARGETS = quality.TARGETS
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_CACHE_DIR = os.path.join(ROOT, "outputs", "quality_real")
TEMPLATE = "smollm2"
TASK_FILES = {"math": "gsm8k_train.json", "finance": "fineval_train-en.json", "medicine": "GenMedGPT-5k.json"}
MULTIPLE_CHOICE = ("math", "finance")  # cells whose test items come from an evaluation CSV (accuracy reported)
# the training files' own prompt wording, used to render the evaluation CSVs' questions as training-format items
GSM8K_INSTRUCTION = ("The following are multiple-choice questions about mathematical reasoning. Please select the "
                     "correct answer.")
FINEVAL_INSTRUCTION = "The following are multiple-choice questions about {name}. Please select the correct answer."

LORA_RANK = 8
LORA = dict(r=LORA_RANK, lora_alpha=2 * LORA_RANK)  # LLaMA-Factory's default alpha = 2 x rank
EXACT_TOLERANCE = 0.005  # an integer rank budget cannot always hit the LoRA count exactly (2x3: -0.26 %)
EXTRA_TOLERANCE = 0.10  # EVA redistributes rank (rho 2), DoRA adds a magnitude vector, routed adds its router

# the recipes' techniques (configs/math.yaml): LOD against 4 x the median, log objective, AwSVD directions, inverse
# input weighting. Rank bounds follow the recipes' ratio to the mean rank (math: budget 256 over 32 layers, 4-64)
EVERY_TECHNIQUE = dict(use_layer_wise_rank=True, theta_type="lod", lod_reference="median", lod_threshold_M=4.0,
                       objective_function="log", use_awsvd_init=True, awsvd_mode="directions",
                       use_activation_aware=True, activation_aware_mode="inps", activation_normalize="inverse")
COLA_2X3 = dict(num_A=2, num_B=3, cola_strategy="heuristic")
AIRA = "aira"
PEER = "peer"
# {name: (kind, overrides)}: peers are LoraConfig keys over LoRA r=8; aira forms are AiraMoeConfig keys (the rank is
# matched to the LoRA budget in ``method_config``)
METHODS = {
    "lora": (PEER, {}),
    "loraplus_4": (PEER, {"loraplus_lr_ratio": 4}),
    "loraplus_16": (PEER, {"loraplus_lr_ratio": 16}),
    "pissa": (PEER, {"init_lora_weights": "pissa"}),
    "eva": (PEER, {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}),
    "corda": (PEER, {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}}),
    "dora": (PEER, {"use_dora": True}),
    # the single-task recipes' form: 2x3 heuristic with every technique; plain; without each technique in turn
    "aira_heuristic": (AIRA, {**COLA_2X3, **EVERY_TECHNIQUE}),
    "cola_heuristic": (AIRA, dict(COLA_2X3)),
    "aira_heuristic_no_layer_wise": (AIRA, {**COLA_2X3, **EVERY_TECHNIQUE, "use_layer_wise_rank": False}),
    "aira_heuristic_no_awsvd": (AIRA, {**COLA_2X3, **EVERY_TECHNIQUE, "use_awsvd_init": False}),
    "aira_heuristic_no_weighting": (AIRA, {**COLA_2X3, **EVERY_TECHNIQUE, "use_activation_aware": False}),
    # one A and one B expert: every parameter non-redundant, LoRA's rank at LoRA's budget
    "aira_1x1": (AIRA, {"num_A": 1, "num_B": 1, **EVERY_TECHNIQUE}),
    "aira_1x1_no_layer_wise": (AIRA, {"num_A": 1, "num_B": 1, **EVERY_TECHNIQUE, "use_layer_wise_rank": False}),
    "aira_1x1_no_awsvd": (AIRA, {"num_A": 1, "num_B": 1, **EVERY_TECHNIQUE, "use_awsvd_init": False}),
    "aira_1x1_no_weighting": (AIRA, {"num_A": 1, "num_B": 1, **EVERY_TECHNIQUE, "use_activation_aware": False}),
    # with a trained magnitude per output channel (use_dora: DoRA's decomposition over the folded update; +6.4 % params
    # on SmolLM2, as peft's DoRA)
    "aira_heuristic_dora": (AIRA, {**COLA_2X3, **EVERY_TECHNIQUE, "use_dora": True}),
    "aira_1x1_no_weighting_dora": (AIRA, {"num_A": 1, "num_B": 1, **EVERY_TECHNIQUE, "use_activation_aware": False,
                                          "use_dora": True}),
    # the multi-tasking recipe's form: a per-token router over the 6 pairs (its router counts in the budget)
    "aira_routed": (AIRA, {"num_A": 2, "num_B": 3, "cola_strategy": "routed", **EVERY_TECHNIQUE}),
    "cola_routed": (AIRA, {"num_A": 2, "num_B": 3, "cola_strategy": "routed"}),
    # the same with a router that reads the experts' own projections A_i x: 6 (2 r + 1) parameters a projection, not 37 % of
    # the budget, so the experts get rank 3 instead of 2
    "aira_routed_proj": (AIRA, {"num_A": 2, "num_B": 3, "cola_strategy": "routed", "router_input": "projections",
                                **EVERY_TECHNIQUE}),
}
FAMILIES = {"loraplus": ["loraplus_4", "loraplus_16"]}
PEERS = ["lora", "loraplus", "pissa", "eva", "corda", "dora"]
# the stages: each ends with a usable answer (benchmarks/README.md)
STAGES = {
    "stage1": ["lora", "loraplus", "pissa", "eva", "dora", "aira_heuristic", "cola_heuristic", "aira_1x1"],
    "stage2": ["lora", "pissa", "eva", "aira_heuristic", "aira_routed", "cola_routed"],
    "stage3": ["aira_heuristic_no_layer_wise", "aira_heuristic_no_awsvd", "aira_heuristic_no_weighting", "corda"],
    # the same ablations of 1x1, the form lowest on val (which technique carries it on a real model)
    "ablate_1x1": ["aira_1x1", "aira_1x1_no_layer_wise", "aira_1x1_no_awsvd", "aira_1x1_no_weighting"],
}


# ------------------------------------------------------------------------------------------------------- data

def read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def gsm8k_test_rows(eval_dir: str) -> list[dict]:
    """GSM8K-MC test questions (evaluation CSV) in the training file's format: the options one per line."""
    from aira_moe.evaluation.tasks import LETTERS, load_task

    (subject,) = load_task("gsm8k", eval_dir)
    return [{"instruction": GSM8K_INSTRUCTION,
             "input": question.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, question.options)),
             "output": question.answer} for question in subject.test]


def fineval_test_rows(eval_dir: str) -> list[dict]:
    """FinEval test questions (the 33 subject CSVs) in fineval_train-en.json's format: options inline, the answer as
    'letter. option'."""
    from aira_moe.evaluation.tasks import LETTERS, load_task

    rows = []
    for subject in load_task("fineval", eval_dir):
        for question in subject.test:
            options = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, question.options))
            answer = question.options[LETTERS.index(question.answer)]
            rows.append({"instruction": FINEVAL_INSTRUCTION.format(name=subject.title), "input": f"{question.question} {options}",
                         "output": f"{question.answer}. {answer}"})
    return rows


def encode_rows(rows: list[dict], encode, cutoff: int) -> tuple[list[dict], int]:
    """Training-format rows -> {input_ids, labels} (labels -100 on the prompt), LLaMA-Factory's encoding; a prompt that
    leaves fewer than 8 response tokens under ``cutoff`` is dropped, a long response is cut. Returns (kept, dropped)."""
    kept, dropped = [], 0
    for row in rows:
        query = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        prompt, response = encode([{"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}])
        if len(prompt) + 8 > cutoff:
            dropped += 1
            continue
        response = response[:cutoff - len(prompt)]
        kept.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return kept, dropped


def data_path(cache_dir: str, settings: dict) -> str:
    """Where the tokenised splits of these data settings are cached (part of every run's cache key)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"data-{key}.pt")


def build_data(args, tokenizer_dir: str) -> dict:
    """Tokenised splits of every task, cached by their settings: {"<task>/<share>": [example, ...], "meta": ...}."""
    settings = {"split_seed": args.split_seed, "val_items": args.val_items, "test_items": args.test_items,
                "cutoff": args.cutoff, "template": TEMPLATE, "tokenizer": os.path.basename(tokenizer_dir.rstrip("/"))}
    path = data_path(args.cache_dir, settings)
    if os.path.isfile(path):
        return {"path": path, **torch.load(path)["meta"]}
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=TEMPLATE))

    def encode(messages):
        return template.encode_oneturn(tokenizer, messages, None)

    train_dir, eval_dir = os.path.join(args.data_dir, "train"), os.path.join(args.data_dir, "eval")
    splits, sizes, dropped = {}, {}, {}
    for task, file_name in TASK_FILES.items():
        rows = read_json(os.path.join(train_dir, file_name))
        random.Random(args.split_seed).shuffle(rows)
        if task == "math":
            test_rows = gsm8k_test_rows(eval_dir)
        elif task == "finance":
            test_rows = fineval_test_rows(eval_dir)
        else:  # no evaluation CSV for the dialogues: held out of the training file
            test_rows, rows = rows[:args.test_items], rows[args.test_items:]
        random.Random(args.split_seed + 1).shuffle(test_rows)
        shares = {"val": rows[:args.val_items], "train": rows[args.val_items:], "test": test_rows}
        for share, share_rows in shares.items():
            examples, lost = encode_rows(share_rows, encode, args.cutoff)
            if share == "test":
                examples = examples[:args.test_items]
            splits[f"{task}/{share}"] = examples
            sizes[f"{task}/{share}"] = len(examples)
            dropped[f"{task}/{share}"] = lost
    from aira_moe.evaluation.scoring import choice_token_ids

    letters = choice_token_ids(tokenizer)
    for task in MULTIPLE_CHOICE:  # the answer's first token is its letter's token (what accuracy reads)
        for share in ("val", "test"):
            first = {next(t for t in example["labels"] if t != -100) for example in splits[f"{task}/{share}"]}
            if not first <= set(letters):
                raise ValueError(f"{task}/{share}: answers start with tokens {sorted(first - set(letters))}, not a letter")
    meta = {"settings": settings, "sizes": sizes, "dropped_too_long": dropped, "letter_ids": letters,
            "pad_id": tokenizer.pad_token_id}
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save({"splits": splits, "meta": meta}, path)
    return {"path": path, **meta}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at the positions that predict a response token (N, vocab), their targets (N,), their rows (N,)). The LM
    head runs on those positions only (``logits_to_keep``), a fifth of the model's work on 49,152-token vocabularies."""
    target = batch["labels"][:, 1:]  # position t predicts token t + 1
    rows, cols = (target != -100).nonzero(as_tuple=True)
    keep = cols.unique()  # sorted
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    picked = logits[rows, torch.searchsorted(keep, cols)]
    return picked.float(), target[rows, cols], rows


def evaluate_split(model, examples: list[dict], pad_id: int, letter_ids: list[int] | None, batch_size: int = 16) -> dict:
    """Pooled response NLL per token; with ``letter_ids``, the accuracy of the argmax over the letters' logits at each
    example's first response token (aira-moe eval's rule)."""
    model.eval()
    total, count, correct = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding per batch
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            logits, targets, rows = response_logits(model, batch)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
            if letter_ids is not None:
                first = torch.ones_like(rows, dtype=torch.bool)
                first[1:] = rows[1:] != rows[:-1]  # the first response token of each row
                letters = torch.as_tensor(letter_ids)
                predicted = letters[logits[first][:, letters].argmax(-1)]
                correct += (predicted == targets[first]).sum().item()
    model.train()
    result = {"loss": total / count}
    if letter_ids is not None:
        result["accuracy"] = correct / len(examples)
    return result


# ---------------------------------------------------------------------------------------------------- methods

def module_shapes(model) -> list[tuple[int, int, int]]:
    """(layer index, in, out) of every target projection."""
    shapes = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            shapes.append((int(name.split(".layers.")[1].split(".")[0]), module.in_features, module.out_features))
    return shapes


def lora_budget(shapes) -> int:
    return sum(LORA_RANK * (fan_in + fan_out) for _, fan_in, fan_out in shapes)


def matched_rank_budget(shapes, num_A: int, num_B: int, router: Optional[str] = None) -> tuple[int, int]:
    """(total rank over the layers, number of layers) whose aira_moe parameters are closest to LoRA r=8's: a layer of
    rank r costs r * sum(num_A in + num_B out) over its projections; a router (``router_input``) num_A num_B (in + 1)
    per projection when it reads the layer input, num_A num_B (num_A r + 1) when it reads the projections."""
    from aira_moe.tuner.strategies.routed import router_parameters

    layers = sorted({layer for layer, _, _ in shapes})
    routers = [router_parameters(num_A, num_B, fan_in, router) if router else (0, 0) for _, fan_in, _ in shapes]
    per_rank = sum(num_A * fan_in + num_B * fan_out + per_rank_router
                   for (_, fan_in, fan_out), (per_rank_router, _) in zip(shapes, routers))
    fixed = sum(fixed_router for _, fixed_router in routers)
    return round((lora_budget(shapes) - fixed) * len(layers) / per_rank), len(layers)


def spread_ranks(total: int, num_layers: int) -> list[int]:
    """``total`` over ``num_layers`` as evenly as integers allow (differences of at most one)."""
    return [(total * (layer + 1)) // num_layers - (total * layer) // num_layers for layer in range(num_layers)]


def method_config(name: str, model, calibration_batches: int):
    """The peft config of method ``name`` at LoRA r=8's parameter count, and its training keys (LoRA+ ratio)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig, EvaConfig

    from aira_moe import AiraMoeConfig

    kind, overrides = METHODS[name]
    overrides = dict(overrides)
    training = {key: overrides.pop(key) for key in quality.TRAINING_KEYS if key in overrides}
    if kind == PEER:
        if "eva_config" in overrides:
            overrides["eva_config"] = EvaConfig(**overrides["eva_config"])
        if "corda_config" in overrides:
            overrides["corda_config"] = CordaConfig(**overrides["corda_config"])
        return LoraConfig(**LORA, target_modules=TARGETS, **overrides), training
    shapes = module_shapes(model)
    total, num_layers = matched_rank_budget(shapes, overrides["num_A"], overrides["num_B"], router_input(overrides))
    mean_rank = max(1, round(total / num_layers))
    config = dict(r=mean_rank, lora_alpha=2 * mean_rank, target_modules=TARGETS, awsvd_collect_steps=calibration_batches)
    if overrides.get("use_layer_wise_rank"):
        # the recipes' bounds relative to their mean rank (math: 4..64 around 8)
        config.update(rank_budget=total, min_rank=max(1, mean_rank // 2), max_rank=8 * mean_rank)
    else:
        config["rank_pattern"] = {f"model.layers.{layer}.{part}": rank for layer, rank in
                                  enumerate(spread_ranks(total, num_layers)) for part in
                                  [f"{block}.{target}" for block, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
                                   for target in names]}
    return AiraMoeConfig(**config, **overrides), training


def token_dependent(overrides: dict) -> bool:
    """Whether an aira_moe method's update depends on the token (a router, whose parameters count in the budget)."""
    from aira_moe.tuner.strategies import get_strategy

    return get_strategy(overrides.get("cola_strategy", "full")).token_dependent


def router_input(overrides: dict) -> Optional[str]:
    """What an aira_moe method's router reads (``router_input``), None without a router."""
    return overrides.get("router_input", "layer") if token_dependent(overrides) else None


def parameter_tolerance(name: str) -> float:
    kind, overrides = METHODS[name]
    # a layer-input router's count does not scale with the rank: the budget cannot absorb it exactly
    extra = overrides.get("init_lora_weights") == "eva" or overrides.get("use_dora") or \
        (kind == AIRA and router_input(overrides) == "layer")
    return EXTRA_TOLERANCE if extra else EXACT_TOLERANCE


# ------------------------------------------------------------------------------------------------------ one run

def run_real(job: dict) -> dict:
    """Fine-tune one (task, method, lr, seed) on SmolLM2 and score the splits in ``job["evaluate"]``. LLaMA-Factory's
    optimisation: AdamW without weight decay, 10 % linear warm-up then cosine decay, gradient clipping at 1.0; the
    loss is the mean NLL of the batch's response tokens."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    data = torch.load(job["data"])
    splits, meta = data["splits"], data["meta"]
    parts = quality.task_parts(job["task"])
    train = [example for part in parts for example in splits[f"{part}/train"]]
    model = AutoModelForCausalLM.from_pretrained(job["base_dir"], dtype=torch.float32)
    budget = lora_budget(module_shapes(model))
    gen = torch.Generator().manual_seed(job["seed"])
    needed = job["steps"] * job["batch"]
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(needed // len(train) + 1)])[:needed]
    batches = [collate([train[i] for i in order[step * job["batch"]:(step + 1) * job["batch"]].tolist()], meta["pad_id"])
               for step in range(job["steps"])]
    calibration = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches[:job["calibration_batches"]]]
    config, training = method_config(job["method"], model, job["calibration_batches"])
    torch.manual_seed(job["seed"])
    start = time.perf_counter()
    model = quality.build_adapted(model, config, calibration)
    init_seconds = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    tolerance = parameter_tolerance(job["method"])
    if abs(count - budget) > tolerance * budget:
        raise RuntimeError(f"{job['method']}: {count:,} trainable parameters, budget {budget:,} (LoRA r={LORA_RANK}), "
                           f"allowed relative difference {tolerance}")
    curve = quality.train_adapter(model, batches, lambda batch: F.cross_entropy(*response_logits(model, batch)[:2]),
                                  job["lr"], training)
    result = {}
    for share in job["evaluate"]:
        by_task = {part: evaluate_split(model, splits[f"{part}/{share}"], meta["pad_id"],
                                        meta["letter_ids"] if part in MULTIPLE_CHOICE else None) for part in parts}
        result[f"{share}_loss"] = statistics.mean(row["loss"] for row in by_task.values())
        accuracies = {part: row["accuracy"] for part, row in by_task.items() if "accuracy" in row}
        if accuracies:
            result[f"{share}_accuracy"] = statistics.mean(accuracies.values())
        if len(parts) > 1:
            result[f"{share}_loss_by_task"] = {part: row["loss"] for part, row in by_task.items()}
            if accuracies:
                result[f"{share}_accuracy_by_task"] = accuracies
    result.update({
        "final_train_loss": statistics.mean(curve[-max(1, len(curve) // 10):]),
        "diverged": not math.isfinite(curve[-1]),
        "params": count,
        "params_budget": budget,
        "init_seconds": init_seconds,
        "seconds": time.perf_counter() - start,
        "curve": [round(v, 4) for v in curve],
    })
    ranks = getattr(model.peft_config["default"], "rank_pattern", None) or {}
    if ranks:
        result["layer_ranks"] = [ranks.get(f"model.layers.{i}.self_attn.q_proj", config.r)
                                 for i in range(model.base_model.model.config.num_hidden_layers)]
    return result


def no_finetuning(args, data: dict, base_dir: str) -> dict:
    """{task: {share: response loss (and accuracy)}} of the base model, for the reference line of every table."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    splits = torch.load(data["path"])["splits"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    shares = ("val",) if args.screen else ("val", "test")
    result = {}
    for task in args.tasks:
        for part in quality.task_parts(task):
            if part in result:
                continue
            result[part] = {}
            for share in shares:
                row = evaluate_split(model, splits[f"{part}/{share}"], data["pad_id"],
                                     data["letter_ids"] if part in MULTIPLE_CHOICE else None)
                result[part][share] = row["loss"]
                if "accuracy" in row:
                    result[part][f"{share}_accuracy"] = row["accuracy"]
    return result


# ----------------------------------------------------------------------------------------------------- profile

# the allocations to show: (label, num_A (the 2x3 forms' update has rank num_A x r), rank budget, min, max)
PROFILE_ALLOCATIONS = [
    ("benchmark 2x3 (equal parameters to LoRA r=8)", None, None, None),
    ("math recipe YAML (2x3, budget 256, ranks 4-64)", 256, 4, 64),
    ("README demo (2x3, budget auto = 240, ranks 4-32)", 240, 4, 32),
]


def model_profile(args, data: dict, base_dir: str) -> dict:
    """What the model actually has, per decoder layer, from each task's calibration data (``--calibration_batches`` x
    ``--batch`` training examples): LOD theta (the recipes' median / M=4 and the seed's mean / M=2), act theta, the
    heaviest input channel of each projection (max / median channel RMS: are there massive channels?) and of the
    residual stream (max |h| / median |h|), and the allocation the recipes' settings give."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from aira_moe import AiraMoeConfig
    from aira_moe.calibration.allocation import allocate_ranks
    from aira_moe.calibration.stats import activation_importance, input_channel_norms, input_rms, lod_score
    from aira_moe.tuner.calibrate import allocation_units, collect_for_model

    torch.set_num_threads(args.threads)
    splits = torch.load(data["path"])["splits"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    shapes = module_shapes(model)
    matched, num_layers = matched_rank_budget(shapes, 2, 3)
    tuner = get_peft_model(model, AiraMoeConfig(target_modules=TARGETS, use_layer_wise_rank=True)).base_model
    layers = tuner.aira_moe_layers("default")
    units = allocation_units(layers)
    result = {"model": base_dir, "calibration": f"{args.calibration_batches} batches x {args.batch} training examples "
                                                "per task", "tasks": {}}
    for task in TASK_FILES:
        examples = splits[f"{task}/train"][:args.calibration_batches * args.batch]
        batches = [collate(examples[i:i + args.batch], data["pad_id"]) for i in range(0, len(examples), args.batch)]
        loader = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
        stats = collect_for_model(tuner, loader, "default", None, layers=layers)
        residual = [[] for _ in range(num_layers + 1)]
        with torch.no_grad():  # the adapters' B is zero: the wrapped model computes the base model's function
            for batch in loader:
                hidden = tuner.model(**batch, output_hidden_states=True).hidden_states  # embeddings + every layer
                real = batch["attention_mask"].bool()
                for index, state in enumerate(hidden):
                    residual[index].append(state[real].abs())  # (tokens, hidden)
        rows = []
        for layer_index, (unit, names) in enumerate(units.items()):
            weights = {name: layers[name].get_base_layer().weight for name in names}
            heaviest = {}
            for name in names:
                rms = input_rms(stats[name])
                heaviest[name.rsplit(".", 1)[-1]] = {"max_over_median": (rms.max() / rms.median()).item(),
                                                     "channel": int(rms.argmax())}
            state = torch.cat(residual[layer_index + 1])  # the residual stream after this layer
            per_channel = state.amax(0)
            rows.append({
                "layer": layer_index,
                "lod_median_M4": statistics.mean(lod_score(weights[n], input_channel_norms(stats[n]), 4.0, "median") for n in names),
                "lod_mean_M2": statistics.mean(lod_score(weights[n], input_channel_norms(stats[n]), 2.0, "mean") for n in names),
                "act": statistics.mean(activation_importance(stats[n]) for n in names),
                "input_max_over_median": heaviest,
                "residual_max": state.max().item(),
                "residual_max_over_median": (state.max() / state.median()).item(),
                "residual_top_channels": per_channel.topk(3).indices.tolist(),
            })
        allocations = {}
        for label, budget, low, high in PROFILE_ALLOCATIONS:
            if budget is None:
                budget, low, high = matched, max(1, round(matched / num_layers) // 2), 8 * round(matched / num_layers)
            allocations[label] = {"budget": budget, "min_rank": low, "max_rank": high, "ranks": allocate_ranks(
                [row["lod_median_M4"] for row in rows], budget, low, high, "log")}
        result["tasks"][task] = {"layers": rows, "allocations": allocations}
        print(f"profiled {task}", flush=True)
    return result


def profile_markdown(profile: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, {profile['calibration']}. LOD θ: the recipes' (median, M=4) and the seed's (mean, "
             "M=2); act θ: mean |x| of the projection inputs; input max/med: the heaviest input channel's RMS over the "
             "median channel's, for the attention input (q_proj) and the MLP down_proj input; residual max/med: the "
             "largest |h| of the residual stream after the layer over its median, and the channels that hold it.", ""]
    for task, entry in profile["tasks"].items():
        lines += [f"**{task}**", "", "| layer | LOD θ (median, M=4) | LOD θ (mean, M=2) | act θ | q_proj input max/med "
                  "| down_proj input max/med | residual max/med (max) | top residual channels | "
                  + " | ".join(f"ranks: {label}" for label in entry["allocations"]) + " |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(entry["allocations"])]
        for row in entry["layers"]:
            heavy = row["input_max_over_median"]
            ranks = [str(alloc["ranks"][row["layer"]]) for alloc in entry["allocations"].values()]
            lines.append(f"| {row['layer']} | {row['lod_median_M4']:.4f} | {row['lod_mean_M2']:.4f} | {row['act']:.3f} | "
                         f"{heavy['q_proj']['max_over_median']:.1f} (ch {heavy['q_proj']['channel']}) | "
                         f"{heavy['down_proj']['max_over_median']:.1f} (ch {heavy['down_proj']['channel']}) | "
                         f"{row['residual_max_over_median']:.0f} ({row['residual_max']:.0f}) | "
                         f"{row['residual_top_channels']} | " + " | ".join(ranks) + " |")
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main

def real_job(settings: dict, data_settings: dict, cache_dir: str, base_dir: str, task: str, method: str, lr: float,
             seed: int, evaluate) -> dict:
    """One run's description (its cache key is everything but ``threads`` and ``base_dir``); ``settings`` holds the
    command line's steps, batch, calibration_batches, threads and tag."""
    return {"base": "smollm2", "task": task, "method": method, "overrides": METHODS[method][1], "lr": lr, "seed": seed,
            "evaluate": list(evaluate), "steps": settings["steps"], "batch": settings["batch"],
            "calibration_batches": settings["calibration_batches"], "data_settings": data_settings,
            "threads": settings["threads"], "version": settings["tag"], "data": data_path(cache_dir, data_settings),
            "base_dir": base_dir}


def cache_rows_from(paths: list[str], cache_dir: str, base_dir: str) -> list[dict]:
    """The runs behind the committed results files (or every quality_smollm2*.json of a folder) in ``paths``,
    rebuilt from their per-seed numbers with the keys this script gives the same runs today: a new machine reruns
    only what no committed table holds. A method whose settings changed since (its ``METHODS`` entry) is skipped."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, name) for name in os.listdir(path)
                            if name.startswith("quality_smollm2") and name.endswith(".json"))
        else:
            files.append(path)
    rows = []
    for path in files:
        stored = read_json(path)
        if "compare" not in stored:  # an older sweep without the protocol's table
            continue
        settings = stored["settings"]

        def job_for(base, task, method, lr, seed, evaluate, overrides, settings=settings, stored=stored):
            if method not in METHODS or json.loads(json.dumps(METHODS[method])) != overrides:
                return None
            return real_job(settings, stored["data"]["settings"], cache_dir, base_dir, task, method, lr, seed, evaluate)

        rows += quality.rows_from_results(stored["compare"], job_for, settings["lr_task"] or None, settings["screen"],
                                          os.path.relpath(path, ROOT))
    return rows


def base_model_dir(path: str) -> str:
    """The converted SmolLM2 folder: ``--base_dir``, else ``aira-moe base smollm2``'s cache (converted when missing)."""
    if path:
        return path
    from aira_moe.base_model import get_pypi_model, prepare_pypi_model

    return prepare_pypi_model(get_pypi_model("smollm2"), say=lambda message: print(f"[base] {message}", flush=True)).path


def expand_methods(spec: str) -> list[str]:
    """Comma-separated methods, families and stages -> method names, in order, each once."""
    names = []
    for name in spec.split(","):
        for member in quality.method_members(STAGES.get(name, [name]), FAMILIES):
            if member not in names:
                names.append(member)
    return names


def write_results(result: dict, table: str, out: str, start: float) -> dict:
    """Print the markdown ``table``; with ``out``, write the JSON there and the table beside it (.md)."""
    print("\n" + table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(os.path.splitext(out)[0] + ".md", "w", encoding="utf-8") as handle:
            handle.write(table)
    result["seconds"] = time.perf_counter() - start
    write_json(result, out)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["compare", "profile"], default="compare",
                        help="compare: the methods; profile: the model's per-layer activation and LOD profile")
    parser.add_argument("--tasks", default="medicine,math", help=f"cells from {[*TASK_FILES, *quality.TASK_GROUPS]}")
    parser.add_argument("--methods", default="stage1", help=f"methods, families {list(FAMILIES)} or stages {list(STAGES)}")
    parser.add_argument("--lr_task", default="medicine", help="the cell whose learning-rate sweep serves every cell ('' = each cell its own)")
    parser.add_argument("--lrs", default="1e-3,3e-3", help="learning-rate grid (extended past a winning edge, twice at most)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N reported on test (seed 0 chooses the lr)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calibration_batches", type=int, default=8, help="batches every data-driven init sees")
    parser.add_argument("--cutoff", type=int, default=160, help="tokens per example (prompt + response)")
    parser.add_argument("--val_items", type=int, default=48)
    parser.add_argument("--test_items", type=int, default=96)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--screen", action="store_true", help="val only (for choosing defaults)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--base_dir", default="", help="converted SmolLM2 folder (default: aira-moe base smollm2's cache)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--cache", default=os.path.join(DEFAULT_CACHE_DIR, "runs.jsonl"), help="JSONL run cache")
    parser.add_argument("--seed_cache_from", default="", help="results files or folders (e.g. benchmarks/results) "
                        "whose runs go into the cache first, rebuilt from their per-seed numbers (a new machine then "
                        "trains only what no committed table holds)")
    parser.add_argument("--tag", default="", help="kept in every run's cache key (change it after changing the code)")
    parser.add_argument("--out", default="")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.bases = ["smollm2"]
    names = expand_methods(args.methods)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {list(METHODS)}, {list(FAMILIES)}, {list(STAGES)}")
    for task in args.tasks:
        if any(part not in TASK_FILES for part in quality.task_parts(task)):
            parser.error(f"--tasks: unknown {task!r}")
    if args.lr_task and args.lr_task not in args.tasks:
        parser.error(f"--lr_task {args.lr_task!r} must be one of --tasks {args.tasks}")
    start = time.perf_counter()
    base_dir = base_model_dir(args.base_dir)
    data = build_data(args, base_dir)
    if args.part == "profile":
        result = {"device": device_name(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
                  "profile": model_profile(args, data, base_dir)}
        return write_results(result, profile_markdown(result["profile"]), args.out, start)
    methods = {name: METHODS[name] for name in names}

    def make_job(cell, lr, seed, evaluate=("val",)):
        _, task, method = cell
        return real_job(vars(args), data["settings"], args.cache_dir, base_dir, task, method, lr, seed, evaluate)

    runner = quality.Runner(args.cache, args.workers, run_fn=run_real)
    if args.seed_cache_from:
        rows = cache_rows_from(args.seed_cache_from.split(","), args.cache_dir, base_dir)
        print(f"run cache: {runner.add(rows)} runs added from {args.seed_cache_from} ({len(rows)} found there)", flush=True)
    result = {"device": device_name(torch.device("cpu")) + f", {args.workers} worker processes x {args.threads} thread",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "base": base_dir,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")}, "note": args.note,
              "data": {k: v for k, v in data.items() if k != "path"}}
    compared = quality.protocol(args, methods, runner, make_job, lambda base: no_finetuning(args, data, base_dir),
                                lr_task=args.lr_task or None, metrics=("val_accuracy", "test_accuracy"), peers=PEERS,
                                families=FAMILIES, plain="cola_heuristic")
    result["compare"] = compared
    table = quality.markdown(json.loads(json.dumps(compared)), args.screen)
    return write_results(result, f"{args.note}\n\n{table}" if args.note else table, args.out, start)


if __name__ == "__main__":
    main()
