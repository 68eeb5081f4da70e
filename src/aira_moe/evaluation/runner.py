"""``aira-moe eval``: the multiple-choice evaluator that replaces the removed ``llamafactory-cli eval``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..adapter_paths import require_adapter_dirs, token_dependent_adapters
from ..errors import UserError
from .prompts import build_messages, select_shots
from .scoring import choice_token_ids, fit_prompt, score_choices
from .tasks import LETTERS, TASKS, load_task, task_exists

ADAPTER_TYPES = ("lora", "aira_moe", "oft")
FINETUNING_TYPES = ADAPTER_TYPES + ("full", "freeze")


@dataclass
class EvalArguments:
    """The arguments of the old ``llamafactory-cli eval``, plus overwrite/dtype/device."""

    model_name_or_path: str = field(metadata={"help": "Base (or merged) model path."})
    task: str = field(metadata={"help": f"One of {sorted(TASKS)}, or any <task_dir>/<task> with a mapping.json "
                                        "(the old llamafactory-cli eval layout: mmlu, cmmlu, ceval)."})
    template: str = field(default="default", metadata={"help": "LLaMA-Factory chat template used to build prompts."})
    adapter_name_or_path: Optional[str] = field(default=None, metadata={"help": "Adapter path(s), comma-separated."})
    finetuning_type: str = field(default="lora", metadata={"help": f"One of {FINETUNING_TYPES}."})
    task_dir: str = field(default="evaluation", metadata={"help": "Directory with the task files."})
    n_shot: int = field(
        default=0,
        metadata={"help": "Number of dev examples shown before each question. Default 0: the bare question, as "
                          "SFT data presents it and as `aira-moe demo` scores it, so the number matches the training "
                          "run's; pass 5 for the MMLU-style k-shot protocol (needs a dev split of that size)."},
    )
    lang: str = field(default="en", metadata={"help": "Prompt language: en or zh."})
    batch_size: int = field(default=4, metadata={"help": "Questions per forward pass."})
    seed: int = field(default=42, metadata={"help": "Seed of the k-shot example draw."})
    save_dir: Optional[str] = field(
        default=None, metadata={"help": "Where results.json is written; default: outputs/eval/<task>-<date>-<time>."}
    )
    overwrite_save_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})
    base_save_dir: Optional[str] = field(
        default=None,
        metadata={"help": "With an adapter: score the base model alone first, from the same load, and write its "
                          "results.json here (before -> after in one process, as the recipes' eval blocks do)."},
    )
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:i]."})
    max_questions: Optional[int] = field(
        default=None,
        metadata={"help": "Score only the first N questions of each subject (a quick check, e.g. on a CPU); default: "
                          "every question."},
    )
    quantization_bit: Optional[int] = field(
        default=None,
        metadata={"help": "Load the base in 4 or 8 bits with bitsandbytes (nf4 + double quantisation, as "
                          "LLaMA-Factory); the adapter is then kept unmerged, so only one adapter is accepted."},
    )

    def validate(self) -> None:
        if not task_exists(self.task, self.task_dir):
            raise UserError(f"`task` must be one of {sorted(TASKS)} or a directory <task_dir>/<task> with a "
                            f"mapping.json; got {self.task!r} with task_dir {self.task_dir!r}")
        if self.finetuning_type not in FINETUNING_TYPES:
            raise UserError(f"`finetuning_type` must be one of {FINETUNING_TYPES}, got {self.finetuning_type!r}")
        if self.adapter_name_or_path and self.finetuning_type not in ADAPTER_TYPES:
            raise UserError(f"`adapter_name_or_path` needs an adapter `finetuning_type` {ADAPTER_TYPES}, got {self.finetuning_type!r}")
        require_adapter_dirs(self.adapter_name_or_path)
        if self.n_shot < 0:
            raise UserError(f"`n_shot` must be >= 0, got {self.n_shot}")
        if self.max_questions is not None and self.max_questions < 1:
            raise UserError(f"`max_questions` must be >= 1, got {self.max_questions}")
        if self.batch_size < 1:
            raise UserError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.lang not in ("en", "zh"):
            raise UserError(f"`lang` must be 'en' or 'zh', got {self.lang!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"`dtype` must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"`quantization_bit` must be 4 or 8, got {self.quantization_bit}")
        adapters = _adapter_paths(self.adapter_name_or_path)
        if self.quantization_bit and len(adapters) > 1:
            raise UserError(f"`adapter_name_or_path` lists {len(adapters)} adapters, "
                            f"but a {self.quantization_bit}-bit base keeps its adapter unmerged: pass one")
        routed = token_dependent_adapters(adapters)
        if routed and routed != adapters[-1:]:
            raise UserError(f"`adapter_name_or_path`: {routed[0]} is a routed adapter, whose update depends on the "
                            "token, so it is kept unmerged: list it last (the adapters before it are merged)")
        if self.base_save_dir and not adapters:
            raise UserError(f"`base_save_dir` {self.base_save_dir!r} scores the base model beside an adapter, but "
                            "`adapter_name_or_path` is empty: pass an adapter, or score the base with `save_dir` alone")
        if self.base_save_dir and self.save_dir and os.path.abspath(self.base_save_dir) == os.path.abspath(self.save_dir):
            raise UserError(f"`base_save_dir` and `save_dir` are the same directory {self.save_dir!r}: the base model's "
                            "results would overwrite the adapter's")
        for key in ("save_dir", "base_save_dir"):
            folder = getattr(self, key)
            if folder and os.path.exists(os.path.join(folder, "results.json")) and not self.overwrite_save_dir:
                raise UserError(f"`{key}` {folder} already holds results.json; pass --overwrite_save_dir or choose "
                                f"another --{key}")


def _adapter_paths(paths: Optional[str]) -> list[str]:
    return [p.strip() for p in (paths or "").split(",") if p.strip()]


def _quantization_config(bits: int, compute_dtype):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model_and_tokenizer(args: EvalArguments):
    """Base model + adapters as LLaMA-Factory loads them for inference (see ``attach_adapters``), and a left-padding
    tokenizer."""
    model, tokenizer, device = load_base_and_tokenizer(args)
    return attach_adapters(model, args), tokenizer, device


def load_base_and_tokenizer(args: EvalArguments):
    """The base model alone, on its device and in eval mode (4/8-bit with ``quantization_bit``), and a left-padding
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.padding_side = "left"
    if args.quantization_bit:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, dtype=dtype, device_map={"": device},
            quantization_config=_quantization_config(args.quantization_bit, dtype))
        return model.eval(), tokenizer, device
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    return model.to(device).eval(), tokenizer, device


