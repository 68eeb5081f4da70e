"""Method quality on CPU, no downloads, mean +- std over seeds.

Part ``teacher`` (synthetic): a random tiny Llama in which two layers carry activation outliers (large RMSNorm gains on
a few channels, as in real LLMs); the teacher adds a low-rank perturbation to exactly those layers. Students start from
the base and fit the teacher's logits (KL) with the same number of trainable parameters: peft LoRA at uniform rank,
aira_moe at uniform rank, and aira_moe with layer-wise allocation (LOD importance). It checks the mechanism: when the
layers that need the update are the outlier layers, allocation by LOD should put the rank there.

Part ``text`` (real text): a tiny Llama is warmed up as a language model on GSM8K text, then fine-tuned on GenMedGPT-5k
dialogues with LoRA, CoLA-basic (num_A=2, num_B=3) and aira_moe-full (all techniques) at (near-)equal trainable
parameters; final training loss and held-out loss are reported. Reads ../shared/data/train (benchmarks only).

    python benchmarks/quality.py --part all --seeds 3 --out benchmarks/results/quality_cpu.json
    python benchmarks/quality.py --part teacher --seeds 1 --steps 20     # reduced (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import math
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
from aira_moe import AiraMoeConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


def tiny_llama(hidden, layers, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def count(model):
    return sum(p.numel() for p in trainable(model))


def summary(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


# ----------------------------------------------------------------------------------------------------------- teacher

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
        optimizer = torch.optim.Adam(trainable(model), lr=5e-3)
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
        return {"held_out_kl": kl, "params": count(model), "layer_ranks": per_layer}

    common = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    results = {
        "lora_uniform": fit(LoraConfig(**common), False),
        "aira_uniform": fit(AiraMoeConfig(**common), False),
    }
    # same budget, allocation by importance: LOD at the reference threshold M=2, at M=5, and mean |activation|
    for label, theta in (("aira_lod_M2", dict(theta_type="lod", lod_threshold_M=2.0)),
                         ("aira_lod_M5", dict(theta_type="lod", lod_threshold_M=5.0)),
                         ("aira_act", dict(theta_type="act"))):
        results[label] = fit(AiraMoeConfig(**common, use_layer_wise_rank=True, rank_budget="auto", min_rank=1,
                                           max_rank=16, objective_function="log", **theta), True)
    return results


# -------------------------------------------------------------------------------------------------------------- text

def load_text_data(data_dir: str, vocab: int, seq: int):
    from aira_moe.tiny import build_tokenizer

    def rows(name):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: part 'text' reads ../shared/data/train (use --data_dir)")
        with open(path, encoding="utf-8") as handle:
            return [" ".join(filter(None, (r.get("instruction"), r.get("input"), r.get("output")))) for r in json.load(handle)]

    warm, target = rows("gsm8k_train.json"), rows("GenMedGPT-5k.json")
    tokenizer = build_tokenizer(warm[:3000] + target[:3000], os.path.join(os.environ.get("TMPDIR", "/tmp"), "aira_quality_tok"), vocab)

    def chunks(texts):
        ids = []
        for text in texts:
            ids.extend(tokenizer.encode(text) + [tokenizer.eos_token_id])
        usable = len(ids) // seq * seq
        return torch.tensor(ids[:usable]).view(-1, seq)

    target_chunks = chunks(target)
    split = int(0.9 * len(target_chunks))
    return len(tokenizer), chunks(warm), target_chunks[:split], target_chunks[split:]


LAYER_WISE = dict(use_layer_wise_rank=True, rank_budget="auto", min_rank=1, max_rank=8)
AWSVD = dict(use_awsvd_init=True)
WEIGHTING = dict(use_activation_aware=True, activation_aware_mode="inps")
# aira_moe variants of part 'text' (all CoLA 2x3, r=4): the full method, and one technique at a time (part 'ablation')
TEXT_TECHNIQUES = {
    "cola_basic": {},
    "aira_full": {**LAYER_WISE, **AWSVD, **WEIGHTING},
    "cola_layer_wise": LAYER_WISE,
    "cola_awsvd": AWSVD,
    "cola_weighting": WEIGHTING,
}


def text_run(method: str, seed: int, warm_state, vocab, train, held_out, steps, batch, hidden, layers, log_every):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(hidden, layers, vocab, 0)
    model.load_state_dict(warm_state)
    if method == "lora":
        config = LoraConfig(r=10, lora_alpha=20, target_modules=TARGETS)
    else:
        config = AiraMoeConfig(r=4, lora_alpha=8, num_A=2, num_B=3, target_modules=TARGETS, awsvd_collect_steps=8,
                               **TEXT_TECHNIQUES[method])
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    batches = [train[order[(i * batch) % len(train):][:batch]] for i in range(steps)]
    if getattr(config, "needs_calibration", False):
        model.calibrate([{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches[:8]])
    optimizer = torch.optim.AdamW(trainable(model), lr=2e-3)
    curve, held = [], []

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            value = statistics.mean(model(input_ids=b, labels=b).loss.item() for b in held_out.split(batch))
        model.train()
        return value

    model.train()
    for step, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            held.append((step + 1, held_out_loss()))
    tail = curve[-max(1, steps // 10):]
    return {"final_train_loss": statistics.mean(tail), "held_out_loss": held[-1][1], "params": count(model),
            "curve": curve, "held_out_curve": held}


def text_benchmark(seeds, steps, data_dir, warm_steps, methods=("lora", "cola_basic", "aira_full"), batch=16, seq=128, hidden=128, layers=4, vocab=2000):
    vocab, warm, train, held_out = load_text_data(data_dir, vocab, seq)
    held_out = held_out[: 8 * batch]
    model = tiny_llama(hidden, layers, vocab, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(warm_steps):  # language-model warm-up on GSM8K text (full fine-tuning)
        ids = warm[torch.randint(0, len(warm), (batch,), generator=gen)]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    warm_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {}
    for method in methods:
        runs = [text_run(method, s, warm_state, vocab, train, held_out, steps, batch, hidden, layers, max(1, steps // 6)) for s in seeds]
        results[method] = {
            "final_train_loss": summary([r["final_train_loss"] for r in runs]),
            "held_out_loss": summary([r["held_out_loss"] for r in runs]),
            "params": runs[0]["params"],
            "curves": [r["curve"] for r in runs],
            "held_out_curves": [r["held_out_curve"] for r in runs],
        }
        print(f"text {method}: train {results[method]['final_train_loss']['mean']:.4f} +- {results[method]['final_train_loss']['std']:.4f}, "
              f"held-out {results[method]['held_out_loss']['mean']:.4f} +- {results[method]['held_out_loss']['std']:.4f}, "
              f"params {results[method]['params']:,}", flush=True)
    return results


def plot_curves(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, row in results.items():
        curves = torch.tensor(row["curves"])  # (seeds, steps)
        mean = curves.mean(0)
        window = max(1, len(mean) // 30)
        smooth = torch.nn.functional.avg_pool1d(mean.view(1, 1, -1), window, stride=1).view(-1)
        ax.plot(range(window, len(mean) + 1), smooth.tolist(), label=f"{method} (train)")
        held = row["held_out_curves"][0]
        held_mean = [statistics.mean(c[i][1] for c in row["held_out_curves"]) for i in range(len(held))]
        ax.plot([s for s, _ in held], held_mean, marker="o", linestyle="--", label=f"{method} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("GenMedGPT-5k fine-tuning of a tiny GSM8K-warmed Llama (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["teacher", "text", "ablation", "all"], default="all",
                        help="ablation: part text with CoLA + one technique at a time")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--warm_steps", type=int, default=400, help="LM warm-up steps (part text)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--out", default="", help="JSON results; the loss-curve PNG is written next to it")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = list(range(args.seeds))
    result = {"device": device_name(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "seeds": seeds, "steps": args.steps}
    start = time.perf_counter()
    if args.part in ("teacher", "all"):
        runs = [teacher_student(seed, args.steps) for seed in seeds]
        result["teacher"] = {
            method: {"held_out_kl": summary([r[method]["held_out_kl"] for r in runs]), "params": runs[0][method]["params"],
                     "layer_ranks": [r[method]["layer_ranks"] for r in runs]}
            for method in runs[0]
        }
        for method, row in result["teacher"].items():
            print(f"teacher {method}: KL {row['held_out_kl']['mean']:.4f} +- {row['held_out_kl']['std']:.4f}, "
                  f"params {row['params']:,}, ranks {row['layer_ranks'][0]}", flush=True)
    if args.part in ("text", "all"):
        result["text"] = text_benchmark(seeds, args.steps, args.data_dir, args.warm_steps)
    if args.part == "ablation":
        result["text"] = text_benchmark(seeds, args.steps, args.data_dir, args.warm_steps,
                                        methods=("cola_basic", "cola_layer_wise", "cola_awsvd", "cola_weighting", "aira_full"))
    result["seconds"] = time.perf_counter() - start
    write_json(result, args.out)
    if args.out and "text" in result:
        plot_curves(result["text"], os.path.splitext(args.out)[0] + "_curves.png")
    return result


if __name__ == "__main__":
    main()
