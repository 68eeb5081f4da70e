"""The aira_moe training arguments (YAML keys) and their translation into an AiraMoeConfig; no LLaMA-Factory import."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from ..tuner.config import AiraMoeConfig


@dataclass
class AiraMoeArguments:
    r"""Arguments of ``finetuning_type: aira_moe``; ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target``,
    ``additional_target`` and ``use_rslora`` keep their LoRA meaning."""

    num_A: int = field(default=1, metadata={"help": "Number of down-projection (A) experts per adapted layer."})
    num_B: int = field(default=1, metadata={"help": "Number of up-projection (B) experts per adapted layer."})
    cola_strategy: Literal["full", "heuristic", "random"] = field(
        default="full", metadata={"help": "How A and B experts collaborate: full, heuristic or random."}
    )
    cola_seed: int = field(default=0, metadata={"help": "Seed of the random strategy's per-step pairing."})
    use_layer_wise_rank: bool = field(default=False, metadata={"help": "Allocate ranks per layer from importance."})
    theta_type: Literal["lod", "act"] = field(default="lod", metadata={"help": "Layer importance: lod or act."})
    lod_threshold_M: float = field(default=2.0, metadata={"help": "Outlier threshold (times the mean) of LOD."})
    rank_budget: str = field(default="64", metadata={"help": "Sum of per-layer ranks, or 'auto' (= layers * lora_rank)."})
    min_rank: int = field(default=1, metadata={"help": "Smallest rank a layer may get."})
    max_rank: int = field(default=16, metadata={"help": "Largest rank a layer may get."})
    objective_function: Literal["log", "linear", "exp2", "cubic"] = field(
        default="log", metadata={"help": "Allocation objective: log, linear, exp2 or cubic."}
    )
    use_awsvd_init: bool = field(default=False, metadata={"help": "Initialise experts by activation-weighted SVD."})
    awsvd_collect_steps: int = field(default=100, metadata={"help": "Number of calibration batches."})
    awsvd_solver: Literal["randomized", "full"] = field(default="randomized", metadata={"help": "SVD used by AwSVD."})
    awsvd_split: Literal["reference", "symmetric"] = field(
        default="reference", metadata={"help": "Singular values in B (reference) or split sqrt (symmetric)."}
    )
    use_activation_aware: bool = field(default=False, metadata={"help": "Weight the update by channel scores."})
    activation_aware_mode: Literal["inps", "outps"] = field(
        default="inps", metadata={"help": "Score input (inps) or output (outps) channels."}
    )
    activation_normalize: bool = field(default=True, metadata={"help": "Min-max normalise the channel scores."})


def parse_rank_budget(value) -> Union[int, str]:
    """``rank_budget`` from YAML/CLI: an int, a digit string, or 'auto'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (value == "auto" or value.strip().isdigit()):
        return value if value == "auto" else int(value)
    raise ValueError(f"`rank_budget` must be a positive integer or 'auto', got {value!r}.")


def peft_config_from_args(args, inference_mode: bool = False, init_weights: bool = True) -> AiraMoeConfig:
    """AiraMoeConfig from parsed arguments (LLaMA-Factory's FinetuningArguments extended with AiraMoeArguments)."""
    if isinstance(args.lora_rank, bool) or not isinstance(args.lora_rank, int) or args.lora_rank < 1:
        raise ValueError(f"`lora_rank` must be an integer >= 1, got {args.lora_rank!r}.")
    targets = list(args.lora_target)
    target_modules: Optional[Union[list[str], str]] = "all-linear" if targets == ["all"] else targets
    # every AiraMoeArguments field is an AiraMoeConfig field of the same name
    method_keys = {f.name: getattr(args, f.name) for f in fields(AiraMoeArguments)}
    method_keys["rank_budget"] = parse_rank_budget(args.rank_budget)
    return AiraMoeConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        modules_to_save=list(args.additional_target) if args.additional_target else None,
        use_rslora=args.use_rslora,
        inference_mode=inference_mode,
        init_weights=init_weights,
        task_type="CAUSAL_LM",
        **method_keys,
    )