def attach_adapters(model, args: EvalArguments):
    """``args``' adapters on a base from ``load_base_and_tokenizer``: merged in order into a float base; one adapter
    kept unmerged on a quantised base, and a routed one, listed last, kept unmerged."""
    import aira_moe  # noqa: F401  (registers the aira_moe peft type)
    from peft import PeftModel

    paths = _adapter_paths(args.adapter_name_or_path)
    routed = token_dependent_adapters(paths)  # validate() put it last: no fixed weight equals its update
    if args.quantization_bit:  # validate() allows one adapter, kept unmerged
        return (PeftModel.from_pretrained(model, paths[0]) if paths else model).eval()
    device = next(model.parameters()).device
    for path in paths:
        model = PeftModel.from_pretrained(model, path)
        if path not in routed:
            model = model.merge_and_unload()
    return model.to(device).eval()  # peft may load adapter weights elsewhere (its own device guess)


def template_prompt_encoder(tokenizer, template_name: str):
    """(messages, system) -> prompt token ids, encoded with LLaMA-Factory's chat template ``template_name`` exactly as
    training encoded prompts (the last assistant turn is the answer and is not part of the prompt)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template_name))

    def encode(messages: list[dict], system: Optional[str]) -> list[int]:
        prompt_ids, _ = template.encode_oneturn(tokenizer, messages, system)
        return prompt_ids

    return encode


def question_prompt(encode, subject, question, shots: list, lang: str, limit: int) -> tuple[list[int], bool]:
    """Prompt ids of one question within ``limit`` tokens, and whether it had to be shortened (see fit_prompt)."""

    def encode_with(kept: int) -> list[int]:
        system, messages = build_messages(subject, question, shots[len(shots) - kept:] if kept else [], lang)
        return encode(messages, system)

    return fit_prompt(encode_with, len(shots), limit)


def context_length(model, tokenizer) -> int:
    """Positions the model was built for (config.max_position_embeddings), or the tokenizer's model_max_length when
    the config has none; a prompt longer than this is shortened."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is None:
        positions = getattr(tokenizer, "model_max_length", None)
    if positions is None or positions > 10**7:  # tokenizers without a limit report ~1e30
        raise ValueError("cannot tell the model's context length (no max_position_embeddings or model_max_length)")
    return int(positions)


