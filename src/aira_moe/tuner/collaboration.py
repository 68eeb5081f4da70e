"""Collaboration of A and B experts, as pure tensor functions (the strategies that use them: tuner/strategies/).

The update of one layer is ``dW = s * sum_j sum_i M[j, i] * B_j @ A_i`` with M (num_B x num_A) >= 0.
Instead of looping over pairs, the experts are folded into one effective factor pair (A_eff, B_eff) in weight space
(cheap: no token dimension) and the input goes through two GEMMs, ``x @ A_eff.T @ B_eff.T``:

* M all-equal (``full`` strategy, and ``random`` in eval where M = E[M] = 1/num_B): the double sum factorises,
  ``sum_ji c B_j A_i = c (sum_j B_j)(sum_i A_i)``, so A_eff = sum_i A_i (r x in) and B_eff = c sum_j B_j -- one
  LoRA-sized pair.
* otherwise: A_eff stacks the rows of every A_i (num_A*r x in) and B_eff (out x num_A*r) has, in the matching column,
  sum_j M[j, i] B_j -- B_cat (M kron I_r) up to the order of the inner dimension, which the product does not see.
  That order is rank-major (row k*num_A + i holds row k of A_i): then B_eff is one GEMM of the flattened experts
  with M, already in its final layout, where expert-major order needs a permuted copy (and another in backward).
"""

from __future__ import annotations

import hashlib
import math

import torch


def heuristic_pairing(num_A: int, num_B: int) -> torch.Tensor:
    """M for the ``heuristic`` strategy: with k = num_B // num_A, A_i drives B_{i*k} .. B_{i*k+k-1}; a leftover B
    with index idx >= num_A*k pairs with A_{idx - num_A*k}. Every row (B) has exactly one 1."""
    k = num_B // num_A
    pairing = torch.zeros(num_B, num_A)
    for j in range(num_B):
        i = j // k if j < num_A * k else j - num_A * k
        pairing[j, i] = 1.0
    return pairing


def random_pairings(seed: int, step: int, num_layers: int, num_A: int, num_B: int, device) -> torch.Tensor:
    """For the ``random`` strategy: the pairing M (num_B x num_A, one 1 per column: each A drives one B) of every layer
    at training step ``step``, stacked as (num_layers, num_B, num_A).

    One draw per step for the whole model, on ``device``, from a generator seeded by (seed, step) alone: every
    data-parallel rank (on the same device type) and every gradient-checkpointing recompute of that step get the same
    pairings without communicating, and nothing is copied from the host per module.
    """
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    chosen = torch.randint(num_B, (num_layers, 1, num_A), generator=generator, device=device)
    return (torch.arange(num_B, device=device).view(1, num_B, 1) == chosen).float()


