"""Calibration + allocation + AwSVD time on Llama-shaped random weights, split by phase.

Full size (CUDA): Llama-3.1-8B shapes, 32 layers x 7 targets, bf16 (goal: < 60 s on one H100). Reduced size (CPU):
the same structure scaled down. Embeddings/lm_head are tiny (vocab 256): the pass and the SVDs dominate.

    python benchmarks/calibration_time.py --size full --batches 8          # on a GPU
    python benchmarks/calibration_time.py --size reduced --out benchmarks/results/calibration_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import device_name, write_json  # noqa: E402

from aira_moe import AiraMoeConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "full": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, layers=32, batch=4, seq=1024),
    "reduced": dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2, layers=8, batch=2, seq=128),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if torch.cuda.is_available() else "reduced")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (awsvd_collect_steps)")
    parser.add_argument("--rank", type=int, default=8, help="uniform rank r; budget = layers * r (rank_budget auto)")
    parser.add_argument("--solver", choices=["randomized", "full"], default="randomized")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=256, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["seq"])
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    peft_config = AiraMoeConfig(r=args.rank, lora_alpha=2 * args.rank, num_A=2, num_B=3, target_modules=TARGETS,
                                use_layer_wise_rank=True, rank_budget="auto", min_rank=2, max_rank=4 * args.rank,
                                use_awsvd_init=True, awsvd_solver=args.solver, use_activation_aware=True,
                                awsvd_collect_steps=args.batches)
    model = get_peft_model(base, peft_config)
    gen = torch.Generator().manual_seed(0)
    loader = [{"input_ids": torch.randint(0, 256, (shape["batch"], shape["seq"]), generator=gen),
               "attention_mask": torch.ones(shape["batch"], shape["seq"], dtype=torch.long)} for _ in range(args.batches)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = model.calibrate(loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    result = {
        "device": device_name(device),
        "size": args.size, "layers": shape["layers"], "modules": shape["layers"] * len(TARGETS), "batches": args.batches,
        "batch": shape["batch"], "seq": shape["seq"], "solver": args.solver, "rank_budget": report["rank_sum"],
        "seconds": {**report["seconds"], "total": total}, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