def format_table(results: dict) -> str:
    lines = [f"{'subject':<48} {'n':>6} {'accuracy':>9}"]
    for name, row in results["per_subject"].items():
        lines.append(f"{name:<48} {row['num_questions']:>6} {100 * row['accuracy']:>8.2f}%")
    lines.append(f"{'AVERAGE (' + results['task'] + ')':<48} {results['num_questions']:>6} {100 * results['accuracy']:>8.2f}%")
    return "\n".join(lines)


def evaluate(args: EvalArguments, model=None, tokenizer=None, encode=None, device=None, quiet: bool = False,
             subjects=None) -> dict:
    """Score every question of the task; writes <save_dir>/results.json (a dated directory under outputs/eval by
    default) and prints its path and a table (not with ``quiet``). ``model``, ``tokenizer``
    and ``encode`` (messages, system -> prompt ids) may be given directly (tests); ``subjects`` when the caller has
    already loaded the task (``load_task``), so its files are read once."""
    args.validate()
    if subjects is None:
        subjects = load_task(args.task, args.task_dir)  # file errors before the model is loaded
    if args.max_questions is not None:
        subjects = [replace(subject, test=subject.test[:args.max_questions]) for subject in subjects]
    if args.save_dir is None:
        args.save_dir = os.path.join("outputs", "eval", f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    shots = {subject.name: select_shots(subject, args.n_shot, args.seed) for subject in subjects}
    if model is None and args.base_save_dir:  # before -> after from one load: the base alone, then its adapters
        model, tokenizer, device = load_base_and_tokenizer(args)
        encode = encode or template_prompt_encoder(tokenizer, args.template)  # built once for both scorings
        base_args = replace(args, adapter_name_or_path=None, save_dir=args.base_save_dir, base_save_dir=None)
        evaluate(base_args, model, tokenizer, encode, device, quiet, subjects)
        model = attach_adapters(model, args)
    elif model is None:
        model, tokenizer, device = load_model_and_tokenizer(args)
    encode = encode or template_prompt_encoder(tokenizer, args.template)
    choice_ids = choice_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit = context_length(model, tokenizer)
    start = time.perf_counter()
    total = sum(len(subject.test) for subject in subjects)
    per_subject, predictions, shortened = {}, [], 0
    with tqdm(total=total, desc=f"eval {args.task}", unit="q", disable=quiet) as progress:
        for subject in subjects:
            prompts = []
            for question in subject.test:
                ids, was_shortened = question_prompt(encode, subject, question, shots[subject.name], args.lang, limit)
                prompts.append(ids)
                shortened += was_shortened
            predicted, logprobs = score_choices(model, prompts, choice_ids, args.batch_size, pad_id, device,
                                                progress.update)
            correct = sum(p == q.answer for p, q in zip(predicted, subject.test))
            # -log p(right letter) under the full next-token distribution: the answer loss SFT trains down
            answer_nll = [-row[LETTERS.index(q.answer)] for row, q in zip(logprobs, subject.test)]
            per_subject[subject.name] = {
                "accuracy": correct / len(subject.test),
                "answer_loss": sum(answer_nll) / len(answer_nll),
                "num_questions": len(subject.test),
                "correct": correct,
            }
            predictions.extend(
                {"id": index, "subject": subject.name, "gold": question.answer, "predicted": letter,
                 "logprobs": dict(zip(LETTERS, row))}
                for index, (question, letter, row) in enumerate(zip(subject.test, predicted, logprobs))
            )
    correct = sum(row["correct"] for row in per_subject.values())
    results = {
        "task": args.task,
        "accuracy": correct / total,
        "answer_loss": sum(row["answer_loss"] * row["num_questions"] for row in per_subject.values()) / total,
        "num_questions": total,
        "correct": correct,
        "per_subject": per_subject,
        "prompts_shortened": shortened,
        "context_length": limit,
        "seconds": time.perf_counter() - start,
        "args": asdict(args),
    }
    os.makedirs(args.save_dir, exist_ok=True)
    path = os.path.join(args.save_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(args.save_dir, "predictions.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in predictions)
    if not quiet:
        print(format_table(results))
        if shortened:
            print(f"[aira-moe eval] {shortened} of {total} prompts were longer than the model's {limit} positions: "
                  "few-shot examples dropped first, then cut from the left")
        print(f"[aira-moe eval] results: {path} (per question: predictions.jsonl)")
    return results