def fold_experts(
    experts_A: torch.Tensor,
    experts_B: torch.Tensor,
    *,
    scaling: float,
    pairing: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one fold of the experts into (A_eff, B_eff) with ``dW = B_eff @ A_eff``, both in ``dtype`` (default: the
    experts'), for a fixed pairing M (num_B x num_A): ``pairing``, or all ones when None (the sum form).

    experts_A: (num_A, r, in); experts_B: (num_B, out, r). The scaling s and the optional fixed channel weights are
    folded in: dW = s * diag(out_scale) B.. A.. diag(in_scale); ``in_scale`` has shape (in,), ``out_scale`` (out,) or
    (out, 1).

    Written for few kernels (a training step runs this for every module): casts to ``dtype`` happen inside the ops
    that fold the experts, so only the small factors are cast, never the token-sized input; s is multiplied into a
    channel weight or M when there is one (no gradient flows there, so no backward kernel).
    """
    num_A, r, in_features = experts_A.shape
    num_B, out_features, _ = experts_B.shape
    dtype = dtype or experts_A.dtype
    summed = pairing is None
    if not summed:
        pairing = pairing.to(experts_B.dtype)
    if scaling != 1 and in_scale is None and out_scale is None and not summed:
        pairing, scaling = pairing * scaling, 1  # no channel weight to carry s: M does
    if summed:
        factor_A = experts_A.sum(0, dtype=dtype)  # (r, in)
        factor_B = experts_B.sum(0, dtype=dtype)  # (out, r)
    else:
        # rank-major rows, (r, num_A, in): the reordering copy is the cast's own copy (under autocast dtype differs);
        # to() with an unchanged dtype returns the transposed view even when asked for a contiguous one
        by_rank = experts_A.transpose(0, 1)
        by_rank = by_rank.contiguous() if dtype == by_rank.dtype else by_rank.to(dtype, memory_format=torch.contiguous_format)
        factor_A = by_rank.view(r * num_A, in_features)
        # (num_B, out*r).T @ M is (out*r, num_A) = (out, r, num_A): column k*num_A + i of B_eff is sum_j M[j, i] B_j[:, k]
        mixed = experts_B.reshape(num_B, out_features * r).T @ pairing
        # viewed before the cast: a padded B_eff's gradient reaches the cast as a column slice, which the cast's
        # backward copies contiguous anyway (a view after the cast would need a copy of its own)
        factor_B = mixed.view(out_features, r * num_A).to(dtype)
    return scale_factors(factor_A, factor_B, scaling=scaling, in_scale=in_scale, out_scale=out_scale, dtype=dtype)


def scale_factors(factor_A: torch.Tensor, factor_B: torch.Tensor, *, scaling: float, in_scale: torch.Tensor | None,
                  out_scale: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded factors (A: (R, in), B: (out, R)) times the fixed channel weights and s, as
    dW = s * diag(out_scale) B A diag(in_scale): s goes into a channel weight when there is one (no gradient flows
    there, so no backward kernel), else onto B. Shared by every fold (``fold_experts``,
    ``strategies.routed.routed_factors``)."""
    if scaling != 1:
        if in_scale is not None:
            in_scale, scaling = in_scale * scaling, 1
        elif out_scale is not None:
            out_scale, scaling = out_scale * scaling, 1
    if in_scale is not None:
        factor_A = factor_A * in_scale.to(dtype)  # (R, in) * (in,)
    if out_scale is not None:
        column = out_scale if out_scale.dim() == 2 else out_scale.unsqueeze(1)
        factor_B = factor_B * column.to(dtype)  # (out, R) * (out, 1)
    if scaling != 1:
        factor_B = factor_B * scaling
    return factor_A, factor_B


def concat_padded(
    blocks_A: list[torch.Tensor], blocks_B: list[torch.Tensor], multiple: int = 1, zeros=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (A, B) with B A = sum_k B_k A_k: rows of the A_k (R_k x in) stacked, columns of the B_k (out x R_k)
    side by side, then zero rows of A / columns of B up to R a multiple of ``multiple`` (B A unchanged): tensor-core
    GEMMs are slow on a (tokens x R) operand whose rows are not 16-byte aligned.

    ``zeros(shape, like)``: a zero tensor of ``shape`` with ``like``'s dtype and device, e.g. from a cache (saves
    the fill kernel every step); default a new one. Padding is one cat per factor, whose backward is a view -- F.pad
    would fill and copy (two kernels) and copy again in backward.
    """
    missing = -sum(map(len, blocks_A)) % multiple  # (len: rows; no generator frame per call)
    if missing:
        make = zeros or (lambda shape, like: like.new_zeros(shape))
        blocks_A = [*blocks_A, make((missing, blocks_A[0].shape[1]), blocks_A[0])]
        blocks_B = [*blocks_B, make((blocks_B[0].shape[0], missing), blocks_B[0])]
    if len(blocks_A) == 1:
        return blocks_A[0], blocks_B[0]
    return torch.cat(blocks_A), torch.cat(blocks_B, dim=1)


def adapter_scaling(lora_alpha: float, r: int, use_rslora: bool, scaling_rank: int | None = None) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; ``scaling_rank`` replaces r when given
    (``layer_scaling='base'``: the configured r, not the allocated one)."""
    rank = scaling_rank or r
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank
