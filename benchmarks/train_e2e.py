"""Steady-state step time and peak memory of `llamafactory-cli train`, peft LoRA vs aira_moe variants.

Every run is LLaMA-Factory's own training entry point (`run_exp`, what `llamafactory-cli train CONFIG` calls), on
the same random Llama, tokenizer and data; a TrainerCallback times each optimizer step (synchronised) and the first
`--warmup` steps are dropped. Variants run in rounds whose order alternates (A B C D, D C B A, ...), so warm-up, clock
and cache effects fall evenly on all of them. All runs of a round share one fresh process (`--fresh_process`: one
per run), so each round also gives a paired ratio to LoRA free of between-process differences; the table reports
both the ratio of medians and the median (and range) of the per-round ratios.

    python benchmarks/train_e2e.py --size tiny                     # CPU, a minute or two
    python benchmarks/train_e2e.py --size 1b --rounds 4 --out benchmarks/results/train_e2e_h100.json   # one GPU

Sizes: `tiny` (hidden 64, 2 layers, cutoff 128, fp32 on CPU); `1b` (a 0.97B Llama: hidden 2048, 22 layers, MLP 5632,
32 heads / 4 KV heads, bf16, batch 4 x 1024 tokens, gradient checkpointing as LLaMA-Factory's default; GPU);
`launch` (`1b`'s depth, bf16 autocast and checkpointing at hidden 64 on CPU: almost all of its step is host-side
dispatch, as in the launch-bound `1b` case on a GPU, so it is the CPU proxy for that case).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, cutoff_len=128, batch=4, rank=8, bf16=False, device="cpu"),
    "launch": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=22, num_attention_heads=4,
                   num_key_value_heads=2, cutoff_len=64, batch=2, rank=8, bf16=True, device="cpu", threads=1),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, cutoff_len=1024, batch=4, rank=16, bf16=True, device="cuda"),
}
WORDS = ("red green blue yellow cherry leaf sky banana ruby frog ocean lemon tomato lime whale corn "
         "the a of is which colour what does have usually question answer").split()


def variants(rank: int) -> dict[str, dict]:
    """name -> LLaMA-Factory method keys. Every aira_moe variant has LoRA's rank (the step-time comparison)."""
    aira = {"finetuning_type": "aira_moe", "num_A": 2, "num_B": 3, "cola_strategy": "full"}
    return {
        "lora": {"finetuning_type": "lora"},
        "aira_basic": aira,
        "aira_weighting": {**aira, "use_activation_aware": True, "activation_aware_mode": "inps"},
        "aira_all": {**aira, "use_layer_wise_rank": True, "rank_budget": "auto", "min_rank": max(1, rank // 4),
                     "max_rank": 2 * rank, "use_awsvd_init": True, "use_activation_aware": True,
                     "activation_aware_mode": "outps", "awsvd_collect_steps": 8},
    }


def build_assets(size: str, root: str) -> dict:
    """A random Llama (bf16 for `1b`), a BPE tokenizer and long synthetic rows, built once under ``root``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aira_moe.tiny import build_tokenizer

    shape = SIZES[size]
    model_dir, data_dir = os.path.join(root, "model"), os.path.join(root, "data")
    marker = os.path.join(root, "assets.json")
    if os.path.isfile(marker):
        return json.load(open(marker, encoding="utf-8"))
    rng = random.Random(0)
    # rows longer than cutoff_len: every batch holds exactly batch x cutoff_len tokens
    rows = [{"instruction": " ".join(rng.choice(WORDS) for _ in range(shape["cutoff_len"])), "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(16))} for _ in range(512)]
    os.makedirs(data_dir, exist_ok=True)
    json.dump(rows, open(os.path.join(data_dir, "e2e.json"), "w", encoding="utf-8"))
    json.dump({"e2e": {"file_name": "e2e.json"}}, open(os.path.join(data_dir, "dataset_info.json"), "w", encoding="utf-8"))
    tokenizer = build_tokenizer([row["instruction"] for row in rows[:64]] + ["Human: Assistant:"], model_dir, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2 * shape["cutoff_len"], tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads")})
    torch.manual_seed(0)
    with torch.device("cuda" if shape["device"] == "cuda" and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    if shape["bf16"]:
        model = model.to(torch.bfloat16)
    model.save_pretrained(model_dir)
    assets = {"model": model_dir, "dataset_dir": data_dir, "params": sum(p.numel() for p in model.parameters())}
    json.dump(assets, open(marker, "w", encoding="utf-8"))
    return assets


def train_args(size: str, assets: dict, method: dict, steps: int, output_dir: str) -> dict:
    shape = SIZES[size]
    args = {
        "model_name_or_path": assets["model"], "stage": "sft", "do_train": True, "dataset": "e2e",
        "dataset_dir": assets["dataset_dir"], "template": "default", "cutoff_len": shape["cutoff_len"],
        "overwrite_cache": True, "output_dir": output_dir, "overwrite_output_dir": True, "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "per_device_train_batch_size": shape["batch"],
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "max_steps": steps, "seed": 42,
        "lora_rank": shape["rank"], "lora_alpha": 2 * shape["rank"], "lora_target": "all",
        "dataloader_num_workers": 0, "preprocessing_num_workers": 1, **method,
    }
    if shape["bf16"]:
        args["bf16"] = True
    if shape["device"] == "cpu":
        args["use_cpu"] = True
    return args


def worker(schedule_path: str) -> None:
    """Runs in the child: LLaMA-Factory's run_exp with a step timer, once per entry of the schedule, in order.

    Runs sharing a process share its host-side state (clock, caches, allocator), which otherwise differs by up to
    ±10 % between processes in the launch-bound 1B case; each run is checked to leave no model behind.
    """
    import gc
    import weakref

    import torch
    from transformers import TrainerCallback
    from llamafactory.train.tuner import run_exp

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self, timing_path):
            self.timing_path = timing_path
            self.ends = []
            self.trainable = 0
            self.model_ref = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.model_ref = weakref.ref(model)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            json.dump({"step_ends": self.ends, "peak_gib": peak, "trainable_params": self.trainable},
                      open(self.timing_path, "w", encoding="utf-8"))

    for config_path, timing_path in json.load(open(schedule_path, encoding="utf-8")):
        timer = StepTimer(timing_path)
        run_exp(json.load(open(config_path, encoding="utf-8")), callbacks=[timer])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # a model still alive would hold memory and skew the next run's peak and speed
        if timer.model_ref() is not None:
            raise RuntimeError(f"the model of {config_path} is still referenced after its run")


def run_schedule(size, assets, runs, steps, workdir) -> list[dict]:
    """``runs``: [(run_id, method)], trained one after another in one fresh process; their timings in that order."""
    schedule, outputs = [], []
    for run_id, method in runs:
        config_path = os.path.join(workdir, f"{run_id}.json")
        timing_path = os.path.join(workdir, f"{run_id}.timing.json")
        output_dir = os.path.join(workdir, run_id)
        json.dump(train_args(size, assets, method, steps, output_dir), open(config_path, "w", encoding="utf-8"))
        schedule.append((config_path, timing_path))
        outputs.append((timing_path, output_dir))
    schedule_path = os.path.join(workdir, f"{runs[0][0]}.schedule.json")
    json.dump(schedule, open(schedule_path, "w", encoding="utf-8"))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1"}
    if SIZES[size]["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if "threads" in SIZES[size]:  # one thread: host dispatch is single-threaded on a GPU too, and the pool adds jitter
        env["OMP_NUM_THREADS"] = str(SIZES[size]["threads"])
    started = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", schedule_path],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{runs[0][0]}.. failed ({result.returncode}):\n{(result.stdout + result.stderr)[-5000:]}")
    process_s = time.perf_counter() - started
    timings = []
    for timing_path, output_dir in outputs:
        timing = json.load(open(timing_path, encoding="utf-8"))
        timing["process_s"] = process_s
        adapter_config = os.path.join(output_dir, "adapter_config.json")
        if os.path.isfile(adapter_config):  # the allocated ranks, if any (they set the GEMM shapes)
            pattern = json.load(open(adapter_config, encoding="utf-8")).get("rank_pattern") or {}
            timing["ranks"] = sorted(set(pattern.values()))
        timings.append(timing)
    return timings


def measure(args) -> dict:
    import torch

    from _common import device_name

    shape = SIZES[args.size]
    configs = variants(shape["rank"])
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",") or k == "lora"}
    assets = build_assets(args.size, os.path.join(args.assets, args.size))
    steps = args.warmup + args.steps
    step_ms = {name: [] for name in configs}
    peaks, params, walls = {}, {}, {name: [] for name in configs}
    names = list(configs)
    with tempfile.TemporaryDirectory() as workdir:
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            runs = [(f"r{round_index}_{name}", configs[name]) for name in order]
            # one process per round (all variants share it) or, with --fresh_process, one per run
            groups = [[run] for run in runs] if args.fresh_process else [runs]
            timings = [timing for group in groups for timing in run_schedule(args.size, assets, group, steps, workdir)]
            for name, timing in zip(order, timings):
                ends = timing["step_ends"][args.warmup - 1:]
                gaps = [1000 * (b - a) for a, b in zip(ends, ends[1:])]
                step_ms[name].append(statistics.median(gaps))
                walls[name].append(timing["process_s"])
                params[name] = timing["trainable_params"]
                if timing.get("ranks"):
                    print(f"  {name} allocated ranks: {timing['ranks']}", flush=True)
                if timing["peak_gib"] is not None:
                    peaks[name] = max(peaks.get(name, 0.0), timing["peak_gib"])
                print(f"round {round_index + 1} {name}: median step {step_ms[name][-1]:.1f} ms", flush=True)
    lora_ms = statistics.median(step_ms["lora"])
    rows = []
    for name in names:
        median = statistics.median(step_ms[name])
        # paired: each round's step time over LoRA's in the same round (the same process unless --fresh_process)
        round_ratios = [ms / lora_round for ms, lora_round in zip(step_ms[name], step_ms["lora"])]
        row = {"variant": name, "median_step_ms": median, "ratio_time_vs_lora": median / lora_ms,
               "round_ratios_vs_lora": round_ratios, "median_round_ratio_vs_lora": statistics.median(round_ratios),
               "per_round_ms": step_ms[name], "process_s": walls[name], "trainable_params": params[name]}
        if name in peaks:
            row.update(peak_gib=peaks[name], ratio_mem_vs_lora=peaks[name] / peaks["lora"])
        rows.append(row)
    device = torch.device("cuda" if shape["device"] == "cuda" and torch.cuda.is_available() else "cpu")
    return {"device": device_name(device), "size": args.size, "model_params": assets["params"],
            "tokens_per_step": shape["batch"] * shape["cutoff_len"], "rounds": args.rounds, "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "process": "fresh per run" if args.fresh_process else "one per round", "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, llamafactory-cli train ({result['size']}: {result['model_params'] / 1e6:.1f}M params, "
             f"{result['tokens_per_step']} tokens/step), median over {result['rounds']} alternating rounds of "
             f"{result['timed_steps']} steps after {result['warmup_steps']} warm-up steps, process: {result['process']}", "",
             "| variant | median step ms | x LoRA time | x LoRA per round: median (min-max) | peak GiB | x LoRA memory "
             "| trainable params |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "n/a (CPU)"
        ratio = f"{row['ratio_mem_vs_lora']:.3f}" if "ratio_mem_vs_lora" in row else "n/a"
        paired = (f"{row['median_round_ratio_vs_lora']:.3f} ({min(row['round_ratios_vs_lora']):.3f}-"
                  f"{max(row['round_ratios_vs_lora']):.3f})")
        lines.append(f"| {row['variant']} | {row['median_step_ms']:.1f} | {row['ratio_time_vs_lora']:.3f} | {paired} | {peak} | "
                     f"{ratio} | {row['trainable_params']:,} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1])
    from _common import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over all variants")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--fresh_process", action="store_true",
                        help="one process per run instead of one per round (adds between-process noise to the ratios)")
    parser.add_argument("--only", default="", help="comma-separated variants (lora is always included)")
    parser.add_argument("--assets", default="outputs/e2e", help="where the model, tokenizer and data are built once")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 2:
        parser.error("--warmup must be >= 1 and --steps >= 2")
    result = measure(args)
    print(markdown(result))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
