"""The ``routed`` strategy: a per-token router mixes the experts, so the update depends on the token.

The experts of one layer are the num_A * num_B pairs (B_j, A_i); a router (a linear map of the layer input, E =
num_B * num_A outputs, expert e = j * num_A + i, the row-major order of the pairing M) gives each token softmax gates
g (num_B x num_A) and the update is

    dW(x) x = s * sum_j sum_i g[j, i](x) * B_j A_i x        (dense: the gates sum to one)

With ``top_k`` = k > 0 only the k largest gates of a token are kept, not renormalised (Switch-style: the router
still gets a gradient from the main loss at k = 1). The router reads the layer input (``router_input: layer``, E * (in +
1) parameters) or the experts' own down-projections h = [A_1 x, ..., A_num_A x], RMS-normalised (``projections``, E *
(num_A * r + 1)): at a fixed parameter count the second leaves the budget to the experts' rank (at SmolLM2's widths
the layer-input router takes 37 % of LoRA r=8's parameters), and the normalisation keeps its logits at the scale of
its init whatever the scale of h (AwSVD's directions read the massive channels). A constant router with gates
M / sum(M) is the fixed pairing M scaled by 1 / sum(M). Three token-sized GEMMs plus one batched mix, whatever num_A
and num_B:

    h = x @ A_cat.T                     (T, num_A * r)     A side, expert-major: h[:, i*r:(i+1)*r] = A_i x
    m = g @ h.view(T, num_A, r)         (T, num_B, r)      the gated mix, one bmm: m_j = sum_i g[j, i] A_i x
    y = m.view(T, num_B * r) @ B_cat.T  (T, out)           B side: column j*r + k of B_cat is B_j[:, k]

In training each routed layer records its gates' load-balancing loss in the model's ``RoutingLog``;
``AiraMoeModel.add_routing_loss`` adds them to the training loss.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..collaboration import scale_factors
from .base import CollaborationStrategy

# the router's per-adapter tables: trainable, so peft's set_adapter / delete_adapter / device moves must cover them
ROUTER_LAYER_NAMES = ("aira_moe_router_weight", "aira_moe_router_bias")


def router_parameters(num_A: int, num_B: int, in_features: int, router_input: str) -> tuple[int, int]:
    """(per unit of rank, fixed): the trainable parameters of one module's router, E (reads + 1) with E = num_A num_B
    and reads = in (``layer``) or num_A r (``projections``)."""
    experts = num_A * num_B
    if router_input == "projections":
        return experts * num_A, experts
    return 0, experts * (in_features + 1)


def routed_factors(
    experts_A: torch.Tensor,
    experts_B: torch.Tensor,
    *,
    scaling: float,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat: num_A*r x in, B_cat: out x num_B*r) in ``dtype``, with s and the fixed channel weights folded in."""
    num_A, r, in_features = experts_A.shape
    num_B, out_features, _ = experts_B.shape
    dtype = dtype or experts_A.dtype
    factor_A = experts_A.reshape(num_A * r, in_features).to(dtype)  # a view unless cast
    # (out, num_B, r): the reordering copy is the cast's own copy when the dtype changes
    by_out = experts_B.permute(1, 0, 2)
    by_out = by_out.contiguous() if dtype == by_out.dtype else by_out.to(dtype, memory_format=torch.contiguous_format)
    factor_B = by_out.view(out_features, num_B * r)
    return scale_factors(factor_A, factor_B, scaling=scaling, in_scale=in_scale, out_scale=out_scale, dtype=dtype)


def router_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gates, probs, dispatch) from router logits (..., E), all in fp32 or wider: probs = softmax(logits); gates = probs, or
    with ``top_k`` > 0 the top_k largest probs of each token (others 0, not renormalised); dispatch: one-hot of the
    chosen experts (of the argmax when dense), what the load-balancing loss counts."""
    # at least fp32 (a half-precision cast fused into the softmax)
    probs = logits.softmax(-1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    num_experts = probs.shape[-1]
    chosen = probs.topk(top_k if 0 < top_k < num_experts else 1, dim=-1).indices
    dispatch = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    if 0 < top_k < num_experts:
        gates = probs * dispatch
    else:
        gates = probs
    return gates, probs, dispatch


ROUTER_RMS_EPS = 1e-6


def rms_normalized(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` / its RMS over the last dimension (no weight): what a ``projections`` router reads."""
    wide = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # the mean of squares in fp32 or wider
    return hidden * wide.pow(2).mean(-1, keepdim=True).add(ROUTER_RMS_EPS).rsqrt().to(hidden.dtype)


