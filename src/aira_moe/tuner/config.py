"""AiraMoeConfig: the peft config of the AiraMoe adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..calibration.allocation import OBJECTIVES, check_rank_bounds
from ..calibration.stats import CHANNEL_NORMALIZERS, DEFAULT_LOD_REFERENCE, LOD_REFERENCES
from ..errors import UserError
from ._registry import ensure_peft_type
from .strategies import STRATEGIES

# the allowed values of each choice field: the one copy (the Literal annotations and the LLaMA-Factory keys use them)
COLA_STRATEGIES = tuple(STRATEGIES)
THETA_TYPES = ("lod", "act")
OBJECTIVE_FUNCTIONS = tuple(OBJECTIVES)
ACTIVATION_AWARE_MODES = ("inps", "outps")
AWSVD_SOLVERS = ("randomized", "full")
AWSVD_SPLITS = ("reference", "symmetric")
AWSVD_MODES = ("residual", "directions")
LAYER_SCALINGS = ("rank", "base")
ACTIVATION_NORMALIZATIONS = tuple(CHANNEL_NORMALIZERS)
BIAS_OPTIONS = ("none", "all", "aira_moe_only")
ROUTER_INPUTS = ("layer", "projections")


def _require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def _require_at_least(name: str, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def lookup_pattern(pattern: dict, module_name: str, default):
    """Value of ``pattern`` for ``module_name``: an exact key, else the longest key that is a dotted suffix of it."""
    if module_name in pattern:
        return pattern[module_name]
    matches = [key for key in pattern if module_name.endswith("." + key)]
    return pattern[max(matches, key=len)] if matches else default


@dataclass
class AiraMoeConfig(PeftConfig):
    """Configuration of an AiraMoe adapter: CoLA's collaborative low-rank experts (``num_A`` down-projections and
    ``num_B`` up-projections per layer) plus three activation-aware techniques fed by one calibration pass (layer-wise
    rank allocation, AwSVD initialisation, activation-aware weighting). See CoLA (https://arxiv.org/abs/2405.13840)
    and the project's ``docs/method.md``.
    """

    r: int = field(default=8, metadata={"help": "Rank of every A and B expert (before layer-wise allocation). "})
    lora_alpha: int = field(
        default=8,
        metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). "},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter's input. "})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex of the Linear modules to adapt, or 'all-linear'. "
            "If None, the module names LoRA uses for the model's architecture are chosen. "
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules that must not be adapted. "}
    )
    num_A: int = field(default=1, metadata={"help": "Number of down-projection experts A_i (r x in) per layer. "})
    num_B: int = field(default=1, metadata={"help": "Number of up-projection experts B_j (out x r) per layer. "})
    cola_strategy: Literal[COLA_STRATEGIES] = field(
        default="full",
        metadata={
            "help": "How A and B experts collaborate: 'full' sums every pair (one LoRA-sized GEMM pair), "
            "'heuristic' binds each B to one A, 'random' pairs each A with one random B per training step "
            "and uses the expectation in eval and merge, 'routed' mixes the num_A * num_B pairs per token with a "
            "trained softmax router (no merge, no LoRA export: serve it unmerged). "
        },
    )
    router_top_k: int = field(
        default=0,
        metadata={"help": "'routed' only: keep each token's router_top_k largest gates (not renormalised); 0 keeps "
                          "all num_A * num_B gates (dense). "},
    )
    router_input: Literal[ROUTER_INPUTS] = field(
        default="layer",
        metadata={"help": "'routed' only: what the router reads. 'layer': the layer input, num_A * num_B * (in + 1) "
                          "parameters per module; 'projections': the experts' own down-projections A_i x (RMS-"
                          "normalised), num_A * num_B * (num_A * r + 1), which leaves the parameters to the experts' "
                          "rank. "},
    )
    router_aux_loss_coef: float = field(
        default=0.01,
        metadata={"help": "'routed' only: weight of the load-balancing loss (Switch Transformer's E * sum f_e P_e, "
                          "averaged over layers) added to the training loss; 0 turns it off. "},
    )
    cola_seed: int = field(
        default=0, metadata={"help": "Seed of the per-step pairing of the 'random' strategy (same on every rank). "}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r. "}
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "Weight-decomposed update (DoRA, Liu et al. 2024): a trained magnitude per output channel "
                          "rescales each row of W + dW to that length (its norm treated as a constant, as peft does). "
                          "Adds out_features parameters per module; fixed pairings only ('full', 'heuristic', 'random'); "
                          "not on a quantised base. Merges exactly and exports as a peft DoRA adapter. "},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module rank overriding r, keyed by full module name; filled by layer-wise allocation and "
            "saved so that the adapter reloads with the same shapes. "
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module lora_alpha overriding lora_alpha, keyed by module name. "}
    )
    use_layer_wise_rank: bool = field(
        default=False, metadata={"help": "Allocate ranks per decoder layer from calibrated layer importance. "}
    )
    theta_type: Literal[THETA_TYPES] = field(
        default="lod",
        metadata={
            "help": "Layer importance: 'lod' (fraction of outlier |W_ij| * ||X_j|| entries) or 'act' (mean |x|). "
        },
    )
    lod_threshold_M: float = field(
        default=4.0,
        metadata={"help": "An entry is an outlier when it exceeds lod_threshold_M times the reference level "
                          "(see lod_reference). "},
    )
    lod_reference: Literal[LOD_REFERENCES] = field(
        default=DEFAULT_LOD_REFERENCE,
        metadata={"help": "Reference level of the LOD outlier threshold: 'mean' of all |W_ij| * ||X_j|| (the seed's "
                          "formula) or their 'median', which a few huge channels cannot inflate. "},
    )
    rank_budget: Union[int, str] = field(
        default=64,
        metadata={
            "help": "Sum of ranks over allocation units (decoder layers), or 'auto' for num_layers * r "
            "(the parameter count of uniform rank r). "
        },
    )
    min_rank: int = field(default=1, metadata={"help": "Smallest rank a layer may get. "})
    max_rank: int = field(default=16, metadata={"help": "Largest rank a layer may get. "})
    layer_scaling: Literal[LAYER_SCALINGS] = field(
        default="rank",
        metadata={"help": "Scale of a layer after allocation: 'rank' uses lora_alpha / r_l of its allocated rank (the "
                          "LoRA rule per layer), 'base' uses lora_alpha / r of the configured r in every layer "
                          "(sqrt(r) with rsLoRA in both). "},
    )
    objective_function: Literal[OBJECTIVE_FUNCTIONS] = field(
        default="log",
        metadata={"help": "Allocation objective f in max sum_l theta_l * f(r_l): log, linear, exp2 (r^2), cubic (r^3). "},
    )
    use_awsvd_init: bool = field(
        default=False,
        metadata={
            "help": "Initialise A and B from the SVD of W * diag(activation RMS); the initial update is subtracted "
            "from the base weight so the model output is unchanged at step 0. "
        },
    )
    awsvd_collect_steps: int = field(
        default=100, metadata={"help": "Number of calibration batches (one pass serves every technique). "}
    )
    awsvd_solver: Literal[AWSVD_SOLVERS] = field(
        default="randomized", metadata={"help": "SVD used by AwSVD: 'randomized' (fast, default) or 'full'. "}
    )
    awsvd_niter: int = field(default=6, metadata={"help": "Power iterations of the randomized SVD. "})
    awsvd_oversample: int = field(default=16, metadata={"help": "Extra columns sampled by the randomized SVD. "})
    awsvd_split: Literal[AWSVD_SPLITS] = field(
        default="reference",
        metadata={
            "help": "Where the singular values go: 'reference' puts them in B, 'symmetric' splits sqrt(S) "
            "between A and B. "
        },
    )
    awsvd_mode: Literal[AWSVD_MODES] = field(
        default="directions",
        metadata={"help": "'directions' (default): the A experts start on W's top activation-weighted input directions "
                          "at LoRA's init scale and B at zero, so the update starts at zero and the base weight is "
                          "untouched. 'residual' (the seed's method): the adapter starts as the activation-weighted "
                          "best rank-r approximation of W, which is subtracted from the base weight (PiSSA-style). "},
    )
    use_activation_aware: bool = field(
        default=False, metadata={"help": "Weight the update by fixed per-channel activation scores. "}
    )
    activation_aware_mode: Literal[ACTIVATION_AWARE_MODES] = field(
        default="inps",
        metadata={"help": "Score input channels (mean |x|) with 'inps' or output channels (mean |Wx|) with 'outps'. "},
    )
    activation_normalize: Union[str, bool] = field(
        default="inverse",
        metadata={"help": "Channel weights from the scores s: 'inverse' (1/s) / mean(1/s) (default: the update is "
                          "trained in activation-whitened coordinates), 'minmax' (s - min) / (max - min) (the seed's "
                          "formula), 'mean' s / mean(s), 'sqrt' sqrt(s) / mean(sqrt(s)), 'none' s. True and False mean "
                          "'minmax' and 'none'. "},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: B experts start at zero so the adapter is the identity at step 0. "
            "False: every expert is random (non-zero update), for tests. "
        },
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Set True when the target stores its weight as (in, out), as GPT-2's Conv1D does. "}
    )
    bias: str = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'aira_moe_only'. "}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters that are trained and saved in full. "}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the decoder layers with these indices. "}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the ModuleList that holds the decoder layers (e.g. 'layers'), with layers_to_transform. "},
    )
    calibrated: bool = field(
        default=False,
        metadata={
            "help": "Set by calibration: the saved ranks, initial factors and channel scores are final and "
            "must be reused, never recomputed (resume, reload). "
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.rank_budget, str) and self.rank_budget.strip().isdigit():  # "64" from a YAML / CLI string
            self.rank_budget = int(self.rank_budget)
        if isinstance(self.activation_normalize, bool):  # the seed's boolean switch
            self.activation_normalize = "minmax" if self.activation_normalize else "none"
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for every value the adapter cannot work with."""
        _require_at_least("r", self.r, 1)
        _require_at_least("num_A", self.num_A, 1)
        _require_at_least("num_B", self.num_B, 1)
        _require_choice("cola_strategy", self.cola_strategy, COLA_STRATEGIES)
        _require_at_least("router_top_k", self.router_top_k, 0)
        if self.router_top_k > self.num_A * self.num_B:
            raise UserError(f"`router_top_k` must be <= num_A * num_B = {self.num_A * self.num_B} (the number of "
                            f"routed pairs), got {self.router_top_k!r}.")
        if isinstance(self.router_aux_loss_coef, bool) or not isinstance(self.router_aux_loss_coef, (int, float)) \
                or not self.router_aux_loss_coef >= 0:
            raise UserError(f"`router_aux_loss_coef` must be a number >= 0, got {self.router_aux_loss_coef!r}.")
        routed = self.token_dependent
        _require_choice("router_input", self.router_input, ROUTER_INPUTS)
        if self.router_input != "layer" and not routed:
            raise UserError(f"`router_input`={self.router_input!r} needs `cola_strategy`='routed' (it is what the "
                            f"router reads), got `cola_strategy`={self.cola_strategy!r}.")
        if self.use_dora and routed:
            raise UserError(f"`use_dora`=True needs a fixed pairing ('full', 'heuristic' or 'random'): a per-token "
                            f"router has no single weight W + dW to normalise, got `cola_strategy`={self.cola_strategy!r}.")
        if self.router_top_k and not routed:
            raise UserError(f"`router_top_k`={self.router_top_k} needs `cola_strategy`='routed' (it selects the "
                            f"gates of the router), got `cola_strategy`={self.cola_strategy!r}.")
        if (routed and 0 < self.router_top_k < self.num_A * self.num_B and self.use_awsvd_init
                and self.awsvd_mode == "residual"):
            raise UserError(f"`awsvd_mode`='residual' with `cola_strategy`='routed' needs dense gates "
                            f"(`router_top_k`=0), got `router_top_k`={self.router_top_k}: top-k gates do not sum to "
                            "one, so the adapter would not start at the update subtracted from the base weight.")
        _require_choice("theta_type", self.theta_type, THETA_TYPES)
        _require_choice("objective_function", self.objective_function, OBJECTIVE_FUNCTIONS)
        _require_choice("activation_aware_mode", self.activation_aware_mode, ACTIVATION_AWARE_MODES)
        _require_choice("awsvd_solver", self.awsvd_solver, AWSVD_SOLVERS)
        _require_choice("awsvd_split", self.awsvd_split, AWSVD_SPLITS)
        _require_choice("awsvd_mode", self.awsvd_mode, AWSVD_MODES)
        _require_choice("lod_reference", self.lod_reference, LOD_REFERENCES)
        _require_choice("layer_scaling", self.layer_scaling, LAYER_SCALINGS)
        _require_choice("activation_normalize", self.activation_normalize, ACTIVATION_NORMALIZATIONS)
        _require_choice("bias", self.bias, BIAS_OPTIONS)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.lod_threshold_M > 0:
            raise UserError(f"`lod_threshold_M` must be > 0, got {self.lod_threshold_M!r}.")
        _require_at_least("min_rank", self.min_rank, 1)
        _require_at_least("max_rank", self.max_rank, 1)
        check_rank_bounds(self.min_rank, self.max_rank)
        if self.rank_budget != "auto" and (isinstance(self.rank_budget, bool) or not isinstance(self.rank_budget, int)
                                           or self.rank_budget < 1):
            raise UserError(f"`rank_budget` must be a positive integer or 'auto', got {self.rank_budget!r}.")
        _require_at_least("awsvd_collect_steps", self.awsvd_collect_steps, 1)
        _require_at_least("awsvd_niter", self.awsvd_niter, 0)
        _require_at_least("awsvd_oversample", self.awsvd_oversample, 0)
        for name, rank in self.rank_pattern.items():
            _require_at_least(f"rank_pattern[{name!r}]", rank, 1)
        if self.layers_pattern and self.layers_to_transform is None:
            raise UserError("`layers_pattern` is set but `layers_to_transform` is not; set both or neither.")

    def layer_kwargs(self, module_name: str) -> dict:
        """The ``update_layer`` arguments of one adapted module: its rank and alpha (rank_pattern / alpha_pattern)
        and the options every module shares."""
        return {
            "r": lookup_pattern(self.rank_pattern, module_name, self.r),
            "lora_alpha": lookup_pattern(self.alpha_pattern, module_name, self.lora_alpha),
            "lora_dropout": self.lora_dropout,
            "num_A": self.num_A,
            "num_B": self.num_B,
            "cola_strategy": self.cola_strategy,
            "cola_seed": self.cola_seed,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "scaling_rank": self.r if self.layer_scaling == "base" else None,
            "init_weights": self.init_weights,
            "activation_mode": self.activation_aware_mode if self.use_activation_aware else None,
            "with_initial_factors": self.use_awsvd_init and self.awsvd_mode == "residual",
            "router_top_k": self.router_top_k,
            "router_input": self.router_input,
        }

    @property
    def token_dependent(self) -> bool:
        """Whether the update depends on the token (``cola_strategy: routed``): no merge, no LoRA export."""
        return STRATEGIES[self.cola_strategy].token_dependent

    @property
    def needs_calibration(self) -> bool:
        """Whether any technique needs activation statistics before training."""
        return self.use_layer_wise_rank or self.use_awsvd_init or self.use_activation_aware
