"""Method quality at equal trainable parameters, with the learning rate tuned per method, on CPU, no downloads.

Part ``compare`` (the main benchmark): the pretrained-like testbed of ``testbed.py`` (two bases: ``pretrained`` and
``outliers``, the same network with LLM-like outlier channels planted) is fine-tuned on three tasks from
../shared/data/train (medicine = GenMedGPT-5k, math = GSM8K, finance = FinEval-en) and on their union (``multitask``,
the multi-tasking recipe's mixture; val/test loss per task and their mean) with every method at the same number of
trainable parameters as LoRA r=10 (81,920): the peers LoRA, LoRA+ (peft's ``create_loraplus_optimizer``, ratio chosen
on val from {2, 4, 8, 16}), PiSSA (peft ``init_lora_weights="pissa"``), EVA (peft ``initialize_lora_eva_weights``,
rank redistribution ``rho=2``) and CorDA (peft ``preprocess_corda``, IPM); CoLA 2x3 r=4 with each strategy
(``full``, ``heuristic``, ``random``), plain and with every technique, and ``heuristic`` with the techniques the 1x1
ablation questions taken out; ``routed`` (r=3, its router on top) plain and with every technique; CoLA 1x1 r=10 with
every technique and with each technique removed in turn; LoRA r=11 (a parameter control for ``routed``). EVA and
CorDA see exactly the calibration batches aira_moe sees (the run's first 8 training batches). Loss: every token of
the packed 128-token chunks (prompt and response alike), in training and in evaluation.
  1. Learning rate, per (base, task, method), on the *val* split: a grid (default 1e-3, 3e-3, 1e-2), seed 0; when
     the best rate is on the grid's edge the grid is extended (up to twice) along the 1-3-10 ladder in that direction.
     These selection runs never evaluate the test split (the code does not load it).
  2. The chosen rate is then run with seeds 1 .. N (not the selection seed); the *test* split (never used for a
     choice) is reported as mean +- std over the N seeds, with the paired difference to LoRA, to the best peer (the
     peer with the lowest *val* loss over the same seeds) and to CoLA-basic, and the method's rank among all methods.
     ``--screen`` runs evaluate val only, for choosing defaults (e.g. ``--lod_sweep``).
Runs go to a JSONL cache (``--cache``): a rerun reuses every finished run with the same settings.

Part ``teacher`` (synthetic mechanism check of layer-wise allocation): a random tiny Llama with activation outliers in
two layers, a teacher that perturbs exactly those layers, students at the same budget; held-out KL to the teacher.

    # the committed table's 20 methods (~3.7 h on 2 cores)
    python benchmarks/quality.py --part compare --out benchmarks/results/quality_peers_cpu.json
    python benchmarks/quality.py --part compare --screen --methods cola_weighting \\
        --extra "w_mean:use_activation_aware=true,activation_normalize=mean"   # val only, for choosing defaults
    python benchmarks/quality.py --part compare --screen --methods lora,aira_heuristic --lod_sweep aira_heuristic \\
        --lrs 3e-3 --seeds 2 --out benchmarks/results/quality_lod_sweep_cpu.json   # M x reference, val only
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import device_name, write_json  # noqa: E402

import aira_moe  # noqa: E402,F401
from aira_moe import AiraMoeConfig, AiraMoeModel  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# ------------------------------------------------------------------------------------------------------ methods
# LoRA r=10 and CoLA 2x3 r=4 have exactly the same trainable parameters on the testbed (hidden 128, MLP 256, 2 KV
# heads): 10 * (in + out) = 4 * (2 * in + 3 * out) summed over the 7 projections. alpha = 2 * r for both (LLaMA-Factory's
# default). Technique keys left out take the product's defaults (AiraMoeConfig).
LORA = dict(r=10, lora_alpha=20)
COLA = dict(r=4, lora_alpha=8, num_A=2, num_B=3, cola_strategy="full")
LAYER_WISE = dict(use_layer_wise_rank=True, rank_budget="auto", min_rank=1, max_rank=8)
AWSVD = dict(use_awsvd_init=True)
WEIGHTING = dict(use_activation_aware=True)
# the seed's literal formulas (kept available under these values): PiSSA-style residual AwSVD with the singular values
# in B, min-max weighting, LOD against 2 x the mean, lora_alpha / r_l per layer
LITERAL = dict(awsvd_mode="residual", awsvd_split="reference", activation_normalize="minmax", lod_reference="mean",
               lod_threshold_M=2.0, layer_scaling="rank")
# CoLA with one A and one B expert at LoRA's rank: the same parameters as LoRA r=10, every parameter non-redundant
ONE_BY_ONE = dict(r=10, lora_alpha=20, num_A=1, num_B=1)
EVERY_TECHNIQUE = {**LAYER_WISE, **AWSVD, **WEIGHTING}
EVERY_TECHNIQUE_1X1 = {**ONE_BY_ONE, **LAYER_WISE, "max_rank": 20, **AWSVD, **WEIGHTING}
# peers: peft's LoraConfig keys over LoRA r=10 (``peft_type: LORA``), each method through peft's own public API.
# ``loraplus_lr_ratio`` is a training key (peft.optimizers.create_loraplus_optimizer), not a LoraConfig field.
# CorDA: peft documents IPM (instruction-previewed) as the mode that converges faster and fine-tunes better when
# keeping pre-trained knowledge is not a concern -- held-out task loss is what is measured here; KPM trades some of
# that for less forgetting. EVA: rho=2 (peft's default) lets a module take up to 2r, the budget staying sum_l r.
PEER = dict(peft_type="LORA")
# {name: overrides}: None = LoRA r=10; a dict with peft_type LORA = LoraConfig keys; otherwise AiraMoeConfig keys over
# CoLA 2x3 r=4 ``full``. Plain data, so a method is one line.
METHODS = {
    "lora": None,
    "loraplus_2": {**PEER, "loraplus_lr_ratio": 2},
    "loraplus_4": {**PEER, "loraplus_lr_ratio": 4},
    "loraplus_8": {**PEER, "loraplus_lr_ratio": 8},
    "loraplus_16": {**PEER, "loraplus_lr_ratio": 16},
    "pissa": {**PEER, "init_lora_weights": "pissa"},
    "eva": {**PEER, "init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
    "corda": {**PEER, "init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}},
    "cola_basic": {},
    "cola_layer_wise": LAYER_WISE,
    "cola_awsvd": AWSVD,
    "cola_weighting": WEIGHTING,
    "aira_full": EVERY_TECHNIQUE,
    "aira_full_literal": {**EVERY_TECHNIQUE, **LITERAL},
    "cola_heuristic": {"cola_strategy": "heuristic"},
    "aira_heuristic": {**EVERY_TECHNIQUE, "cola_strategy": "heuristic"},
    "cola_random": {"cola_strategy": "random"},
    "aira_random": {**EVERY_TECHNIQUE, "cola_strategy": "random"},
    # the recipes' single-task form with the techniques the 1x1 ablation found neutral or costly taken out
    "aira_heuristic_no_weighting": {**EVERY_TECHNIQUE, "cola_strategy": "heuristic", "use_activation_aware": False},
    "aira_heuristic_awsvd_only": {**AWSVD, "cola_strategy": "heuristic"},
    "cola_1x1": ONE_BY_ONE,
    "aira_full_1x1": EVERY_TECHNIQUE_1X1,
    "aira_1x1_no_layer_wise": {**EVERY_TECHNIQUE_1X1, "use_layer_wise_rank": False},
    "aira_1x1_no_awsvd": {**EVERY_TECHNIQUE_1X1, "use_awsvd_init": False},
    "aira_1x1_no_weighting": {**EVERY_TECHNIQUE_1X1, "use_activation_aware": False},
    # a per-token router over the 6 pairs (dense gates). The router adds 6 x (in + 1) parameters a module (24,744
    # here), so r=3: 61,440 + 24,744 = 86,184, +5.2 % over the budget -- the nearest equal-parameter form
    "cola_routed": {"cola_strategy": "routed", "r": 3, "lora_alpha": 6},
    # the same router with every technique (layer-wise ranks under the r=3 budget, AwSVD on the A side, weighting)
    "aira_routed": {**EVERY_TECHNIQUE, "cola_strategy": "routed", "r": 3, "lora_alpha": 6},
    # the parameter control for 'routed': LoRA r=11 has 90,112 parameters (+10 %), more than routed's +5.2 %
    "lora_r11": {**PEER, "r": 11, "lora_alpha": 22},
}
# what the committed table (results/quality_peers_cpu.*) measures, and so what a bare rerun runs; the 2x3 `full`
# single-technique ablations, the literal formulas and plain 1x1 stay available by name (their table: 2026-11-24)
DEFAULT_METHODS = ["lora", "loraplus", "pissa", "eva", "corda", "lora_r11",
                   "cola_basic", "aira_full", "cola_heuristic", "aira_heuristic", "aira_heuristic_no_weighting",
                   "aira_heuristic_awsvd_only", "cola_random", "aira_random", "cola_routed", "aira_routed",
                   "aira_full_1x1", "aira_1x1_no_layer_wise", "aira_1x1_no_awsvd", "aira_1x1_no_weighting"]
# methods measured above the budget on purpose (a control, not a peer; allowed REDISTRIBUTED_PARAMS_TOLERANCE)
PARAMETER_CONTROLS = ("lora_r11",)
# a family is one reported method whose members differ by a hyper-parameter chosen on val with the learning rate
FAMILIES = {"loraplus": ["loraplus_2", "loraplus_4", "loraplus_8", "loraplus_16"]}
# the peers: the methods a user could run instead of aira_moe ("best peer" = lowest val loss among them)
PEERS = ["lora", "loraplus", "pissa", "eva", "corda"]
# EVA moves rank between modules whose (in + out) differ, so its parameter count can drift from LoRA's: allowed
# relative difference (measured +1.6 % on the testbed; rho=2 bounds the worst case near +40 %); 'routed' adds its
# router, which no integer rank offsets exactly (+5.2 %); every other method must match exactly
REDISTRIBUTED_PARAMS_TOLERANCE = 0.10
TRAINING_KEYS = ("loraplus_lr_ratio",)
# the lod_threshold_M x lod_reference sweep (``--lod_sweep METHOD``, val only)
LOD_SWEEP = {"M": [2.0, 3.0, 4.0, 6.0, 8.0], "reference": ["median", "mean"]}


def parse_extra(spec: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, CoLA kwargs); values are parsed as JSON when they can be. With
    ``peft_type=LORA`` the keys are LoraConfig's (over LoRA r=10)."""
    name, _, body = spec.partition(":")
    kwargs = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def lod_sweep_methods(name: str, overrides: dict) -> dict:
    """``name`` with every lod_threshold_M x lod_reference of LOD_SWEEP (layer-wise allocation must be on)."""
    if not (overrides or {}).get("use_layer_wise_rank"):
        raise ValueError(f"--lod_sweep {name}: that method has no layer-wise allocation (use_layer_wise_rank)")
    return {f"{name}_lod_{reference}_M{threshold:g}": {**overrides, "lod_reference": reference,
                                                       "lod_threshold_M": threshold}
            for reference in LOD_SWEEP["reference"] for threshold in LOD_SWEEP["M"]}