def routed_update(
    x: torch.Tensor,
    factor_A: torch.Tensor,
    factor_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    num_A: int,
    num_B: int,
    top_k: int,
    *,
    router_input: str = "layer",
    layer_input: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(update (..., out), probs (T, E), dispatch (T, E)) of the routed experts on ``x`` (..., in). The router reads
    ``layer_input`` (``router_input`` "layer": the layer input before adapter dropout, ``router_weight`` E x in) or
    the RMS-normalised projections h = x @ factor_A.T ("projections": ``router_weight`` E x num_A * r)."""
    hidden = F.linear(x, factor_A)  # (..., num_A * r)
    if router_input == "projections":
        reads = rms_normalized(hidden)
    elif router_input == "layer" and layer_input is not None:
        reads = layer_input
    else:
        raise ValueError(f"router_input={router_input!r} with layer_input "
                         f"{'given' if layer_input is not None else 'None'}: 'layer' needs the layer input, "
                         "'projections' reads the experts' projections")
    logits = F.linear(reads, router_weight, router_bias)
    gates, probs, dispatch = router_gates(logits.reshape(-1, num_B * num_A), top_k)  # (T, E)
    rank = hidden.shape[-1] // num_A
    mixed = torch.bmm(gates.view(-1, num_B, num_A).to(hidden.dtype), hidden.reshape(-1, num_A, rank))  # (T, num_B, r)
    update = F.linear(mixed.view(*x.shape[:-1], num_B * rank), factor_B)  # (..., out)
    return update, probs, dispatch


def load_balancing_loss(probs: torch.Tensor, dispatch: torch.Tensor, per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, load): Switch Transformer's auxiliary loss E * sum_e f_e P_e over the tokens (T, E) of one layer, with
    f_e the fraction of the dispatches that went to expert e (``per_token`` dispatches per token; ``load`` is
    per_token * f, detached) and P_e the mean gate probability of e. 1 when the load is uniform, E when every token goes to one expert;
    differentiable through P."""
    num_experts = probs.shape[-1]
    load = dispatch.mean(0)  # (E,): sums to per_token
    loss = (load * probs.mean(0)).sum() * (num_experts / per_token)
    return loss, load.detach()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (T, E) of the gate distribution's entropy (nats; log E when uniform, 0 when one-hot)."""
    return torch.special.xlogy(probs, probs).sum() * (-1.0 / probs.shape[0])


class RoutingLog:
    """What the routed layers of one model recorded: the load-balancing losses of the current training step, per
    adapter (with their graph, for the training loss), and the detached statistics since the last ``summary`` (kept
    on the device: recording launches no kernel of its own and never waits for it)."""

    FOLD_AFTER = 1024  # records kept before they are summed into one (bounded memory when nobody reads them)

    def __init__(self) -> None:
        self.step: Optional[int] = None  # the training step (StepCounter.value) the losses belong to
        self.losses: dict[str, list[torch.Tensor]] = {}
        # a trainable router ran without autograd (reentrant gradient checkpointing's first pass): its loss has no graph
        self.detached = False
        self._records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (loss, entropy, load (E,))
        self._count = 0

    def record(self, step: int, adapter_name: str, probs: torch.Tensor, dispatch: torch.Tensor, per_token: int,
               detached: bool = False) -> None:
        if step != self.step:  # the first record of a new training step
            self.step, self.losses, self.detached = step, {}, False
        loss, load = load_balancing_loss(probs, dispatch, per_token)
        self.losses.setdefault(adapter_name, []).append(loss)
        self.detached = self.detached or detached
        self._records.append((loss.detach(), routing_entropy(probs.detach()), load))
        self._count += 1
        if len(self._records) >= self.FOLD_AFTER:
            self._records = [tuple(torch.stack(column).sum(0) for column in zip(*self._records))]

    def loss(self, step: int, coefficient: Callable[[str], float]) -> Optional[torch.Tensor]:
        """The training loss term of step ``step``: per adapter, ``coefficient(adapter)`` times the mean of its layers'
        losses, summed over adapters; None when no routed layer ran in that step."""
        if step != self.step or not self.losses:
            return None
        if self.detached and torch.is_grad_enabled():
            raise RuntimeError(
                "the routed adapter's load-balancing loss was computed without autograd, so it cannot train the router: "
                "reentrant gradient checkpointing runs the layers under no_grad; use non-reentrant checkpointing "
                "(gradient_checkpointing_kwargs={'use_reentrant': False}; LLaMA-Factory: `use_reentrant_gc: false`)"
            )
        device = next(iter(self.losses.values()))[0].device
        total = None
        for adapter_name, losses in self.losses.items():
            term = coefficient(adapter_name) * torch.stack([loss.to(device) for loss in losses]).mean()
            total = term if total is None else total + term
        return total

    def summary(self) -> dict[str, float]:
        """Means since the last call (then reset): router_aux_loss, routing_entropy (nats), and the expert load as
        the smallest and largest fraction of dispatches times E (1 = balanced). Empty when nothing was recorded."""
        if not self._count:
            return {}
        loss, entropy, load = (torch.stack(column).sum(0) / self._count for column in zip(*self._records))
        load = load * (load.numel() / load.sum())  # E * f_e
        self._records, self._count = [], 0
        return {"router_aux_loss": loss.item(), "routing_entropy": entropy.item(),
                "expert_load_min": load.min().item(), "expert_load_max": load.max().item()}


class RoutedStrategy(CollaborationStrategy):
    """A per-token router mixes the num_A * num_B pairs (B_j, A_i) with softmax gates: three token-sized GEMMs and one
    batched mix (``routed_update``); the update depends on the token, so merge and LoRA export are refused. The router
    tables are made on a layer's first routed adapter only."""

    name = "routed"
    token_dependent = True
    token_dependence = "a per-token router mixes the experts"

    def init(self, layer, adapter_name, num_A, num_B):
        if "aira_moe_router_weight" not in layer._modules:
            # every submodule, even an empty ParameterDict, costs host time on each of the Trainer's per-step walks
            # over the model (train(), parameters()), ~50 Python calls a step per table (tests/test_op_count.py)
            layer.aira_moe_router_weight = nn.ParameterDict({})  # adapter -> (num_B * num_A, in or num_A * r)
            layer.aira_moe_router_bias = nn.ParameterDict({})  # adapter -> (num_B * num_A,)
            # an instance attribute, as peft's DoRA does: set_adapter / delete_adapter / device moves cover the router
            layer.adapter_layer_names = (*type(layer).adapter_layer_names, *ROUTER_LAYER_NAMES)
        projections = self._router_input(layer, adapter_name) == "projections"
        reads = num_A * layer.r[adapter_name] if projections else layer.in_features
        layer.aira_moe_router_weight[adapter_name] = nn.Parameter(torch.empty(num_B * num_A, reads))
        layer.aira_moe_router_bias[adapter_name] = nn.Parameter(torch.zeros(num_B * num_A))

    @staticmethod
    def _router_input(layer, adapter_name) -> str:
        return layer.strategy_options[adapter_name].get("router_input", "layer")

    def reset_parameters(self, layer, adapter_name):
        # nn.Linear's init, from the same seeded generator as the A experts: random, so that pairs sharing an A do not
        # start with equal gates (with B = 0 they would get equal gradients and stay equal)
        nn.init.kaiming_uniform_(layer.aira_moe_router_weight[adapter_name], a=math.sqrt(5))
        layer.aira_moe_router_bias[adapter_name].zero_()

    def forward(self, layer, adapter_name, x, dtype, rank_multiple):
        """Not padded to ``rank_multiple``; in training the gates' load-balancing loss and statistics are recorded in
        the model's RoutingLog, for its training loss and log."""
        experts_A, experts_B = layer.aira_moe_A[adapter_name], layer.aira_moe_B[adapter_name]
        channel, scaling = layer._channel_weights(adapter_name, dtype)
        factor_A, factor_B = routed_factors(experts_A, experts_B, scaling=scaling, dtype=dtype, **channel)
        router_weight = layer.aira_moe_router_weight[adapter_name]
        num_A, num_B = experts_A.shape[0], experts_B.shape[0]
        top_k = layer.strategy_options[adapter_name].get("router_top_k", 0)
        update, probs, dispatch = routed_update(
            layer._dropout_input(adapter_name, x), factor_A, factor_B, router_weight.to(dtype),
            layer.aira_moe_router_bias[adapter_name].to(dtype), num_A, num_B, top_k,
            router_input=self._router_input(layer, adapter_name), layer_input=x,
        )
        if layer.training:
            counter = layer.step_counter
            counter.routing.record(counter.value, adapter_name, probs, dispatch,
                                   per_token=top_k if 0 < top_k < num_A * num_B else 1,
                                   detached=router_weight.requires_grad and not torch.is_grad_enabled())
        if layer.base_quantization is not None and adapter_name in layer.aira_moe_init_A:  # as the fixed strategies
            residual_A, residual_B = layer._quantized_residual(adapter_name, dtype)
            update = update + F.linear(F.linear(x, residual_A), residual_B)
        return update

    def delta_weight_factors(self, layer, adapter_name):
        self.refuse_token_dependent(f"merged into the weight of {layer.layer_key}")

    def initial_factors(self, layer, adapter_name):
        # every pair equals the target and every token's (dense) gates sum to one: the update of one pair
        experts_A, experts_B = layer.aira_moe_A[adapter_name], layer.aira_moe_B[adapter_name]
        channel, scaling = layer._channel_weights(adapter_name, experts_A.dtype)
        return routed_factors(experts_A[:1], experts_B[:1], scaling=scaling, **channel)

    def fold(self, experts_A, experts_B, *, scaling, pairing=None, in_scale=None, out_scale=None, dtype=None):
        self.refuse_token_dependent("folded into one weight update")

    def pairing_total(self, num_A, num_B):
        return 1.0  # dense softmax gates sum to one
