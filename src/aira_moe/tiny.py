"""The bundled tiny default: a random Llama, a locally trained BPE tokenizer and synthetic arithmetic multiple-choice
data, all built in code (no network, no hub), for the README demo, ``TINY=1`` recipes and the tests."""

from __future__ import annotations

import csv
import json
import os
import random

from .evaluation.prompts import format_question
from .evaluation.tasks import LETTERS, Question

TINY_DATASET = "tiny_arith"


def arithmetic_items(count: int, seed: int) -> list[dict]:
    """Multiple-choice sums: question, A-D options (one correct), answer letter."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        correct = a + b
        wrong = rng.sample([correct + d for d in (-3, -2, -1, 1, 2, 3, 10)], 3)
        options = wrong + [correct]
        rng.shuffle(options)
        items.append({
            "question": f"What is {a} + {b}?",
            **{letter: str(value) for letter, value in zip(LETTERS, options)},
            "answer": LETTERS[options.index(correct)],
        })
    return items


def mc_prompt(item: dict) -> str:
    """The evaluator's question format, so training prompts match what ``aira-moe eval`` scores."""
    return format_question(Question(item["question"], tuple(item[letter] for letter in LETTERS), item["answer"]))


def build_tokenizer(corpus: list[str], output_dir: str, vocab_size: int = 400):
    """Byte-level BPE trained on ``corpus`` (so any text, templates included, tokenises), saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(output_dir)
    return fast


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 512):
    """LlamaConfig of the tiny default: 4 heads, 2 KV heads, MLP width 2 * hidden, untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def build_model(output_dir: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM (fp32) saved with save_pretrained; ids 0/1/2 are pad/bos/eos as in the tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size, hidden_size, num_layers)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    model = LlamaForCausalLM(config)
    model.save_pretrained(output_dir)
    return model


TINY_MMLU_SUBJECTS = ("professional_law", "jurisprudence", "international_law", "clinical_knowledge", "college_medicine",
                      "professional_medicine", "medical_genetics", "anatomy")


def _write_csv(path: str, rows: list[dict], header: bool, encoding: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["id", "question", *LETTERS, "answer"])
        for index, item in enumerate(rows):
            writer.writerow(([index] if header else []) + [item["question"], *(item[letter] for letter in LETTERS), item["answer"]])


def write_task_files(root: str, items: list[dict], dev_items: list[dict]) -> None:
    """The synthetic items in every layout the evaluator reads (so each recipe's eval block runs on the tiny default):
    gsm8k/{test,dev}.csv (header), fineval/arithmetic.csv + fineval/dev/arithmetic.csv (UTF-8 BOM, header),
    mmlu/{test,dev}/<subject>_{test,dev}.csv (no header) for the law and medicine subjects."""
    _write_csv(os.path.join(root, "gsm8k", "test.csv"), items, True, "utf-8")
    _write_csv(os.path.join(root, "gsm8k", "dev.csv"), dev_items, True, "utf-8")
    _write_csv(os.path.join(root, "fineval", "arithmetic.csv"), items, True, "utf-8-sig")
    _write_csv(os.path.join(root, "fineval", "dev", "arithmetic.csv"), dev_items, True, "utf-8-sig")
    for subject in TINY_MMLU_SUBJECTS:
        _write_csv(os.path.join(root, "mmlu", "test", f"{subject}_test.csv"), items, False, "utf-8")
        _write_csv(os.path.join(root, "mmlu", "dev", f"{subject}_dev.csv"), dev_items, False, "utf-8")


def build_tiny_assets(output_dir: str, num_train: int = 256, num_test: int = 64, num_layers: int = 2, seed: int = 0) -> dict:
    """Write model/, data/ (dataset_info.json + tiny_arith.json, Alpaca format) and eval/ under ``output_dir``.
    Returns their paths. Idempotent: an existing complete set is reused."""
    paths = {
        "model": os.path.join(output_dir, "model"),
        "dataset_dir": os.path.join(output_dir, "data"),
        "task_dir": os.path.join(output_dir, "eval"),
        "dataset": TINY_DATASET,
    }
    marker = os.path.join(output_dir, "tiny_assets.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == paths:
                return paths
    train = arithmetic_items(num_train, seed)
    test = arithmetic_items(num_test, seed + 1)
    dev = arithmetic_items(5, seed + 2)
    rows = [{"instruction": mc_prompt(item), "input": "", "output": item["answer"]} for item in train]
    os.makedirs(paths["dataset_dir"], exist_ok=True)
    with open(os.path.join(paths["dataset_dir"], f"{TINY_DATASET}.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    with open(os.path.join(paths["dataset_dir"], "dataset_info.json"), "w", encoding="utf-8") as handle:
        json.dump({TINY_DATASET: {"file_name": f"{TINY_DATASET}.json"}}, handle, indent=2)
    write_task_files(paths["task_dir"], test, dev)
    corpus = [mc_prompt(item) + " " + item["answer"] for item in train + test] + [
        "Human: Assistant: system user assistant ### Instruction: Response: The following are multiple choice questions"
    ]
    tokenizer = build_tokenizer(corpus, paths["model"])
    build_model(paths["model"], vocab_size=len(tokenizer), num_layers=num_layers, seed=seed)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(paths, handle)
    return paths