def peft_config(overrides):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig, EvaConfig

    if overrides is None or overrides.get("peft_type") == "LORA":
        lora = {k: v for k, v in (overrides or {}).items() if k != "peft_type" and k not in TRAINING_KEYS}
        if "eva_config" in lora:
            lora["eva_config"] = EvaConfig(**lora["eva_config"])
        if "corda_config" in lora:
            lora["corda_config"] = CordaConfig(**lora["corda_config"])
        return LoraConfig(**{**LORA, **lora}, target_modules=TARGETS)
    return AiraMoeConfig(**{**COLA, "target_modules": TARGETS, "awsvd_collect_steps": 8, **overrides})


def lora_reference_params(model) -> int:
    """Trainable parameters of LoRA r=10 on ``model``'s target projections: the budget every method must match."""
    return sum(LORA["r"] * (module.in_features + module.out_features) for name, module in model.named_modules()
               if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear))


def build_adapted(base, config, calibration: list[dict]):
    """Wrap ``base`` in ``config``'s adapter and run the data-driven init that config asks for, each through its
    library's public API, on the same ``calibration`` batches: CorDA's covariance pass (before wrapping: it rewrites
    the base weight into the residual), EVA's incremental SVD (after), aira_moe's calibration (after)."""
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    init = getattr(config, "init_lora_weights", None)
    if init == "corda":
        # its covariance hook takes one sequence per forward (it squeezes dim 0), as in peft's CorDA examples; each
        # sequence without its padding, so CorDA sees the tokens the other inits see (they read the attention mask)
        preprocess_corda(base, config, run_model=lambda: [
            base(input_ids=ids[mask.bool()][None]) for batch in calibration
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])])
    model = get_peft_model(base, config, low_cpu_mem_usage=init == "eva")
    if init == "eva":
        initialize_lora_eva_weights(model, dataloader=calibration, show_progress_bar=False)
    if getattr(config, "needs_calibration", False):
        model.calibrate(calibration)
    return model


