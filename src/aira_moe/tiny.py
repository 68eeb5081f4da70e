"""The bundled tiny default: a random Llama (with planted outlier channels in its later layers), a locally trained BPE
tokenizer and synthetic multiple-choice colour questions, all built in code (no network, no hub), for the README demo,
``TINY=1`` recipes and the tests."""

from __future__ import annotations

import csv
import json
import os
import random

from .errors import UserError
from .evaluation.prompts import SYSTEM, format_question
from .evaluation.tasks import LETTERS, Question

TINY_DATASET = "tiny_colours"
TINY_SUBJECT = "colours"  # fineval/colours.csv: `aira-moe eval --task fineval` asks about "colours", as training did
# a synthetic fact table the adapter can learn in seconds: the answer is the thing's colour, the options are always
# the four colours in this order, so a frozen random base scores chance (~25 %) and a working adapter far above it
COLOURS = ("red", "green", "blue", "yellow")
THINGS = {
    "red": ("cherry", "ruby", "tomato", "strawberry", "fire truck", "ladybug", "brick", "radish", "cardinal",
            "lobster", "raspberry", "chili"),
    "green": ("leaf", "frog", "lime", "emerald", "cucumber", "grass", "pea", "kiwi", "lettuce", "cactus", "olive",
              "broccoli"),
    "blue": ("sky", "sapphire", "ocean", "blueberry", "whale", "denim", "bluebird", "iris", "lake", "glacier",
             "peacock", "jay"),
    "yellow": ("banana", "lemon", "sun", "corn", "canary", "butter", "daffodil", "taxi", "pineapple", "mustard",
               "sunflower", "egg yolk"),
}
TEMPLATES = ("What colour is the {thing}?", "Which colour does a {thing} have?", "The {thing} is usually which colour?")


def colour_items(count: int, seed: int) -> list[dict]:
    """Multiple-choice colour questions: question, A-D options (the four COLOURS), answer letter; balanced classes."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        colour = COLOURS[index % len(COLOURS)]
        thing = rng.choice(THINGS[colour])
        items.append({
            "question": rng.choice(TEMPLATES).format(thing=thing),
            **dict(zip(LETTERS, COLOURS)),
            "answer": LETTERS[COLOURS.index(colour)],
        })
    rng.shuffle(items)
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
        # 5x the usual 0.02: with 0.02 a random lm_head bounds every logit near +-1, so no adapter can learn anything
        initializer_range=0.1,
    )


def build_model(output_dir: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM (fp32) saved with save_pretrained; ids 0/1/2 are pad/bos/eos as in the tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size, hidden_size, num_layers)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    model = LlamaForCausalLM(config)
    plant_outlier_channels(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(output_dir)
    return model


def plant_outlier_channels(model, generator, factor: float = 8.0, channels: int = 2) -> None:
    """Give the later half of the layers a few massive-activation channels (norm gains x ``factor``), as real LLMs
    have, so that layer-wise allocation has something to find (a random init's layers all look alike)."""
    import torch

    layers = model.model.layers
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in layers[len(layers) // 2:]:
            picked = torch.randperm(hidden, generator=generator)[:channels]
            layer.input_layernorm.weight[picked] *= factor
            layer.post_attention_layernorm.weight[picked] *= factor


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
    gsm8k/{test,dev}.csv (header), fineval/colours.csv + fineval/dev/colours.csv (UTF-8 BOM, header),
    mmlu/{test,dev}/<subject>_{test,dev}.csv (no header) for the law and medicine subjects."""
    _write_csv(os.path.join(root, "gsm8k", "test.csv"), items, True, "utf-8")
    _write_csv(os.path.join(root, "gsm8k", "dev.csv"), dev_items, True, "utf-8")
    _write_csv(os.path.join(root, "fineval", f"{TINY_SUBJECT}.csv"), items, True, "utf-8-sig")
    _write_csv(os.path.join(root, "fineval", "dev", f"{TINY_SUBJECT}.csv"), dev_items, True, "utf-8-sig")
    for subject in TINY_MMLU_SUBJECTS:
        _write_csv(os.path.join(root, "mmlu", "test", f"{subject}_test.csv"), items, False, "utf-8")
        _write_csv(os.path.join(root, "mmlu", "dev", f"{subject}_dev.csv"), dev_items, False, "utf-8")


def build_tiny_assets(output_dir: str, num_train: int = 256, num_test: int = 64, num_layers: int = 2, seed: int = 0) -> dict:
    """Write model/, data/ (dataset_info.json + tiny_colours.json, Alpaca format) and eval/ under ``output_dir``.
    Returns their absolute paths (a config or adapter that records them works from any directory). An existing set
    built with the same settings is reused; one built with other settings is refused (never silently reused or
    overwritten)."""
    output_dir = os.path.abspath(output_dir)
    paths = {
        "model": os.path.join(output_dir, "model"),
        "dataset_dir": os.path.join(output_dir, "data"),
        "task_dir": os.path.join(output_dir, "eval"),
        "dataset": TINY_DATASET,
    }
    settings = {"task": TINY_DATASET, "num_train": num_train, "num_test": num_test, "num_layers": num_layers, "seed": seed}
    marker = os.path.join(output_dir, "tiny_assets.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            built = json.load(handle).get("settings")
        if built == settings:
            return paths
        raise UserError(
            f"{output_dir} holds tiny assets built with {built} (here: {settings}); "
            "remove that directory or choose another --output_dir"
        )
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise UserError(f"{output_dir} exists and is not a tiny-assets directory; choose another --output_dir")
    train = colour_items(num_train, seed)
    test = colour_items(num_test, seed + 1)
    dev = colour_items(5, seed + 2)
    # the evaluator's system line for the fineval subject, so training prompts are token-for-token what it scores
    system = SYSTEM["en"].format(title=TINY_SUBJECT)
    rows = [{"instruction": mc_prompt(item), "input": "", "output": item["answer"], "system": system} for item in train]
    os.makedirs(paths["dataset_dir"], exist_ok=True)
    with open(os.path.join(paths["dataset_dir"], f"{TINY_DATASET}.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    with open(os.path.join(paths["dataset_dir"], "dataset_info.json"), "w", encoding="utf-8") as handle:
        json.dump({TINY_DATASET: {"file_name": f"{TINY_DATASET}.json", "columns": {
            "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}}, handle, indent=2)
    write_task_files(paths["task_dir"], test, dev)
    corpus = [mc_prompt(item) + " " + item["answer"] for item in train + test] + [
        "Human: Assistant: system user assistant ### Instruction: Response: The following are multiple choice questions"
    ]
    tokenizer = build_tokenizer(corpus, paths["model"])
    build_model(paths["model"], vocab_size=len(tokenizer), num_layers=num_layers, seed=seed)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({**paths, "settings": settings}, handle, indent=2)
    return paths
