"""One training step (forward + backward + AdamW) of peft LoRA vs aira_moe variants on Llama-shaped decoder layers.

Full size (CUDA): Llama-3.1-8B layer shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads), all 7 projections,
bf16 base, batch 4 x 1024. Reduced size (CPU): the same structure scaled down. Variants are interleaved round-robin
and repeated, and every ratio is to peft LoRA measured in the same run.

    python benchmarks/step_time.py --size full --layers 4 --rank 16          # on a GPU
    python benchmarks/step_time.py --size reduced --repeats 7 --out benchmarks/results/step_time_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import device_name, write_json  # noqa: E402

import aira_moe  # noqa: E402,F401
from aira_moe import AiraMoeConfig, AiraMoeModel  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "full": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, batch=4, seq=1024),
    # a ~1B Llama's layers (TinyLlama shapes), as benchmarks/train_e2e.py trains through llamafactory-cli
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, batch=4, seq=1024),
    "reduced": dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2, batch=2, seq=128),
}


def build_base(size: str, layers: int, dtype, device):
    from transformers import LlamaConfig, LlamaModel

    shape = SIZES[size]
    config = LlamaConfig(
        vocab_size=256, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["seq"],
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an 8B-shaped stack takes ~10 s to initialise on a CPU
        return LlamaModel(config).to(dtype=dtype)


def variants(rank: int, layers: int):
    """name -> (kind, peft config). 'techniques' uses a non-uniform rank pattern with mean rank = rank."""
    from peft import LoraConfig

    base = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    skew = [rank // 2, rank + rank // 2] * (layers // 2) + [rank] * (layers % 2)  # same mean rank
    pattern = {f"layers.{i}.{t}": skew[i] for i in range(layers) for t in TARGETS}
    # ranks as a calibrated allocation gives them: not multiples of 8 (same mean rank)
    odd = [rank - 3, rank + 3] * (layers // 2) + [rank] * (layers % 2)
    odd_pattern = {f"layers.{i}.{t}": odd[i] for i in range(layers) for t in TARGETS}
    return {
        "lora": LoraConfig(**base),
        "aira_full_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="full"),
        "aira_heuristic_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="heuristic"),
        "aira_random_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="random"),
        "aira_routed_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="routed"),
        "aira_techniques_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="full", rank_pattern=pattern,
                                             use_activation_aware=True, use_awsvd_init=True, calibrated=True),
        "aira_techniques_odd_ranks_2x3": AiraMoeConfig(**base, num_A=2, num_B=3, cola_strategy="full",
                                                       rank_pattern=odd_pattern, use_activation_aware=True,
                                                       use_awsvd_init=True, calibrated=True),
    }


def quantize_linears(model, bits: int, device, compute_dtype) -> None:
    """Replace every nn.Linear by its bitsandbytes 4-bit (nf4, double quant) or 8-bit twin, quantised on ``device``
    (what `quantization_bit` / BitsAndBytesConfig give LLaMA-Factory and transformers)."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            weight = child.weight.data.to("cpu", torch.float16)
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                          quant_type="nf4", compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            setattr(parent, name, layer.to(device))
    # what transformers sets on a BitsAndBytesConfig-loaded model: peft's LoRA then uses its bitsandbytes layers
    setattr(model, "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit", True)


def make_model(config, args, device, dtype):
    from peft import get_peft_model

    base = build_base(args.size, args.layers, dtype, device)
    if args.bits:
        quantize_linears(base, args.bits, device, dtype)
    model = get_peft_model(base, config)
    if args.checkpointing:  # as LLaMA-Factory trains by default (non-reentrant for 'routed', as the seam sets it)
        routed = getattr(config, "token_dependent", False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": not routed})
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable params in fp32, as LLaMA-Factory does
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def one_step(model, optimizer, hidden, device):
    # the decoder stack only: embeddings and lm_head are the same for every method
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        out = model(inputs_embeds=hidden).last_hidden_state
        loss = out.float().pow(2).mean()
    if isinstance(model.base_model, AiraMoeModel):  # a routed adapter's load-balancing loss, as trained
        loss = model.base_model.add_routing_loss(loss)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SIZES[args.size]
    configs = variants(args.rank, args.layers)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",") or k == "lora"}
    # requires grad: reentrant gradient checkpointing only back-propagates into a block whose input does
    hidden = torch.randn(shape["batch"], shape["seq"], shape["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    times = {name: [] for name in configs}
    peaks, params = {}, {}
    # one model at a time (an 8B-shaped stack per variant would not fit together); rounds interleave the variants
    for round_index in range(args.repeats):
        for name, config in configs.items():
            model, optimizer = make_model(config, args, device, dtype)
            params[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for _ in range(args.warmup):
                one_step(model, optimizer, hidden, device)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step(model, optimizer, hidden, device)
            synchronize(device)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            del model, optimizer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"round {round_index + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()), flush=True)
    lora_ms = statistics.median(times["lora"])
    rows = []
    for name in configs:
        median = statistics.median(times[name])
        row = {"variant": name, "median_ms": median, "ratio_time_vs_lora": median / lora_ms,
               "min_ms": min(times[name]), "max_ms": max(times[name]), "trainable_params": params[name]}
        if name in peaks:
            row.update(peak_gib=peaks[name], ratio_mem_vs_lora=peaks[name] / peaks["lora"])
        rows.append(row)
    return {
        "device": device_name(device),
        "size": args.size, "layers": args.layers, "checkpointing": args.checkpointing, "bits": args.bits, "rank": args.rank, "batch": shape["batch"], "seq": shape["seq"],
        "repeats": args.repeats, "steps": args.steps, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, {result['size']} size, {result['layers']} layers, r={result['rank']}, "
             f"batch {result['batch']}x{result['seq']}, median of {result['repeats']} rounds x {result['steps']} steps"
             + (", gradient checkpointing" if result.get("checkpointing") else "")
             + (f", {result['bits']}-bit bitsandbytes base" if result.get("bits") else ""),
             "", "| variant | median ms | x LoRA time | peak GiB | x LoRA memory | trainable params |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "n/a (CPU)"
        ratio = f"{row['ratio_mem_vs_lora']:.3f}" if "ratio_mem_vs_lora" in row else "n/a"
        lines.append(f"| {row['variant']} | {row['median_ms']:.1f} | {row['ratio_time_vs_lora']:.3f} | {peak} | {ratio} | {row['trainable_params']:,} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if torch.cuda.is_available() else "reduced")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds over all variants")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variants (lora is always included)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=None,
                        help="QLoRA: a bitsandbytes 4-bit (nf4) or 8-bit base for every method")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (LLaMA-Factory's default)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args)
    print(markdown(result))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