def make_optimizer(model, lr: float, loraplus_lr_ratio: float | None = None):
    """AdamW without weight decay; with a ratio, LoRA+ through peft's own ``create_loraplus_optimizer`` (B at
    ratio x lr)."""
    if loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         weight_decay=0.0)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def warmup_cosine(optimizer, steps: int):
    """LLaMA-Factory's schedule: 10 % linear warm-up, then cosine decay to zero."""
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))


def train_adapter(model, batches: list, loss_of, lr: float, training: dict) -> list[float]:
    """LLaMA-Factory-like optimisation of the trainable parameters over ``batches`` (one step each): AdamW without
    weight decay (LoRA+ with a ``loraplus_lr_ratio`` in ``training``), 10 % warm-up then cosine, clipping at 1.0; a
    routed adapter adds its load-balancing loss. Returns the curve of ``loss_of(batch)`` (the task loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, lr, **training)
    schedule = warmup_cosine(optimizer, len(batches))
    model.train()
    curve = []
    for batch in batches:
        loss = loss_of(batch)
        (model.base_model.add_routing_loss(loss) if isinstance(model.base_model, AiraMoeModel) else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


# ------------------------------------------------------------------------------------------------------ one run

def held_out_loss(model, chunks: torch.Tensor, batch: int = 32) -> float:
    """Mean token NLL over ``chunks`` (every token, as in pretraining)."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in chunks.split(batch):
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            tokens += ids[:, 1:].numel()
    model.train()
    return total / tokens


# the multi-task cell: trained on the union of these tasks' train splits (as the multi-tasking recipe mixes them)
TASK_GROUPS = {"multitask": ["medicine", "math", "finance"]}


def task_parts(task: str) -> list[str]:
    """'medicine' -> ['medicine']; 'multitask' or 'medicine+math' (a multi-task cell) -> its tasks."""
    return TASK_GROUPS.get(task, task.split("+"))


def split_loss(model, tokens: dict, task: str, share: str, eval_chunks: int) -> dict:
    """Loss on ``share`` of each of the cell's tasks and their mean (equal weight per task)."""
    by_task = {part: held_out_loss(model, tokens[f"{part}/{share}"][:eval_chunks]) for part in task_parts(task)}
    row = {f"{share}_loss": statistics.mean(by_task.values())}
    if len(by_task) > 1:
        row[f"{share}_loss_by_task"] = by_task
    return row


