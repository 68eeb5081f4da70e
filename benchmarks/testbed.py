"""A pretrained-like testbed for the quality benchmark, built in code from ../shared/data/train (no hub).

Two bases, cached under ``outputs/testbed/`` (not committed; rebuilt when missing or when the build settings change):

* ``pretrained``: a small Llama (hidden 128, 4 layers, byte-level BPE 2,048) pretrained from scratch as a language
  model on the *pretrain* share of GSM8K, FinEval-en and GenMedGPT-5k. At this scale (minutes of CPU) it does not grow
  the outlier channels that real LLMs carry; the activation statistics written next to it say so.
* ``outliers``: the same network with LLM-like outlier channels planted by an exact, function-preserving
  re-parametrisation (the reverse of SmoothQuant's migration): a few channels of a projection's input are multiplied
  by k and the matching weight columns divided by k, so the model computes the same function (checked on build) but
  its projection inputs are heavy-tailed, as in real LLMs (max/median channel |x| of 10-100x, kurtosis >> 3), with
  some layers heavier than others.

Every dataset is split once, by a fixed seed, into disjoint shares: pretrain (base only), train (fine-tuning), val
(learning-rate choice) and test (reported). Fine-tuning examples use an instruction template the base never saw.

    python benchmarks/testbed.py                   # build (or reuse) both bases and print their activation statistics
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "train")
DEFAULT_CACHE = os.path.join(ROOT, "outputs", "testbed")
TASKS = {"medicine": "GenMedGPT-5k.json", "math": "gsm8k_train.json", "finance": "fineval_train-en.json"}
SHARES = {"pretrain": 0.5, "train": 0.35, "val": 0.075, "test": 0.075}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# settings that define a build: a change rebuilds the cache
BUILD = dict(vocab=2048, hidden=128, layers=4, intermediate=256, heads=4, kv_heads=2, seq=128, batch=32,
             pretrain_steps=1500, lr=3e-3, split_seed=1234)
# planted outliers: layer -> (channels per projection input, factor k). Real LLMs: a handful of channels 10-100x the
# median, heavier in some layers than others; layer 0 is left clean.
PLANT = {1: (2, 40.0), 2: (2, 8.0), 3: (3, 20.0)}


def template(row: dict) -> str:
    """The fine-tuning format (Alpaca-style); the base was pretrained on plain text without it."""
    prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    return f"### Instruction:\n{prompt}\n\n### Response:\n{row['output']}"


def plain(row: dict) -> str:
    return "\n".join(filter(None, (row.get("instruction"), row.get("input"), row.get("output"))))


def split_rows(rows: list, seed: int) -> dict[str, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for index, (name, share) in enumerate(SHARES.items()):
        end = len(rows) if index == len(SHARES) - 1 else start + round(share * len(rows))
        parts[name] = [rows[i] for i in order[start:end]]
        start = end
    return parts


def pack(texts: list[str], tokenizer, seq: int) -> torch.Tensor:
    """Tokenise, join with EOS and cut into (N, seq) chunks (the last partial chunk is dropped)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text) + [tokenizer.eos_token_id])
    usable = len(ids) // seq * seq
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq)


def llama_config(vocab: int, settings: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=settings["hidden"], intermediate_size=settings["intermediate"],
                       num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
                       num_key_value_heads=settings["kv_heads"], max_position_embeddings=settings["seq"],
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ------------------------------------------------------------------------------------------------ activation stats

def activation_stats(model, batches: torch.Tensor) -> list[dict]:
    """Per decoder layer and projection input (attn = q/k/v input, o = o_proj input, mlp = gate/up input,
    down = down_proj input): max/median of the per-channel mean |x|, and the kurtosis of all entries (normal = 3)."""
    inputs = {"attn": "self_attn.q_proj", "o": "self_attn.o_proj", "mlp": "mlp.gate_proj", "down": "mlp.down_proj"}
    sums: dict[tuple, dict] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for kind, path in inputs.items():
            module = layer.get_submodule(path)
            record = sums.setdefault((index, kind), {"abs": 0.0, "m2": 0.0, "m4": 0.0, "m1": 0.0, "n": 0})

            def hook(mod, args, out, record=record):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, channels)
                record["abs"] = record["abs"] + x.abs().sum(0)
                record["m1"] += x.sum().item()
                record["m2"] += x.square().sum().item()
                record["m4"] += x.pow(4).sum().item()
                record["n"] += x.numel()
                record["tokens"] = record.get("tokens", 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for batch in batches.split(16):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    rows = []
    for (index, kind), r in sums.items():
        channel = r["abs"] / r["tokens"]
        mean = r["m1"] / r["n"]
        var = r["m2"] / r["n"] - mean**2
        # fourth central moment from raw moments is unstable; entries are near zero-mean, use the raw-moment ratio
        kurt = (r["m4"] / r["n"]) / (r["m2"] / r["n"]) ** 2
        rows.append({"layer": index, "input": kind, "max_over_median": (channel.max() / channel.median()).item(),
                     "kurtosis": kurt, "std": math.sqrt(max(var, 0.0))})
    return rows


# ------------------------------------------------------------------------------------------------------- building

def load_splits(data_dir: str, seed: int) -> dict[str, dict[str, list]]:
    splits = {}
    for task, name in TASKS.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: the testbed reads ../shared/data/train (pass --data_dir)")
        with open(path, encoding="utf-8") as handle:
            splits[task] = split_rows(json.load(handle), seed)
    return splits


def pretrain(settings: dict, tokenizer, corpus: torch.Tensor, log_every: int = 250):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), settings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    steps, warmup = settings["pretrain_steps"], max(1, settings["pretrain_steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids = corpus[torch.randint(0, len(corpus), (settings["batch"],), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(f"  pretrain step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return model.eval()


def plant_outliers(model, plant: dict, seed: int = 0) -> dict:
    """Function-preserving outlier channels: input channel c of a projection group is multiplied by k where it is
    produced (an RMSNorm gain, or an output row of v_proj / up_proj) and the consuming weight columns divided by k."""
    gen = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for index, (count, factor) in plant.items():
            layer = model.model.layers[index]
            attn, mlp = layer.self_attn, layer.mlp
            groups = {  # producer (weight, rows are channels) -> consumers (columns are channels)
                "attn": (layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj]),
                "mlp": (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj]),
                "o": (attn.v_proj.weight, [attn.o_proj]),
                "down": (mlp.up_proj.weight, [mlp.down_proj]),
            }
            for kind, (producer, consumers) in groups.items():
                width = producer.shape[0]
                if kind == "o":  # o_proj's input channel = (head, dim); v's output row feeds every head sharing it
                    channels = torch.randperm(width, generator=gen)[:count]
                    heads = attn.config.num_attention_heads // attn.config.num_key_value_heads
                    head_dim = attn.head_dim
                    kv_head, dim = channels // head_dim, channels % head_dim
                    consumer_cols = torch.cat([(kv_head * heads + h) * head_dim + dim for h in range(heads)])
                else:
                    channels = torch.randperm(width, generator=gen)[:count]
                    consumer_cols = channels
                producer[channels] *= factor
                for consumer in consumers:
                    consumer.weight[:, consumer_cols] /= factor
                planted[f"{index}.{kind}"] = {"channels": channels.tolist(), "factor": factor}
    return planted


