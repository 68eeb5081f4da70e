"""AiraMoe layers: stacked A/B experts around a frozen Linear."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .._zero import gathered
from ..errors import UserError
from .collaboration import adapter_scaling, random_pairings
from .quantized import quantization_kind
from .strategies import CollaborationStrategy, get_strategy
from .strategies.routed import RoutingLog


# device type -> the inner dimension of the two adapter GEMMs is padded to a multiple of this: on CUDA an allocated
# rank such as 13 leaves the (tokens x R) bf16 operand's rows unaligned for tensor cores (H100, 1B Llama, ranks 13/19
# vs 8/24: 1.165x vs 1.000x LoRA's step time, benchmarks/README.md)
RANK_MULTIPLE = {"cuda": 8}


class StepCounter:
    """The training step of one model, shared by all its layers: ``value`` counts training forwards (the model ticks
    it). What one step shares across layers hangs on it: the 'random' strategy's pairings, drawn once per step for all
    layers (``pairings``), so a gradient-checkpointing recompute of the same step sees the same pairing; and
    ``routing``, where the token-dependent layers record their load-balancing losses and statistics."""

    def __init__(self) -> None:
        self.value = 0
        self.num_layers = 0
        self._tables: dict[tuple, tuple[int, torch.Tensor]] = {}
        self.routing = RoutingLog()

    def register_layer(self) -> int:
        """The row of a new layer in every pairing table (layers are created in module order on every rank)."""
        self.num_layers += 1
        return self.num_layers - 1

    def pairings(self, seed: int, num_A: int, num_B: int, device: torch.device) -> torch.Tensor:
        """This step's (num_layers, num_B, num_A) pairings; see collaboration.random_pairings."""
        key = (seed, num_A, num_B, device)
        cached = self._tables.get(key)
        if cached is None or cached[0] != self.value or cached[1].shape[0] != self.num_layers:
            cached = (self.value, random_pairings(seed, self.value, self.num_layers, num_A, num_B, device))
            self._tables[key] = cached
        return cached[1]


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _wide_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32, or the weight's dtype when wider (fp64 tests): what the DoRA norms are computed in."""
    return torch.promote_types(weight.dtype, torch.float32)


