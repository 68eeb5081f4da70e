"""``aira-moe demo --tiny``: the synthetic tiny default (a random 2-layer Llama, colour questions) trained with every
technique in ~1-2 minutes; the tests and ``TINY=1`` use it."""

from __future__ import annotations

import os

from .train import clear_train_dir, prepare_train_dir, read_allocation, run_llamafactory_train

TINY_TRAIN = {
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "aira_moe",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_target": "all",
    "num_A": 2,
    "num_B": 3,
    "use_layer_wise_rank": True,
    "rank_budget": "auto",
    "min_rank": 2,
    "max_rank": 14,
    "use_awsvd_init": True,
    "awsvd_collect_steps": 8,
    "use_activation_aware": True,
    "activation_aware_mode": "inps",
    "template": "default",
    "cutoff_len": 128,
    "overwrite_cache": True,
    "per_device_train_batch_size": 16,
    # CoLA 2x3 `full` moves sum(A) and sum(B) num_A and num_B times faster than one LoRA pair: a LoRA-sized rate
    # does not learn on the tiny model; 1e-3 x 24 epochs (384 steps) learns the colour table
    "learning_rate": 1.0e-3,
    "num_train_epochs": 24,
    "lr_scheduler_type": "constant",
    "logging_steps": 16,
    "save_strategy": "no",
    "plot_loss": True,
    "report_to": "none",
    "use_cpu": True,
    # on a CPU memory is not the limit: recomputing activations would cost time (as the SmolLM2 demo)
    "disable_gradient_checkpointing": True,
    "seed": 42,
}


def say(message: str) -> None:
    print(f"[aira-moe demo] {message}", flush=True)


def run_tiny_demo(output_dir: str, overwrite: bool) -> dict:
    """Tiny default end to end: build it, train with every technique via the stock llamafactory-cli, then score the base
    model and the adapter on the held-out synthetic questions. An existing train/ without ``overwrite`` and assets
    built with other settings are refused before any work."""
    from transformers.utils import logging as transformers_logging

    from ..evaluation import EvalArguments, evaluate
    from ..tiny import build_tiny_assets

    transformers_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars for a 2-layer model
    output_dir = os.path.abspath(output_dir)
    train_dir = prepare_train_dir(output_dir, overwrite)
    # absolute paths: the adapter records where its base model is, so peft's from_pretrained works from anywhere
    assets = build_tiny_assets(os.path.join(output_dir, "assets"))
    clear_train_dir(train_dir)
    config = {**TINY_TRAIN, "model_name_or_path": assets["model"], "dataset": assets["dataset"],
              "dataset_dir": assets["dataset_dir"], "output_dir": train_dir}
    train_loss = run_llamafactory_train(config, output_dir, say)["train_loss"]
    ranks = [row["rank"] for row in read_allocation(train_dir)["layers"]]
    say(f"layer ranks {ranks}; mean train loss {train_loss:.3f}")
    scores = {}
    for label, adapter in (("base", None), ("aira_moe", train_dir)):  # aira-moe eval's defaults (n_shot 0)
        args = EvalArguments(model_name_or_path=assets["model"], adapter_name_or_path=adapter, finetuning_type="aira_moe",
                             template="default", task="fineval", task_dir=assets["task_dir"], batch_size=32,
                             save_dir=os.path.join(output_dir, f"eval_{label}"), overwrite_save_dir=True, device="cpu")
        scores[label] = evaluate(args, quiet=True)["accuracy"]
    say(f"accuracy on the held-out colour questions: base {scores['base']:.3f} -> aira_moe {scores['aira_moe']:.3f}")
    say(f"adapter, allocation report and loss plot in {train_dir}; base model in {assets['model']}")
    return scores
