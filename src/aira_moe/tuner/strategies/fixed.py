"""The strategies with a pairing M (num_B x num_A) that ignores the token: ``full``, ``heuristic``, ``random``. Their
update is the fold of the experts into one factor pair in weight space (``collaboration.fold_experts``), so the forward
is two token-sized GEMMs, and merge and LoRA export are exact."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..collaboration import concat_padded, fold_experts, heuristic_pairing
from .base import CollaborationStrategy


class FixedPairing(CollaborationStrategy):
    """A strategy whose update is ``fold`` of the experts with a pairing M: subclasses say which M (``fold``, and
    ``pairing`` for the M a layer folds with in a forward)."""

    # the fold runs a GEMM (over M), which autocast must not touch; a sum-only fold needs no autocast switch
    fold_has_gemm: bool = True

    def pairing(self, layer, adapter_name: str, training: bool, scaling: float):
        """(M the layer folds with in this forward, or None for the eval pairing; the scale left to apply)."""
        return None, scaling

    def factors(self, layer, adapter_name: str, training: bool, dtype: Optional[torch.dtype] = None):
        """(A_eff, B_eff) of a layer's adapter in ``dtype`` (default: the experts'). The scale is pre-multiplied into a
        fixed channel weight or pairing when there is one, so a training step spends no kernel on it."""
        experts_A, experts_B = layer.aira_moe_A[adapter_name], layer.aira_moe_B[adapter_name]
        dtype = dtype or experts_A.dtype
        channel, scaling = layer._channel_weights(adapter_name, dtype)
        pairing, scaling = self.pairing(layer, adapter_name, training, scaling)
        return self.fold(experts_A, experts_B, scaling=scaling, pairing=pairing, dtype=dtype, **channel)

    def forward(self, layer, adapter_name, x, dtype, rank_multiple):
        device_type = x.device.type
        if self.fold_has_gemm and torch.is_autocast_enabled(device_type):
            # the pairing GEMM must not be autocast: the folding casts exactly once, to dtype. Inside an enclosing
            # autocast region, switching the flag is all torch.autocast(enabled=False) would do; its Python context
            # manager costs as much host time as the rest of the fold
            torch.set_autocast_enabled(device_type, False)
            try:
                factor_A, factor_B = self.factors(layer, adapter_name, layer.training, dtype)
            finally:
                torch.set_autocast_enabled(device_type, True)
        else:  # sums, products and casts only, which autocast leaves alone
            factor_A, factor_B = self.factors(layer, adapter_name, layer.training, dtype)
        blocks_A, blocks_B = [factor_A], [factor_B]
        if layer.base_quantization is not None and adapter_name in layer.aira_moe_init_A:
            # the AwSVD residual of a quantised base, kept out of its weight: s BA - B0 A0 as one pair of GEMMs of
            # rank R + R0
            residual_A, residual_B = layer._quantized_residual(adapter_name, dtype)
            blocks_A.append(residual_A)
            blocks_B.append(residual_B)
        if len(blocks_A) > 1 or rank_multiple > 1:  # (the common unpadded case makes no call)
            factor_A, factor_B = concat_padded(blocks_A, blocks_B, rank_multiple, layer._zeros)
        hidden = F.linear(layer._dropout_input(adapter_name, x), factor_A)  # (..., R)
        return F.linear(hidden, factor_B)  # (..., out)

    def delta_weight_factors(self, layer, adapter_name):
        return self.factors(layer, adapter_name, training=False)

    def initial_factors(self, layer, adapter_name):
        return self.factors(layer, adapter_name, training=False)


class FullStrategy(FixedPairing):
    """M = all ones: (sum B)(sum A), one LoRA-sized pair (what CoLA ships)."""

    name = "full"
    fold_has_gemm = False

    def fold(self, experts_A, experts_B, *, scaling, pairing=None, in_scale=None, out_scale=None, dtype=None):
        return fold_experts(experts_A, experts_B, scaling=scaling, in_scale=in_scale, out_scale=out_scale, dtype=dtype)

    def pairing_total(self, num_A, num_B):
        return float(num_A * num_B)

    def config_note(self, num_A, num_B, r):
        """With more than one expert, ``full`` trains exactly a rank-r LoRA (the derivation: docs/method.md)."""
        if num_A * num_B <= 1:
            return None
        return (f"cola_strategy 'full' with num_A={num_A}, num_B={num_B} trains exactly a rank-{r} LoRA (each layer's "
                f"allocated rank with layer-wise rank) started at A=sum(A_i), B=sum(B_j) with {num_A}x the learning "
                f"rate on A and {num_B}x on B (weight decay and an active gradient clip differ slightly): no capacity "
                f"beyond rank {r}, for between {min(num_A, num_B)}x and {max(num_A, num_B)}x its trainable parameters "
                f"and optimizer state; `heuristic`/`random` reach rank {min(num_A, num_B) * r}, and "
                "`num_A: 1, num_B: 1` spends the same parameters on a higher rank (docs/method.md).")


class HeuristicStrategy(FixedPairing):
    """Each B bound to one A (``heuristic_pairing``), kept as the layer's pairing buffer: rank num_A * r."""

    name = "heuristic"

    def init(self, layer, adapter_name, num_A, num_B):
        layer.aira_moe_pairing[adapter_name] = heuristic_pairing(num_A, num_B)

    def pairing(self, layer, adapter_name, training, scaling):
        # the scale folded into the buffer once (cached), not into the experts every step
        pairing = layer._cached_cast(adapter_name, "pairing", layer.aira_moe_pairing[adapter_name], scaling,
                                     layer.aira_moe_B[adapter_name].dtype)
        return pairing, 1.0

    def fold(self, experts_A, experts_B, *, scaling, pairing=None, in_scale=None, out_scale=None, dtype=None):
        if pairing is None:
            pairing = heuristic_pairing(experts_A.shape[0], experts_B.shape[0])
        return fold_experts(experts_A, experts_B, scaling=scaling, pairing=pairing, in_scale=in_scale,
                            out_scale=out_scale, dtype=dtype)

    def pairing_total(self, num_A, num_B):
        return float(num_B)

    def initial_width(self, r, num_A):
        return num_A * r

    def config_note(self, num_A, num_B, r):
        """``heuristic`` trains exactly LoRA blocks of rank r, one per A expert that drives a B, block i's B learning
        k_i x faster (k_i B experts bound to A_i get the same gradient: from equal starts they stay equal, so k_i - 1
        of them are copies). The derivation: docs/method.md."""
        if num_A * num_B <= 1:
            return None
        bound = heuristic_pairing(num_A, num_B).sum(0).long().tolist()  # k_i: the B experts each A drives
        blocks = sum(k > 0 for k in bound)
        note = (f"cola_strategy 'heuristic' with num_A={num_A}, num_B={num_B} trains exactly a rank-{blocks * r} LoRA "
                f"({blocks} block{'s' if blocks > 1 else ''} of rank {r}, each layer's allocated rank with layer-wise "
                "rank)")
        if max(bound) == 1:
            note += " with one learning rate, no copies"
        else:
            copies = num_B - blocks
            note += (f" whose blocks' B learn at {', '.join(f'{k}x' for k in bound if k > 0)} the learning rate: "
                     f"{copies} of the {num_B} B experts {'is a copy' if copies == 1 else 'are copies'} (B experts bound "
                     "to one A get the same gradient and stay equal)")
        idle = num_A - blocks
        if idle:
            note += (f"; {idle} of the {num_A} A experts "
                     + ("drives no B and never learns" if idle == 1 else "drive no B and never learn"))
        if max(bound) > 1 or idle:
            note += "; `num_A: 1, num_B: 1` spends the same parameters on a LoRA of higher rank without copies"
        return note + " (docs/method.md)."


class RandomStrategy(FixedPairing):
    """Each A paired with one random B per training step, drawn once per step for every layer of the model
    (``StepCounter.pairings``, seeded by ``cola_seed``); eval and merge use E[M] = 1/num_B."""

    name = "random"

    def pairing(self, layer, adapter_name, training, scaling):
        if not training:
            return None, scaling
        experts_A, experts_B = layer.aira_moe_A[adapter_name], layer.aira_moe_B[adapter_name]
        tables = layer.step_counter.pairings(layer.strategy_options[adapter_name].get("cola_seed", 0),
                                             experts_A.shape[0], experts_B.shape[0], experts_B.device)
        return tables[layer.pairing_row], scaling

    def fold(self, experts_A, experts_B, *, scaling, pairing=None, in_scale=None, out_scale=None, dtype=None):
        if pairing is None:  # no sampled M (eval, merge, export): E[M] = 1/num_B everywhere, the sum form
            scaling = scaling / experts_B.shape[0]
        return fold_experts(experts_A, experts_B, scaling=scaling, pairing=pairing, in_scale=in_scale,
                            out_scale=out_scale, dtype=dtype)

    def pairing_total(self, num_A, num_B):
        return float(num_A)  # each A is paired with exactly one B