def run_one(job: dict) -> dict:
    """Fine-tune one (base, task, method, lr, seed); returns the loss on the splits in ``job["evaluate"]`` only
    (selection and screening runs: val; the test split is then neither loaded nor scored). LLaMA-Factory-like
    optimisation: AdamW without weight decay, 10 % linear warm-up then cosine decay, gradient clipping at 1.0."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(job["threads"])
    wanted = [f"{part}/{share}" for part in task_parts(job["task"]) for share in ("train", *job["evaluate"])]
    tokens = {key: value for key, value in torch.load(job["tokens"]).items() if key in wanted}
    train = torch.cat([tokens[f"{part}/train"] for part in task_parts(job["task"])])
    base = LlamaForCausalLM.from_pretrained(job["base_dir"]).float()
    budget = lora_reference_params(base)
    overrides = dict(job["overrides"] or {})
    training = {key: overrides.pop(key) for key in TRAINING_KEYS if key in overrides}
    config = peft_config(overrides if job["overrides"] is not None else None)
    torch.manual_seed(job["seed"])
    gen = torch.Generator().manual_seed(job["seed"])
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(job["steps"] * job["batch"] // len(train) + 1)])
    batches = [train[order[i * job["batch"]:(i + 1) * job["batch"]]] for i in range(job["steps"])]
    start = time.perf_counter()
    model = build_adapted(base, config, [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches[:8]])
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    redistributes = (getattr(config, "init_lora_weights", None) == "eva" and config.eva_config.rho > 1
                     or getattr(config, "token_dependent", False) or job["method"] in PARAMETER_CONTROLS)
    tolerance = REDISTRIBUTED_PARAMS_TOLERANCE if redistributes else 0.0
    if abs(count - budget) > tolerance * budget:
        raise RuntimeError(f"{job['method']}: {count:,} trainable parameters, budget {budget:,} (LoRA r={LORA['r']}), "
                           f"allowed relative difference {tolerance}")
    curve = train_adapter(model, batches, lambda ids: model(input_ids=ids, labels=ids).loss, job["lr"], training)
    result = {}
    for share in job["evaluate"]:
        result.update(split_loss(model, tokens, job["task"], share, job["eval_chunks"]))
    result.update({
        "final_train_loss": statistics.mean(curve[-max(1, len(curve) // 10):]),
        "diverged": not math.isfinite(curve[-1]),
        "params": count,
        "params_budget": budget,
        "seconds": time.perf_counter() - start,
        "curve": [round(v, 4) for v in curve],
    })
    config = model.peft_config["default"]
    ranks = getattr(config, "rank_pattern", None) or {}
    if ranks:
        result["layer_ranks"] = [ranks.get(f"model.layers.{i}.self_attn.q_proj", config.r) for i in range(len(base.model.layers))]
    return result


# ------------------------------------------------------------------------------------------------------ protocol

def job_key(job: dict) -> str:
    fields = {k: v for k, v in job.items() if k not in ("threads", "tokens", "base_dir")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cache_row(job: dict, numbers: dict) -> dict:
    """A finished run as the cache keeps it: its key, the job (less what does not describe the run) and its numbers."""
    return {"key": job_key(job), **{k: v for k, v in job.items() if k not in ("tokens", "base_dir", "threads")}, **numbers}


class Runner:
    """Runs jobs on a process pool (one torch thread each) and caches finished runs in a JSONL file."""

    def __init__(self, cache_path: str, workers: int, run_fn=None):
        self.cache_path = cache_path
        self.workers = workers
        self.run_fn = run_fn or run_one  # a module-level function (the pool pickles it by name): job -> result dict
        self.done: dict[str, dict] = {}
        if cache_path and os.path.isfile(cache_path):
            with open(cache_path, encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    self.done[row["key"]] = row

    def add(self, rows: list[dict]) -> int:
        """Keep finished runs (rows of ``cache_row``) as if they had run here; keys already held are left as they are.
        Returns how many were new."""
        fresh = [row for row in rows if row["key"] not in self.done]
        for row in fresh:
            self.done[row["key"]] = row
        if fresh and self.cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in fresh)
        return len(fresh)

    def run(self, jobs: list[dict]) -> list[dict]:
        pending = {job_key(job): job for job in jobs if job_key(job) not in self.done}
        if pending:
            print(f"  running {len(pending)} fine-tuning runs ({len(jobs) - len(pending)} cached)", flush=True)
            context = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(self.workers, mp_context=context) as pool:
                running = {pool.submit(self.run_fn, job): key for key, job in pending.items()}
                for finished in futures.as_completed(running):
                    key = running[finished]
                    job = pending[key]
                    if finished.exception() is not None:  # stop at once: do not wait for the queued runs
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise RuntimeError(f"run {job['base']}/{job['task']}/{job['method']} lr={job['lr']:g} "
                                           f"seed={job['seed']} failed") from finished.exception()
                    row = cache_row(job, finished.result())
                    self.add([row])  # written at once: a stopped command keeps every finished run
                    losses = " ".join(f"{share} {row[share + '_loss']:.4f}" for share in job["evaluate"])
                    print(f"    {job['base']}/{job['task']}/{job['method']} lr={job['lr']:g} seed={job['seed']}: "
                          f"{losses} ({row['seconds']:.0f} s)", flush=True)
        return [self.done[job_key(job)] for job in jobs]


def rows_from_results(compared: dict, job_for, lr_task: str | None, screen: bool, source: str) -> list[dict]:
    """The cache rows a committed comparison (``protocol``'s output) was made of, rebuilt from its own numbers: the
    selection runs (seed 0, val only: ``val_by_lr``; on ``lr_task``'s cells only when one sweep served every cell)
    and the reported seeds (every per-seed number: losses, metrics, ``*_by_task``). ``job_for(base, task, method,
    lr, seed, evaluate, overrides)`` gives the job those numbers belong to, or None when the method's settings today
    differ from ``overrides`` (then its numbers are not reused). A family's members other than the chosen one kept
    only their best val loss, so their selection runs are not rebuilt. Each row says where it came from."""
    rows = []

    def keep(job, numbers):
        if job is not None:
            rows.append(cache_row(job, {**numbers, "from_results": source}))

    for base, tasks in compared.items():
        for task, cell in tasks.items():
            if task == "_no_finetuning":
                continue
            for family, row in cell.items():
                method = row.get("member", family)
                if lr_task is None or task == lr_task:
                    for lr, loss in row["val_by_lr"].items():
                        keep(job_for(base, task, method, float(lr), 0, ["val"], row["overrides"]),
                             {"val_loss": loss, "diverged": not math.isfinite(loss)})
                for index, seed in enumerate(row.get("seeds", [])):
                    numbers = {"diverged": False, "params": row["params"], "params_budget": row["params_budget"]}
                    if row.get("layer_ranks") is not None:
                        numbers["layer_ranks"] = row["layer_ranks"]
                    for name, value in row.items():
                        if name.endswith("_by_task"):
                            numbers[name] = {part: entry["runs"][index] for part, entry in value.items()}
                        elif isinstance(value, dict) and "runs" in value and not name.startswith("paired_diff"):
                            numbers[name] = value["runs"][index]
                    keep(job_for(base, task, method, row["lr"], seed, ["val"] if screen else ["val", "test"],
                                 row["overrides"]), numbers)
    return rows


def lr_grid_step(lr: float, direction: int) -> float:
    """The next rate on the 1-3-10 ladder (1e-3 -> 3e-3 -> 1e-2 ...), up (+1) or down (-1)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    ladder = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    position = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / lr)))
    return float(f"{ladder[position + direction]:.3g}")


