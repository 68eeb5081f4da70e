"""``aira-moe`` console command: ``eval`` (multiple-choice evaluator), ``export-lora`` (standard LoRA for serving),
``tiny`` (build the tiny default), ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Optional

from .errors import ExistingOutputError, MissingFileError, UserError, report

DEMO_TRAIN = {
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
    "seed": 42,
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_eval_args(argv: list[str]):
    """``aira-moe eval [config.yaml] [--key value ...]``: YAML values first, flags override."""
    import yaml

    from .evaluation import EvalArguments

    parser = argparse.ArgumentParser(prog="aira-moe eval", description="Score 4-way multiple-choice tasks by the "
                                     "next-token logits of A-D after the templated prompt.")
    parser.add_argument("config", nargs="?", help="YAML file with the arguments below (flags override it).")
    for item in dataclasses.fields(EvalArguments):
        kind = {"int": int, "bool": _parse_bool}.get(str(item.type).replace("Optional[", "").rstrip("]"), str)
        default = "required" if item.default is dataclasses.MISSING else f"default: {item.default}"
        help_text = f"{item.metadata.get('help')} ({default})"
        # a bool works as a bare flag (--overwrite_save_dir) and with a value (--overwrite_save_dir false)
        extra = {"nargs": "?", "const": True} if kind is _parse_bool else {}
        parser.add_argument(f"--{item.name}", type=kind, default=None, help=help_text, **extra)
    namespace = parser.parse_args(argv)
    values = {}
    if namespace.config:
        with open(namespace.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        known = {item.name for item in dataclasses.fields(EvalArguments)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"aira-moe eval: unknown keys in {namespace.config}: {unknown}")
    values.update({k: v for k, v in vars(namespace).items() if k != "config" and v is not None})
    for required in ("model_name_or_path", "task"):
        if required not in values:
            raise SystemExit(f"aira-moe eval: `{required}` is required (YAML key or --{required})")
    return EvalArguments(**values)


def prepare_demo(output_dir: str, overwrite: bool) -> tuple[str, dict]:
    """The demo's user errors, before any work: an existing train/ without --overwrite, assets built with other
    settings. Returns the train directory and the tiny assets' absolute paths (so the
    adapter records where its base model is, and peft's from_pretrained works from any directory)."""
    from transformers.utils import logging as transformers_logging

    from .tiny import build_tiny_assets

    transformers_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars for a 2-layer model
    train_dir = os.path.join(os.path.abspath(output_dir), "train")
    if os.path.exists(train_dir) and not overwrite:
        raise ExistingOutputError(f"{train_dir} exists; pass --overwrite or another --output_dir")
    assets = build_tiny_assets(os.path.join(os.path.abspath(output_dir), "assets"))
    if os.path.exists(train_dir):
        shutil.rmtree(train_dir)
    return train_dir, assets