def build(cache_dir: str = DEFAULT_CACHE, data_dir: str = DEFAULT_DATA, settings: dict = BUILD, force: bool = False) -> dict:
    """Build (or reuse) both bases; returns {"dir", "settings", "bases": {name: model_dir}, "stats"}."""
    from aira_moe.tiny import build_tokenizer

    key = hashlib.sha256(json.dumps({"settings": settings, "plant": {str(k): v for k, v in PLANT.items()},
                                     "shares": SHARES, "version": 1}, sort_keys=True).encode()).hexdigest()[:12]
    directory = os.path.join(cache_dir, key)
    manifest_path = os.path.join(directory, "testbed.json")
    if os.path.isfile(manifest_path) and not force:
        with open(manifest_path, encoding="utf-8") as handle:
            return json.load(handle)
    start = time.perf_counter()
    print(f"building the testbed in {directory} (once; cached)", flush=True)
    splits = load_splits(data_dir, settings["split_seed"])
    pretrain_texts = [plain(row) for parts in splits.values() for row in parts["pretrain"]]
    tokenizer = build_tokenizer(pretrain_texts + [template({"instruction": "", "input": "", "output": ""})],
                                os.path.join(directory, "tokenizer"), settings["vocab"])
    corpus = pack(pretrain_texts, tokenizer, settings["seq"])
    tensors = {"pretrain": corpus}
    for task, parts in splits.items():
        for share in ("train", "val", "test"):
            tensors[f"{task}/{share}"] = pack([template(row) for row in parts[share]], tokenizer, settings["seq"])
    torch.save(tensors, os.path.join(directory, "tokens.pt"))
    model = pretrain(settings, tokenizer, corpus)
    probe = torch.cat([tensors[f"{task}/val"][:16] for task in TASKS])
    bases, stats = {}, {}
    with torch.no_grad():
        reference = model(input_ids=probe[:8]).logits
    stats["pretrained"] = activation_stats(model, probe)
    bases["pretrained"] = os.path.join(directory, "pretrained")
    model.save_pretrained(bases["pretrained"])
    planted = plant_outliers(model, PLANT)
    with torch.no_grad():
        after = model(input_ids=probe[:8]).logits
    rel = ((after - reference).norm() / reference.norm()).item()
    if rel > 1e-4:
        raise RuntimeError(f"planting outliers changed the function (rel {rel:.2e}); the re-parametrisation is wrong")
    stats["outliers"] = activation_stats(model, probe)
    bases["outliers"] = os.path.join(directory, "outliers")
    model.save_pretrained(bases["outliers"])
    manifest = {"dir": directory, "settings": settings, "bases": bases, "tokenizer": os.path.join(directory, "tokenizer"),
                "tokens": os.path.join(directory, "tokens.pt"), "stats": stats, "planted": planted,
                "plant_function_rel_change": rel, "build_seconds": time.perf_counter() - start,
                "split_sizes": {task: {s: len(p) for s, p in parts.items()} for task, parts in splits.items()},
                "chunks": {name: int(t.shape[0]) for name, t in tensors.items()}}
    with open(manifest_path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def format_stats(rows: list[dict]) -> str:
    lines = [f"{'layer':>5} {'input':>5} {'max/median |x|':>15} {'kurtosis':>9}"]
    for row in rows:
        lines.append(f"{row['layer']:>5} {row['input']:>5} {row['max_over_median']:>15.1f} {row['kurtosis']:>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE)
    parser.add_argument("--pretrain_steps", type=int, default=BUILD["pretrain_steps"])
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    args = parser.parse_args(argv)
    manifest = build(args.cache_dir, args.data_dir, {**BUILD, "pretrain_steps": args.pretrain_steps}, args.force)
    for name, rows in manifest["stats"].items():
        print(f"\n{name}: {manifest['bases'][name]}\n{format_stats(rows)}")
    return manifest


if __name__ == "__main__":
    main()