def choose_lrs(runner: Runner, make_job, cells: list, grid: list[float], extensions: int = 2) -> dict:
    """Per cell: seed 0 over ``grid`` on the val split, extending past an edge that wins (up to ``extensions`` times).
    All cells' runs of a round go to the pool together. Returns {cell: (best lr, {lr: val loss})}."""
    scores = {cell: {} for cell in cells}
    todo = {cell: sorted(grid) for cell in cells}
    for _ in range(extensions + 1):
        jobs = [(cell, make_job(cell, lr, 0)) for cell, lrs in todo.items() for lr in lrs]
        for (cell, _), row in zip(jobs, runner.run([job for _, job in jobs])):
            ok = not row["diverged"] and math.isfinite(row["val_loss"])
            scores[cell][row["lr"]] = row["val_loss"] if ok else math.inf
        todo = {}
        for cell, by_lr in scores.items():
            best, lrs = min(by_lr, key=by_lr.get), sorted(by_lr)
            if len(lrs) > 1 and best in (lrs[0], lrs[-1]):
                step = lr_grid_step(best, -1 if best == lrs[0] else +1)
                if step not in by_lr:
                    todo[cell] = [step]
        if not todo:
            break
    return {cell: (min(by_lr, key=by_lr.get), by_lr) for cell, by_lr in scores.items()}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def method_members(names: list[str], families: dict = FAMILIES) -> list[str]:
    """Method names with each family name (``families``) replaced by its members, in order."""
    return [member for name in names if name for member in families.get(name, [name])]


def family_of(method: str, families: dict = FAMILIES) -> str:
    return next((family for family, members in families.items() if method in members), method)


def compare(args, manifest: dict, methods: dict) -> dict:
    from transformers import LlamaForCausalLM

    def make_job(cell, lr, seed, evaluate=("val",)):
        base, task, method = cell
        return {"base": base, "task": task, "method": method, "overrides": methods[method], "lr": lr, "seed": seed,
                "evaluate": list(evaluate), "steps": args.steps, "batch": args.batch, "eval_chunks": args.eval_chunks,
                "testbed": os.path.basename(manifest["dir"]), "threads": 1, "version": args.tag,
                "tokens": manifest["tokens"], "base_dir": manifest["bases"][base]}

    def no_finetuning(base: str) -> dict:
        tokens = torch.load(manifest["tokens"])
        model = LlamaForCausalLM.from_pretrained(manifest["bases"][base]).float()
        shares = ("val",) if args.screen else ("val", "test")
        return {task: {share: split_loss(model, tokens, task, share, args.eval_chunks)[f"{share}_loss"] for share in shares}
                for task in args.tasks}

    return protocol(args, methods, Runner(args.cache, args.workers), make_job, no_finetuning)