def run_demo(train_dir: str, assets: dict) -> dict:
    """Tiny default end to end (after ``prepare_demo``): train with every technique via the stock llamafactory-cli,
    then score the base model and the adapter on the held-out synthetic questions. LLaMA-Factory's own output goes
    to train.log."""
    import yaml

    from .evaluation import EvalArguments, evaluate

    output_dir = os.path.dirname(train_dir)
    config = {**DEMO_TRAIN, "model_name_or_path": assets["model"], "dataset": assets["dataset"],
              "dataset_dir": assets["dataset_dir"], "output_dir": train_dir}
    config_path = os.path.join(output_dir, "demo_train.yaml")
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    log_path = os.path.join(output_dir, "train.log")
    print(f"[aira-moe demo] llamafactory-cli train {config_path}  (output: {log_path})", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        finished = subprocess.run(["llamafactory-cli", "train", config_path], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if finished.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read().splitlines()[-25:]
        raise SystemExit("\n".join(tail) + f"\naira-moe demo: llamafactory-cli train failed (exit {finished.returncode}); "
                         f"full output in {log_path}")
    from .calibration.report import REPORT_JSON

    with open(os.path.join(train_dir, REPORT_JSON), encoding="utf-8") as handle:
        allocation = json.load(handle)
    with open(os.path.join(train_dir, "train_results.json"), encoding="utf-8") as handle:
        train_loss = json.load(handle)["train_loss"]
    ranks = [row["rank"] for row in allocation["layers"]]
    print(f"[aira-moe demo] layer ranks {ranks}; mean train loss {train_loss:.3f}", flush=True)
    scores = {}
    for label, adapter in (("base", None), ("aira_moe", train_dir)):  # aira-moe eval's defaults (n_shot 0)
        args = EvalArguments(model_name_or_path=assets["model"], adapter_name_or_path=adapter, finetuning_type="aira_moe",
                             template="default", task="fineval", task_dir=assets["task_dir"], batch_size=32,
                             save_dir=os.path.join(output_dir, f"eval_{label}"), overwrite_save_dir=True, device="cpu")
        scores[label] = evaluate(args, quiet=True)["accuracy"]
    print(f"[aira-moe demo] accuracy on the held-out colour questions: base {scores['base']:.3f} -> "
          f"aira_moe {scores['aira_moe']:.3f}")
    print(f"[aira-moe demo] adapter, allocation report and loss plot in {train_dir}; base model in {assets['model']}")
    return scores


def run_export_lora(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="aira-moe export-lora",
        description="Write an aira_moe adapter, exactly, as a standard peft LoRA adapter (peft_type LORA, one r, one "
                    "lora_alpha) for vLLM / SGLang / TGI multi-LoRA serving on the original base model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, help="directory of the saved aira_moe adapter (a training output_dir)")
    parser.add_argument("--out", required=True, help="directory to write the LoRA adapter to")
    parser.add_argument("--max_rank", type=int, default=None,
                        help="refuse (or with --truncate, cut by SVD) a module that needs a higher rank; e.g. the "
                             "server's --max-lora-rank")
    parser.add_argument("--truncate", action="store_true", help="with --max_rank: keep the top singular directions and "
                        "print the relative error instead of refusing")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the written weights (default: that of the adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.max_rank is not None and args.max_rank < 1:
        parser.error(f"--max_rank must be >= 1, got {args.max_rank}")
    if args.truncate and args.max_rank is None:
        parser.error("--truncate needs --max_rank")
    from .adapter_paths import require_adapter_dirs
    from .export import export_lora

    require_adapter_dirs(args.adapter, key="--adapter")  # missing or corrupt files: named before any tensor is read
    report = export_lora(args.adapter, args.out, max_rank=args.max_rank, truncate=args.truncate, dtype=args.dtype,
                         overwrite=args.overwrite)
    print(f"[aira-moe export-lora] wrote a LoRA adapter with r={report['r']} ({report['modules']} modules, "
          f"{report['dtype']}) to {report['out_dir']}")
    for name, error in report["truncated"].items():
        print(f"[aira-moe export-lora] truncated {name} from rank {report['rank_needed'][name]} to {report['r']}: "
              f"relative error {error:.3e}")
    return report


def run_check(argv: list[str]) -> int:
    """``aira-moe check CONFIG [key=value ...]``: the config as ``llamafactory-cli train`` reads it (OmegaConf merge
    of the file and the overrides), validated in this process."""
    if not argv or argv[0] in ("-h", "--help") or not argv[0].endswith((".yaml", ".yml", ".json")):
        print("usage: aira-moe check CONFIG.yaml [key=value ...]  (the arguments of llamafactory-cli train)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from omegaconf import OmegaConf

    from .integrations.llamafactory import check_train_config

    if not os.path.isfile(argv[0]):
        raise MissingFileError(f"no config file {argv[0]}")
    if argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            loaded = OmegaConf.create(json.load(handle))
    else:
        loaded = OmegaConf.load(argv[0])
    args = OmegaConf.to_container(OmegaConf.merge(loaded, OmegaConf.from_cli(argv[1:])))
    summary = check_train_config(args)
    print(f"[aira-moe check] {argv[0]}: ok ({summary})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_command(argv)
    except UserError as error:  # the one place an aira-moe command turns a user error into its line and exit code
        return report(error, f"aira-moe {argv[0]}: ")


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: aira-moe {check,eval,export-lora,tiny,demo} ...\n"
              "  check        validate a llamafactory-cli train config (+ key=value overrides) before launching it\n"
              "  eval         score a model/adapter on gsm8k, fineval, mmlu_law or mmlu_medicine (aira-moe eval --help)\n"
              "  export-lora  write an aira_moe adapter as a standard LoRA adapter for vLLM / SGLang serving\n"
              "  tiny         build the tiny default model, tokenizer and data (aira-moe tiny --output_dir DIR)\n"
              "  demo         train the tiny default with every technique and evaluate it (aira-moe demo --output_dir DIR)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "eval":
        from .evaluation import evaluate
        from .evaluation.prompts import select_shots
        from .evaluation.tasks import load_task

        args = parse_eval_args(rest)
        args.validate()  # user errors (bad values, missing files) before the model is loaded
        subjects = load_task(args.task, args.task_dir)
        for subject in subjects:  # an n_shot larger than a dev split is refused by the draw itself
            select_shots(subject, args.n_shot, args.seed)
        evaluate(args, subjects=subjects)
        return 0
    if command == "check":
        return run_check(rest)
    if command == "export-lora":
        run_export_lora(rest)
        return 0
    if command == "tiny":
        parser = argparse.ArgumentParser(prog="aira-moe tiny")
        parser.add_argument("--output_dir", required=True)
        parser.add_argument("--num_layers", type=int, default=2)
        parser.add_argument("--shell", action="store_true", help="print KEY=VALUE lines for a shell `eval`")
        args = parser.parse_args(rest)
        from .tiny import build_tiny_assets

        paths = build_tiny_assets(args.output_dir, num_layers=args.num_layers)
        if args.shell:
            print("\n".join(f"TINY_{key.upper()}={shlex.quote(value)}" for key, value in paths.items()))
        else:
            print(json.dumps(paths, indent=2))
        return 0
    if command == "demo":
        parser = argparse.ArgumentParser(prog="aira-moe demo")
        parser.add_argument("--output_dir", default="outputs/demo")
        parser.add_argument("--overwrite", action="store_true")
        args = parser.parse_args(rest)
        train_dir, assets = prepare_demo(args.output_dir, args.overwrite)  # user errors before anything is touched
        run_demo(train_dir, assets)
        return 0
    raise SystemExit(f"aira-moe: unknown command {command!r} (check, eval, export-lora, tiny, demo)")


if __name__ == "__main__":
    sys.exit(main())