class AiraMoeLayer(BaseTunerLayer):
    # trainable, per adapter: one stacked Parameter for all A experts and one for all B experts; a strategy that adds
    # trainable tables (a router) extends this per instance (see its ``init``)
    adapter_layer_names = ("aira_moe_A", "aira_moe_B")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "aira_moe_dropout",
        "aira_moe_channel_scale",
        "aira_moe_init_A",
        "aira_moe_init_B",
        "aira_moe_pairing",
    )

    def __init__(self, base_layer: nn.Module, step_counter: StepCounter | None = None, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # the strategy of each adapter (the forward, merge and init dispatch to it) and its options from the config
        self.strategy: dict[str, CollaborationStrategy] = {}
        self.strategy_options: dict[str, dict] = {}
        self.activation_mode: dict[str, str] = {}
        self.aira_moe_A = nn.ParameterDict({})  # adapter -> (num_A, r, in)
        self.aira_moe_B = nn.ParameterDict({})  # adapter -> (num_B, out, r)
        self.aira_moe_dropout = nn.ModuleDict({})
        # fixed per-channel weights of the update (activation-aware weighting); shipped with the adapter
        self.aira_moe_channel_scale = BufferDict({}, persistent=True)
        # the initial update dW0 = init_B @ init_A that AwSVD subtracted from the base weight; shipped with the adapter
        # so that loading onto the original base weight can redo the subtraction
        self.aira_moe_init_A = BufferDict({}, persistent=True)
        self.aira_moe_init_B = BufferDict({}, persistent=True)
        # a strategy's fixed pairing matrix M (num_B x num_A; 'heuristic'); derived from num_A/num_B, not saved
        self.aira_moe_pairing = BufferDict({}, persistent=False)
        # adapter -> (init_B, init_A) currently subtracted from the base weight
        self._residual_applied: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # adapter -> s (out, 1) of a merged DoRA adapter, which its unmerge divides by
        self._merged_dora_scale: dict[str, torch.Tensor] = {}
        self.step_counter = step_counter or StepCounter()
        self.pairing_row = self.step_counter.register_layer()
        # fixed tensors times a scale, cast to the compute dtype: (adapter, kind) -> (source, stamp, value)
        self._cast_cache: dict[tuple[str, str], tuple[torch.Tensor, tuple, torch.Tensor]] = {}
        # zero blocks that pad the inner dimension: (shape, dtype, device) -> tensor, never written
        self._zeros_cache: dict[tuple, torch.Tensor] = {}
        self.layer_key = ""
        self.fan_in_fan_out = kwargs.get("fan_in_fan_out", False)
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif type(base_layer).__name__ == "Conv1D":  # transformers' GPT-2 style (in, out) weight
            in_features, out_features = base_layer.weight.ds_shape if hasattr(base_layer.weight, "ds_shape") else (
                base_layer.weight.shape
            )
        else:
            raise UserError(
                f"AiraMoe can only adapt torch.nn.Linear (or transformers Conv1D) modules, got {type(base_layer).__name__}; "
                "remove it from `target_modules`."
            )
        self.in_features = in_features
        self.out_features = out_features
        # bitsandbytes 4-/8-bit base: its weight is never written; an AwSVD residual runs inside the adapter instead
        self.base_quantization = quantization_kind(base_layer)
        self.register_load_state_dict_post_hook(_resync_residuals_after_load)

    # ---------------------------------------------------------------- building

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        num_A: int,
        num_B: int,
        cola_strategy: str,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_weights: bool = True,
        activation_mode: Optional[str] = None,
        with_initial_factors: bool = False,
        scaling_rank: Optional[int] = None,
        **strategy_options: Any,
    ) -> None:
        """Create (or re-create with a new rank) the experts of ``adapter_name``, and what its strategy adds. The scale
        is lora_alpha / r (or / sqrt(r) with rsLoRA), with ``scaling_rank`` in place of r when given
        (layer_scaling='base'); ``use_dora`` adds a trained magnitude per output channel (see ``_dora_scale``);
        ``strategy_options`` (``cola_seed``, ``router_top_k``) are the strategy's."""
        if r < 1:
            raise ValueError(f"`r` must be an integer >= 1, got {r!r}.")
        if adapter_name in self._residual_applied:
            self._restore_residual(adapter_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = adapter_scaling(lora_alpha, r, use_rslora, scaling_rank)
        strategy = self.strategy[adapter_name] = get_strategy(cola_strategy)
        self.strategy_options[adapter_name] = strategy_options
        self.aira_moe_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.aira_moe_A[adapter_name] = nn.Parameter(torch.empty(num_A, r, self.in_features))
        self.aira_moe_B[adapter_name] = nn.Parameter(torch.empty(num_B, self.out_features, r))
        strategy.init(self, adapter_name, num_A, num_B)
        self.activation_mode[adapter_name] = activation_mode
        if activation_mode is not None:
            size = self.in_features if activation_mode == "inps" else self.out_features
            self.aira_moe_channel_scale[adapter_name] = torch.ones(size)
        if with_initial_factors:
            width = strategy.initial_width(r, num_A)
            self.aira_moe_init_A[adapter_name] = torch.zeros(width, self.in_features)
            self.aira_moe_init_B[adapter_name] = torch.zeros(self.out_features, width)
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._update_magnitude(adapter_name, use_dora)
        self.set_adapter(self.active_adapters)

    def _update_magnitude(self, adapter_name: str, use_dora: bool) -> None:
        """With ``use_dora``: a magnitude per output channel, set to the row norms of W + dW so that the layer's output
        is unchanged at init (DoRA). Made on the first such adapter only, like the router tables: an empty table
        costs host time on every training step."""
        if not use_dora:
            if self._has_magnitude(adapter_name):  # re-created without it
                del self.aira_moe_magnitude[adapter_name]
            return
        if self.strategy[adapter_name].token_dependent:
            raise UserError(f"`use_dora` needs a fixed pairing; {self.layer_key} uses "
                            f"'{self.strategy[adapter_name].name}', whose update depends on the token.")
        if self.base_quantization is not None:
            raise UserError(f"`use_dora` needs the base weight of {self.layer_key} in full precision to normalise W + dW; "
                            f"it is {self.base_quantization} quantised: drop `use_dora` or `quantization_bit`.")
        if "aira_moe_magnitude" not in self._modules:
            self.aira_moe_magnitude = nn.ParameterDict({})  # adapter -> (out,)
            self.adapter_layer_names = (*self.adapter_layer_names, "aira_moe_magnitude")
        # fp32 (or wider) whatever the base dtype: rounded to bf16, m / ||W + dW|| would be off 1 by up to 0.4 % at init
        self.aira_moe_magnitude[adapter_name] = nn.Parameter(self._weight_norm(adapter_name))

    def _has_magnitude(self, adapter_name: str) -> bool:
        return "aira_moe_magnitude" in self._modules and adapter_name in self.aira_moe_magnitude

    def reset_magnitude(self, adapter_name: str) -> None:
        """Set the magnitude back to the row norms of the current W + dW (after an init changed both, so the layer's
        output is again exactly the base model's); no op without ``use_dora``."""
        if self._has_magnitude(adapter_name):
            with torch.no_grad():
                self.aira_moe_magnitude[adapter_name].copy_(self._weight_norm(adapter_name))

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """LoRA-style init: every A expert Kaiming-uniform, every B expert zero, so the update is exactly 0, then what
        the strategy added. With ``init_weights=False`` the B experts are random too (a non-zero update, for tests)."""
        experts_A, experts_B = self.aira_moe_A[adapter_name], self.aira_moe_B[adapter_name]
        with torch.no_grad():
            for expert in experts_A:  # (r, in) each: fan_in = in, as for nn.Linear
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if init_weights:
                experts_B.zero_()
            else:
                nn.init.normal_(experts_B, std=1.0 / math.sqrt(experts_B.shape[-1]))
            self.strategy[adapter_name].reset_parameters(self, adapter_name)

    def set_channel_scale(self, adapter_name: str, scale: torch.Tensor) -> None:
        """Set the fixed per-channel weights of the update (activation-aware weighting)."""
        expected = self.aira_moe_channel_scale[adapter_name].shape
        if scale.shape != expected:
            raise ValueError(f"channel scale for {self.layer_key} must have shape {tuple(expected)}, got {tuple(scale.shape)}")
        device = self.aira_moe_channel_scale[adapter_name].device
        self.aira_moe_channel_scale[adapter_name] = scale.detach().to(device=device, dtype=torch.float32)

    def set_initial_update(self, adapter_name: str, target_A: torch.Tensor, target_B: torch.Tensor) -> None:
        """Initialise the experts so that the collaborative update equals ``target_B @ target_A`` (before the channel
        weighting), then subtract the resulting initial update from the base weight so the output is unchanged.

        Every A_i = target_A and every B_j = target_B / (s * sum(M)): then ``s * sum_ji M[j,i] B_j A_i`` equals the
        target for any pairing M with that total -- including each sampled pairing of the 'random' strategy.
        """
        experts_A, experts_B = self.aira_moe_A[adapter_name], self.aira_moe_B[adapter_name]
        num_A, num_B = experts_A.shape[0], experts_B.shape[0]
        strategy = self.strategy[adapter_name]
        total = strategy.pairing_total(num_A, num_B)
        with torch.no_grad():
            experts_A.copy_(target_A.to(experts_A).unsqueeze(0).expand_as(experts_A))
            experts_B.copy_((target_B.to(torch.float32) / (self.scaling[adapter_name] * total)).to(experts_B).unsqueeze(0).expand_as(experts_B))
        factor_A, factor_B = strategy.initial_factors(self, adapter_name)
        self.aira_moe_init_A[adapter_name] = factor_A.detach().float().contiguous().clone()
        self.aira_moe_init_B[adapter_name] = factor_B.detach().float().contiguous().clone()
        self._sync_residual(adapter_name)
        self.reset_magnitude(adapter_name)  # the rounded W - dW0 + dW0 has slightly other norms than W

    def set_initial_directions(self, adapter_name: str, directions: torch.Tensor) -> None:
        """Start every A expert on its own block of rows of ``directions`` (num_A * r x in); B stays zero, so the update
        is zero and the base weight is untouched ('directions' AwSVD init). Distinct blocks keep the A experts of
        'heuristic' / 'random' from starting (and staying) identical."""
        experts_A = self.aira_moe_A[adapter_name]
        if directions.shape != (experts_A.shape[0] * experts_A.shape[1], experts_A.shape[2]):
            raise ValueError(f"directions for {self.layer_key} must have shape "
                             f"{(experts_A.shape[0] * experts_A.shape[1], experts_A.shape[2])}, got {tuple(directions.shape)}")
        with torch.no_grad():
            experts_A.copy_(directions.to(experts_A).view_as(experts_A))

    # ---------------------------------------------------------------- residual of the AwSVD init

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        weight = self.get_base_layer().weight
        with gathered([weight], modifier_rank=0), torch.no_grad():
            update = _transpose(delta, self.fan_in_fan_out).to(weight.device)
            weight.data = (weight.data.float() + update).to(weight.dtype)

    def _sync_residual(self, adapter_name: str) -> None:
        """Make the base weight hold W_original - init_B @ init_A for this adapter's saved initial factors (a quantised
        base weight cannot hold it exactly: there the forward subtracts init_B @ init_A itself, see forward)."""
        if adapter_name not in self.aira_moe_init_A or self.base_quantization is not None:
            return
        desired = (self.aira_moe_init_B[adapter_name], self.aira_moe_init_A[adapter_name])
        applied = self._residual_applied.get(adapter_name)
        if applied is not None and all(torch.equal(a, d) for a, d in zip(applied, desired)):
            return
        delta = -(desired[0].float() @ desired[1].float())
        if applied is not None:
            delta = delta + applied[0].float() @ applied[1].float()
        self._add_to_base_weight(delta)
        self._residual_applied[adapter_name] = (desired[0].detach().clone(), desired[1].detach().clone())

    def _restore_residual(self, adapter_name: str) -> None:
        """Add the initial update of ``adapter_name`` back into the base weight (undo ``_sync_residual``)."""
        applied = self._residual_applied.pop(adapter_name, None)
        if applied is not None:
            self._add_to_base_weight(applied[0].float() @ applied[1].float())

    # ---------------------------------------------------------------- math

    def _channel_weights(self, adapter_name: str, dtype: torch.dtype) -> tuple[dict, float]:
        """The fixed channel weights as fold arguments ({'in_scale' or 'out_scale': weight} or {}) with the scale
        pre-multiplied into them when there are some, and the scale left to apply (1.0 then)."""
        scaling = self.scaling[adapter_name]
        mode = self.activation_mode.get(adapter_name)
        if mode is None:
            return {}, scaling
        # an output weight is kept as a column (out, 1), ready to broadcast over B's columns without a view per call
        channel = self._cached_cast(adapter_name, "channel", self.aira_moe_channel_scale[adapter_name], scaling, dtype,
                                    as_column=mode == "outps")
        return {"in_scale" if mode == "inps" else "out_scale": channel}, 1.0

    def _dropout_input(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """What the adapter's A side reads: ``x`` after the adapter's dropout (no op without dropout)."""
        dropout = self.aira_moe_dropout[adapter_name]
        return x if isinstance(dropout, nn.Identity) else dropout(x)

    def _quantized_residual(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(init_A, -init_B) in ``dtype``: the AwSVD residual a quantised base's forward subtracts itself, since its
        weight cannot hold it (see _sync_residual)."""
        return (self._cached_cast(adapter_name, "init_A", self.aira_moe_init_A[adapter_name], 1.0, dtype),
                self._cached_cast(adapter_name, "init_B", self.aira_moe_init_B[adapter_name], -1.0, dtype))

    def _zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (shape, like.dtype, like.device)
        if key not in self._zeros_cache:
            self._zeros_cache[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._zeros_cache[key]

    def _cached_cast(
        self, adapter_name: str, kind: str, source: torch.Tensor, scaling: float, dtype: torch.dtype, as_column: bool = False
    ) -> torch.Tensor:
        """``source * scaling`` in ``dtype`` (``as_column``: shaped (n, 1)), recomputed only when ``source`` is replaced
        or changed in place (set_channel_scale, load_state_dict, .to()) or the scale, dtype or shape asked changes."""
        stamp = (source._version, scaling, dtype, as_column)
        cached = self._cast_cache.get((adapter_name, kind))
        if cached is None or cached[0] is not source or cached[1] != stamp:
            with torch.no_grad():
                wide = source.to(torch.promote_types(source.dtype, dtype))  # one rounding into dtype, after scaling
                value = (wide * scaling if scaling != 1 else wide).to(dtype)
                value = value.unsqueeze(1) if as_column else value
            cached = (source, stamp, value)
            self._cast_cache[(adapter_name, kind)] = cached
        return cached[2]

    def _adapted_weight(self, adapter_name: str, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(W + dW, dW) in the base weight's (out, in) layout, fp32 (or wider), without gradient: DoRA treats
        ||W + dW|| as a constant (section 4.3 of the paper; peft does the same), which keeps W + dW out of the autograd
        graph. Both are new tensors, so they outlive a ZeRO-3 gather of W."""
        weight = self.get_base_layer().weight
        wide = _wide_dtype(weight)
        with gathered([weight]), torch.no_grad():
            factor_A, factor_B = self.strategy[adapter_name].factors(self, adapter_name, training, wide)
            update = factor_B @ factor_A
            return _transpose(weight, self.fan_in_fan_out).to(wide) + update, update

    def _weight_norm(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """Row norms (out,) of W + dW, fp32 (or wider), without gradient."""
        return torch.linalg.vector_norm(self._adapted_weight(adapter_name, training)[0], dim=1)

    def _dora_scale(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """s = m / ||W + dW|| per output channel (out,), fp32 or wider: the output of W + dW is multiplied by it. Differentiable
        in m only."""
        norm = self._weight_norm(adapter_name, training)
        return self.aira_moe_magnitude[adapter_name].to(norm.dtype) / norm

    def _dora_output(self, adapter_name: str, base_output: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """What to add to the base output W x so that the sum is s * (W x + dW x)."""
        scale = self._dora_scale(adapter_name, self.training)
        # s - 1 before the cast: in bf16, s itself moves in steps of 2^-8, which would swallow small magnitude changes
        return (scale - 1).to(update.dtype) * base_output.to(update.dtype) + scale.to(update.dtype) * update

    def _dora_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, s) for merging a DoRA adapter into the current base weight W: W + delta = s * (W + dW) row-wise,
        delta in the layout and dtype of the base weight, s as an (out, 1) column (unmerging divides by it)."""
        adapted, update = self._adapted_weight(adapter_name)
        with torch.no_grad():
            scale = (self.aira_moe_magnitude[adapter_name].to(adapted.dtype) / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1)
            delta = (scale - 1) * adapted + update  # s (W + dW) - W
        return _transpose(delta, self.fan_in_fan_out).to(self.get_base_layer().weight.dtype), scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """dW of ``adapter_name`` in the layout of the base weight (eval pairing: E[M] for 'random'). With a magnitude
        (DoRA): what turns the current base weight W into s * (W + dW)."""
        if self._has_magnitude(adapter_name):
            return self._dora_delta(adapter_name)[0]
        device = self.aira_moe_B[adapter_name].device
        dtype = self.aira_moe_B[adapter_name].dtype
        # half precision matmul on CPU is slow or missing: compute in fp32, cast only the result back
        cast_to_fp32 = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        factor_A, factor_B = self.strategy[adapter_name].delta_weight_factors(self, adapter_name)
        if cast_to_fp32:
            factor_A, factor_B = factor_A.float(), factor_B.float()
        delta = _transpose(factor_B @ factor_A, self.fan_in_fan_out)
        return delta.to(dtype) if cast_to_fp32 else delta


class Linear(nn.Module, AiraMoeLayer):
    """AiraMoe around a frozen ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        step_counter: StepCounter | None = None,
        layer_key: str = "",
        fan_in_fan_out: bool = False,
        **update_kwargs: Any,
    ) -> None:
        super().__init__()
        AiraMoeLayer.__init__(self, base_layer, step_counter=step_counter, fan_in_fan_out=fan_in_fan_out)
        self.layer_key = layer_key
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update_kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for active_adapter in adapter_names:
            if active_adapter in self.strategy:  # refused before anything is merged
                self.strategy[active_adapter].refuse_token_dependent(f"merged into the weight of {self.layer_key}")
        if self.base_quantization is not None:
            raise UserError(
                f"cannot merge aira_moe into the {self.base_quantization} quantised weight of {self.layer_key}: load the "
                "unquantised base model and merge there (e.g. `llamafactory-cli export` without `quantization_bit`)"
            )
        base_layer = self.get_base_layer()
        for active_adapter in adapter_names:
            if active_adapter not in self.aira_moe_A:
                continue
            if self._has_magnitude(active_adapter):
                delta, self._merged_dora_scale[active_adapter] = self._dora_delta(active_adapter)
            else:
                delta = self.get_delta_weight(active_adapter)
            with gathered([base_layer.weight], modifier_rank=0):
                if safe_merge:
                    merged = base_layer.weight.data + delta.to(base_layer.weight.dtype)
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken")
                    base_layer.weight.data = merged
                else:
                    base_layer.weight.data += delta.to(base_layer.weight.dtype)
            self.merged_adapters.append(active_adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            active_adapter = self.merged_adapters.pop()
            if active_adapter in self._merged_dora_scale:
                self._unmerge_dora(active_adapter)
            elif active_adapter in self.aira_moe_A:
                with gathered([base_layer.weight], modifier_rank=0):
                    base_layer.weight.data -= self.get_delta_weight(active_adapter).to(base_layer.weight.dtype)

    def _unmerge_dora(self, adapter_name: str) -> None:
        """W = s * (W + dW) / s - dW, with the s of the merge (the norm of the merged weight is no longer W + dW's)."""
        weight = self.get_base_layer().weight
        scale = self._merged_dora_scale.pop(adapter_name).to(weight.device)  # the model may have moved since the merge
        with gathered([weight], modifier_rank=0), torch.no_grad():
            factor_A, factor_B = self.strategy[adapter_name].factors(self, adapter_name, False, scale.dtype)
            merged = _transpose(weight, self.fan_in_fan_out).to(scale.dtype)
            weight.data = _transpose(merged / scale - factor_B @ factor_A, self.fan_in_fan_out).to(weight.dtype)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Called by peft's unload/merge_and_unload: merging keeps the AwSVD residual (W - dW0 + dW is the trained
        weight); plain unloading restores the original base weight."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            if self.merged:
                self.unmerge()
            for adapter_name in list(self._residual_applied):
                self._restore_residual(adapter_name)
        return self.get_base_layer()

    def delete_adapter(self, adapter_name: str) -> None:
        self._restore_residual(adapter_name)
        for table in (self.strategy, self.strategy_options, self.activation_mode, self._merged_dora_scale):
            table.pop(adapter_name, None)
        for key in [key for key in self._cast_cache if key[0] == adapter_name]:
            del self._cast_cache[key]
        super().delete_adapter(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # peft's version also casts buffers to the base dtype; statistics and initial factors stay fp32 here
        weight = self.get_base_layer().weight
        device = device or weight.device
        if device.type == "meta":
            return
        for name in self.adapter_layer_names:
            table = getattr(self, name)
            # low_cpu_mem_usage: peft built the adapter on the meta device; loading assigns the real tensors
            if adapter_name in table and not table[adapter_name].is_meta:
                keep_dtype = name == "aira_moe_magnitude" or not weight.dtype.is_floating_point  # the magnitude stays fp32
                table[adapter_name] = nn.Parameter(
                    table[adapter_name].data.to(device, dtype=None if keep_dtype else weight.dtype),
                    requires_grad=table[adapter_name].requires_grad,
                )
        for name in ("aira_moe_channel_scale", "aira_moe_init_A", "aira_moe_init_B", "aira_moe_pairing"):
            table = getattr(self, name)
            if adapter_name in table and not table[adapter_name].is_meta:
                table[adapter_name] = table[adapter_name].to(device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
            return self._add_back_residuals(x, result, skip=())
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.aira_moe_A]
        base_output = self._output_without_bias(result) if any(self._has_magnitude(name) for name in active) else None
        if self._residual_applied:
            result = self._add_back_residuals(x, result, skip=active)
        device_type = x.device.type
        # the GEMMs run in the dtype autocast would pick (else x's): the small factors are cast, never x itself
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        rank_multiple = RANK_MULTIPLE.get(device_type, 1)
        for active_adapter in active:
            update = self.strategy[active_adapter].forward(self, active_adapter, x, compute_dtype, rank_multiple)
            if self._has_magnitude(active_adapter):
                update = self._dora_output(active_adapter, base_output, update)
            result = result + update.to(result.dtype)  # (..., out)
        return result

    def _output_without_bias(self, result: torch.Tensor) -> torch.Tensor:
        """W x from the base layer's output: DoRA rescales the weight's part, not the bias."""
        bias = getattr(self.get_base_layer(), "bias", None)
        return result if bias is None else result - bias

    def _add_back_residuals(self, x: torch.Tensor, result: torch.Tensor, skip) -> torch.Tensor:
        """The base weight lacks dW0 of every AwSVD-initialised adapter; add it back for adapters that are not
        running (disabled or inactive), so that disabling gives the original model."""
        for adapter_name, (init_B, init_A) in self._residual_applied.items():
            if adapter_name in skip:
                continue
            x_in = x.to(init_A.dtype)
            result = result + F.linear(F.linear(x_in, init_A), init_B).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "aira_moe." + super().__repr__()


def _resync_residuals_after_load(module: AiraMoeLayer, incompatible_keys) -> None:
    # peft loads adapter weights with load_state_dict; new initial factors must be re-subtracted from the base weight
    for adapter_name in list(module.aira_moe_init_A.keys()):
        module._sync_residual(adapter_name)