def protocol(args, methods: dict, runner: Runner, make_job, no_finetuning, lr_task: str | None = None,
             metrics: tuple[str, ...] = (), peers: list[str] = PEERS, families: dict = FAMILIES,
             plain: str = "cola_basic") -> dict:
    """The comparison over the (base, task, method) cells of ``args.bases`` x ``args.tasks`` x ``methods``: the
    learning rate (and a family's member) chosen on val with seed 0, then seeds 1..N at that rate, summaries, paired
    differences and ranks. ``make_job(cell, lr, seed, evaluate)`` describes one run for ``runner``;
    ``no_finetuning(base)`` gives {task: {share: loss}} of the base model. With ``lr_task``, the rates are searched on
    that task's cells only and every other task uses them (one sweep serving every cell). ``metrics``: extra numbers
    of a run (e.g. ``test_accuracy``) summarised like the losses, with their ``_by_task`` splits; ``peers``: the
    methods a user could run instead (the best of them on val is a reference); ``families``: {reported name: members}
    (one member is chosen on val); ``plain``: the plain CoLA form, the third reference (reported as ``cola_basic``)."""
    sweep_tasks = [lr_task] if lr_task else args.tasks
    cells = [(base, task, method) for base in args.bases for task in sweep_tasks for method in methods]
    chosen = choose_lrs(runner, make_job, cells, args.lrs)
    if lr_task:
        chosen.update({(base, task, method): chosen[(base, lr_task, method)]
                       for base in args.bases for task in args.tasks for method in methods})
    # a family (LoRA+ ratios) is reported as its member with the lowest val loss at its best rate
    winners = {}
    for base in args.bases:
        for task in args.tasks:
            for method in methods:
                family = family_of(method, families)
                current = winners.get((base, task, family))
                if current is None or chosen[(base, task, method)][1][chosen[(base, task, method)][0]] < \
                        chosen[(base, task, current)][1][chosen[(base, task, current)][0]]:
                    winners[(base, task, family)] = method
    reported = {(base, task, family): method for (base, task, family), method in winners.items()}
    evaluate = ("val",) if args.screen else ("val", "test")
    seeded = {}
    if args.seeds > 0:  # seeds 1..N: the selection seed 0 is not reused for what is reported
        jobs = [(key, make_job((key[0], key[1], method), chosen[(key[0], key[1], method)][0], seed, evaluate))
                for key, method in reported.items() for seed in range(1, args.seeds + 1)]
        for (key, _), row in zip(jobs, runner.run([job for _, job in jobs])):
            seeded.setdefault(key, []).append(row)

    results = {}
    metric = "val_loss" if args.screen else "test_loss"
    for base in args.bases:
        results[base] = {"_no_finetuning": no_finetuning(base)}
        for task in args.tasks:
            cell_rows = {}
            for (cell_base, cell_task, family), method in reported.items():
                if (cell_base, cell_task) != (base, task):
                    continue
                best, scores = chosen[(base, task, method)]
                row = {"overrides": methods[method], "lr": best,
                       "val_by_lr": {f"{k:g}": v for k, v in sorted(scores.items())}, "val_loss": {"mean": scores[best]}}
                if family != method:
                    row["member"] = method
                    row["val_by_member"] = {m: min(chosen[(base, task, m)][1].values()) for m in families[family]
                                            if (base, task, m) in chosen}
                runs = seeded.get((base, task, family))
                if runs:
                    row.update(val_loss=summary([r["val_loss"] for r in runs]), seeds=[r["seed"] for r in runs],
                               params=runs[0]["params"], params_budget=runs[0]["params_budget"],
                               layer_ranks=runs[0].get("layer_ranks"))
                    if not args.screen:
                        row["test_loss"] = summary([r["test_loss"] for r in runs])
                    if "val_loss_by_task" in runs[0]:
                        for share in evaluate:
                            row[f"{share}_loss_by_task"] = {
                                part: summary([r[f"{share}_loss_by_task"][part] for r in runs]) for part in task_parts(task)}
                    for name in metrics:
                        if name in runs[0]:
                            row[name] = summary([r[name] for r in runs])
                        if f"{name}_by_task" in runs[0]:
                            row[f"{name}_by_task"] = {part: summary([r[f"{name}_by_task"][part] for r in runs])
                                                      for part in runs[0][f"{name}_by_task"]}
                cell_rows[family] = row
            measured_peers = [m for m in peers if m in cell_rows and "runs" in cell_rows[m]["val_loss"]]
            references = {"lora": "lora", "cola_basic": plain}
            if measured_peers:  # chosen on val over the reported seeds, never on test
                references["best_peer"] = min(measured_peers, key=lambda m: cell_rows[m]["val_loss"]["mean"])
            for label, reference in references.items():
                if reference not in cell_rows or "runs" not in cell_rows[reference][metric]:
                    continue
                for method, row in cell_rows.items():
                    if method != reference:
                        diffs = [a - b for a, b in zip(row[metric]["runs"], cell_rows[reference][metric]["runs"])]
                        row[f"paired_diff_vs_{label}"] = {**summary(diffs), "reference": reference}
            ranked = sorted((m for m in cell_rows if "runs" in cell_rows[m][metric]), key=lambda m: cell_rows[m][metric]["mean"])
            for position, method in enumerate(ranked, 1):
                cell_rows[method]["rank"] = position
            results[base][task] = cell_rows
    return results


def overview(results: dict, screen: bool) -> list[str]:
    """One line per method across every (base, task) cell: its paired difference to LoRA and its rank there; a
    difference counts as ahead / behind only when it is larger than its std (else a tie)."""
    metric = "val_loss" if screen else "test_loss"
    cells = [(base, task) for base, tasks in results.items() for task in tasks if task != "_no_finetuning"]
    methods = []
    for base, task in cells:
        methods += [m for m, row in results[base][task].items() if "runs" in row.get(metric, {}) and m not in methods]
    if len(cells) < 2 or not methods:
        return []
    lines = ["**All cells**: Δ vs LoRA (paired, mean ± std over the seeds) and rank among the methods of the cell; "
             "ahead / behind = |Δ| larger than its std, else a tie", "",
             "| method | " + " | ".join(f"{base} / {task}" for base, task in cells) + " | ahead / tie / behind |",
             "|---|" + "---|" * (len(cells) + 1)]
    for method in methods:
        entries, tally = [], [0, 0, 0]
        for base, task in cells:
            row = results[base][task].get(method)
            if row is None or "rank" not in row:
                entries.append("–")
                continue
            diff = row.get("paired_diff_vs_lora")
            if diff is None:
                entries.append(f"– ({row['rank']})")
                continue
            verdict = 0 if diff["mean"] < -diff["std"] else 2 if diff["mean"] > diff["std"] else 1
            tally[verdict] += 1
            text = f"{diff['mean']:+.4f} ± {diff['std']:.4f} ({row['rank']})"
            entries.append(f"**{text}**" if verdict == 0 else text)
        lines.append(f"| {method} | " + " | ".join(entries) + f" | {tally[0]} / {tally[1]} / {tally[2]} |")
    return lines + [""]


def markdown(results: dict, screen: bool) -> str:
    """One table per (base, task): loss mean +- std over the seeds, paired differences, rank, lr, parameters; first,
    the overview across cells."""
    lines = overview(results, screen)
    metric = "val_loss" if screen else "test_loss"
    name = "val" if screen else "test"
    for base, tasks in results.items():
        reference = tasks.get("_no_finetuning", {})
        if reference:
            lines += [f"**{base}** before fine-tuning: " + ", ".join(
                f"{task} " + " / ".join(f"{share} {value:.4f}" for share, value in v.items()) for task, v in reference.items()), ""]
        for task, rows in tasks.items():
            if task == "_no_finetuning":
                continue
            seeded = any("runs" in row[metric] if metric in row else False for row in rows.values())
            if not seeded:  # lr search only
                lines += [f"**{base} / {task}**: val loss at the best lr (seed 0)", "", "| method | val | lr |", "|---|---|---|"]
                lines += [f"| {m} | {row['val_loss']['mean']:.4f} | {row['lr']:g} |" for m, row in rows.items()]
                lines.append("")
                continue
            by_task = next((row.get(f"{name}_loss_by_task") for row in rows.values() if row.get(f"{name}_loss_by_task")), None)
            accuracy = any(f"{name}_accuracy" in row for row in rows.values())  # multiple-choice cells
            lines += [f"**{base} / {task}**: {name} loss, mean ± std over seeds "
                      f"{next(iter(rows.values())).get('seeds')}; Δ = paired difference (method − reference), mean ± std; "
                      "lr (and LoRA+ ratio) chosen on val; best peer = the peer with the lowest val loss", "",
                      f"| method | {name} | Δ vs LoRA | Δ vs best peer | Δ vs CoLA-basic | rank | lr | params |"
                      + ("".join(f" {part} |" for part in by_task) if by_task else "") + (" accuracy |" if accuracy else ""),
                      "|---|---|---|---|---|---|---|---|" + ("---|" * len(by_task) if by_task else "")
                      + ("---|" if accuracy else "")]
            for method, row in sorted(rows.items(), key=lambda item: item[1].get("rank", 10**6)):
                if metric not in row or "runs" not in row[metric]:
                    continue
                cells = [f"{row[metric]['mean']:.4f} ± {row[metric]['std']:.4f}"]
                for label in ("lora", "best_peer", "cola_basic"):
                    diff = row.get(f"paired_diff_vs_{label}")
                    cells.append("–" if diff is None else f"{diff['mean']:+.4f} ± {diff['std']:.4f}"
                                 + (f" ({diff['reference']})" if label == "best_peer" else ""))
                label = method + (f" ({row['member']})" if "member" in row else "")
                cells += [str(row.get("rank", "")), f"{row['lr']:g}", f"{row.get('params', 0):,}"]
                if by_task:
                    cells += [f"{row[f'{name}_loss_by_task'][part]['mean']:.4f}" for part in by_task]
                if accuracy:
                    value = row.get(f"{name}_accuracy")
                    cells.append("–" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- teacher

def tiny_llama(hidden, layers, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def teacher_student(seed: int, steps: int, layers: int = 6, hidden: int = 64, vocab: int = 128, rank: int = 4):
    from peft import LoraConfig, get_peft_model

    outlier_layers = (1, 4)
    base = tiny_llama(hidden, layers, vocab, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index in outlier_layers:  # activation outliers: a few channels with large norm gains
            block = base.model.layers[index]
            channels = torch.randperm(hidden, generator=gen)[:4]
            block.input_layernorm.weight[channels] *= 12.0
            block.post_attention_layernorm.weight[channels] *= 12.0
    teacher = tiny_llama(hidden, layers, vocab, seed).eval()
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for index in outlier_layers:
            for name, module in teacher.model.layers[index].named_modules():
                if name.split(".")[-1] in TARGETS:
                    out_f, in_f = module.weight.shape
                    u = torch.randn(out_f, 8, generator=gen) / math.sqrt(8)
                    v = torch.randn(8, in_f, generator=gen) / math.sqrt(in_f)
                    module.weight += 0.5 * module.weight.norm() / (u @ v).norm() * (u @ v)
    data = torch.randint(0, vocab, (steps + 8, 8, 32), generator=gen)  # random token sequences
    held_out = data[-8:]
    calib = [{"input_ids": batch, "attention_mask": torch.ones_like(batch)} for batch in data[:4]]
    with torch.no_grad():
        teacher_logits = [teacher(b).logits for b in data]

    def fit(config, calibrate):
        student = tiny_llama(hidden, layers, vocab, seed)
        student.load_state_dict(base.state_dict())
        model = get_peft_model(student, config)
        if calibrate:
            model.calibrate(calib)
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for step in range(steps):
            logits = model(data[step]).logits
            loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits[step], -1), log_target=True, reduction="batchmean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            kl = statistics.mean(
                F.kl_div(F.log_softmax(model(b).logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()
                for b, t in zip(held_out, teacher_logits[-8:])
            )
        ranks = getattr(model.peft_config["default"], "rank_pattern", {}) or {}
        per_layer = [ranks.get(f"model.layers.{i}.self_attn.q_proj", rank) for i in range(layers)]
        return {"held_out_kl": kl, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "layer_ranks": per_layer}

    common = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    results = {
        "lora_uniform": fit(LoraConfig(**common), False),
        "aira_uniform": fit(AiraMoeConfig(**common), False),
    }
    allocation = dict(use_layer_wise_rank=True, rank_budget="auto", min_rank=1, max_rank=16, objective_function="log")
    for label, theta in (("aira_lod_mean_M2 (literal)", dict(theta_type="lod", lod_reference="mean", lod_threshold_M=2.0)),
                         ("aira_lod_default", dict(theta_type="lod")),
                         ("aira_act", dict(theta_type="act"))):
        results[label] = fit(AiraMoeConfig(**common, **allocation, **theta), True)
    return results


def teacher_part(seeds: list[int], steps: int) -> dict:
    runs = [teacher_student(seed, steps) for seed in seeds]
    result = {
        method: {"held_out_kl": summary([r[method]["held_out_kl"] for r in runs]), "params": runs[0][method]["params"],
                 "layer_ranks": [r[method]["layer_ranks"] for r in runs]}
        for method in runs[0]
    }
    for method, row in result.items():
        print(f"teacher {method}: KL {row['held_out_kl']['mean']:.4f} +- {row['held_out_kl']['std']:.4f}, "
              f"params {row['params']:,}, ranks {row['layer_ranks'][0]}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    import testbed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["compare", "teacher", "all"], default="compare")
    parser.add_argument("--bases", default="pretrained,outliers", help="testbed bases (comma-separated)")
    parser.add_argument("--tasks", default=",".join([*testbed.TASKS, *TASK_GROUPS]),
                        help=f"tasks (comma-separated) from {[*testbed.TASKS, *TASK_GROUPS]}, or 'a+b' for a mixture")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"methods (comma-separated) from {list(METHODS)}; a family name {list(FAMILIES)} "
                             "stands for its members (default: the committed table's)")
    parser.add_argument("--lod_sweep", default="", help="a method with layer-wise allocation: add it at every "
                        f"lod_threshold_M {LOD_SWEEP['M']} x lod_reference {LOD_SWEEP['reference']} (use with --screen)")
    parser.add_argument("--extra", action="append", default=[],
                        help="an extra CoLA method 'name:key=value,...' (AiraMoeConfig keys over CoLA 2x3 r=4)")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning-rate grid (extended past a winning edge)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="seeds 1..N per method at the chosen lr (part compare; seed 0 chooses the lr)")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    parser.add_argument("--eval_chunks", type=int, default=128, help="val/test sequences scored per run")
    parser.add_argument("--screen", action="store_true",
                        help="report the val split only (for choosing defaults); with --seeds 0, just the lr search (seed 0)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--cache", default=os.path.join(ROOT, "outputs", "quality_runs.jsonl"), help="JSONL run cache ('' = none)")
    parser.add_argument("--tag", default="", help="kept in every run's cache key (change it after changing the code)")
    parser.add_argument("--data_dir", default=testbed.DEFAULT_DATA)
    parser.add_argument("--testbed_dir", default=testbed.DEFAULT_CACHE)
    parser.add_argument("--pretrain_steps", type=int, default=testbed.BUILD["pretrain_steps"])
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--out", default="", help="JSON results; a markdown table is printed (and written next to it)")
    parser.add_argument("--note", default="", help="a line kept in the JSON and at the top of the markdown (e.g. "
                        "what a partial run covers)")
    args = parser.parse_args(argv)
    args.bases, args.tasks = args.bases.split(","), args.tasks.split(",")
    args.lrs = [float(v) for v in args.lrs.split(",")]
    names = method_members(args.methods.split(","))
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {list(METHODS)} and families {list(FAMILIES)}")
    for task in args.tasks:
        if any(part not in testbed.TASKS for part in task_parts(task)):
            parser.error(f"--tasks: unknown {task!r}; known: {[*testbed.TASKS, *TASK_GROUPS]} or 'a+b'")
    methods = {name: METHODS[name] for name in names}
    if args.lod_sweep:
        if args.lod_sweep not in METHODS:
            parser.error(f"--lod_sweep: unknown method {args.lod_sweep!r}")
        try:
            methods.update(lod_sweep_methods(args.lod_sweep, METHODS[args.lod_sweep]))
        except ValueError as error:
            parser.error(str(error))
    for spec in args.extra:
        name, kwargs = parse_extra(spec)
        methods[name] = kwargs
    start = time.perf_counter()
    result = {"device": device_name(torch.device("cpu")) + f", {args.workers} worker processes x 1 thread",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")}, "note": args.note}
    if args.part in ("compare", "all"):
        manifest = testbed.build(args.testbed_dir, args.data_dir, {**testbed.BUILD, "pretrain_steps": args.pretrain_steps})
        result["testbed"] = {k: manifest[k] for k in ("settings", "stats", "planted", "split_sizes", "chunks")}
        result["compare"] = compare(args, manifest, methods)
        table = markdown(json.loads(json.dumps(result["compare"])), args.screen)
        if args.note:
            table = f"{args.note}\n\n{table}"
        print("\n" + table)
        if args.out:
            with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
                handle.write(table)
    if args.part in ("teacher", "all"):
        result["teacher"] = teacher_part(list(range(args.seeds)), args.teacher_steps)
    result["seconds"] = time.perf_counter() - start
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
