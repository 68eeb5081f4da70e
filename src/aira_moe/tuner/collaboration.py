"""Collaboration of A and B experts, as pure tensor functions.

The update of one layer is ``dW = s * sum_j sum_i M[j, i] * B_j @ A_i`` with M (num_B x num_A) >= 0.
Instead of looping over pairs, the experts are folded into one effective factor pair (A_eff, B_eff) in weight space
(cheap: no token dimension) and the input goes through two GEMMs, ``x @ A_eff.T @ B_eff.T``:

* M all-equal (``full`` strategy, and ``random`` in eval where M = E[M] = 1/num_B): the double sum factorises,
  ``sum_ji c B_j A_i = c (sum_j B_j)(sum_i A_i)``, so A_eff = sum_i A_i (r x in) and B_eff = c sum_j B_j -- one
  LoRA-sized pair.
* otherwise: A_eff = [A_1; ...; A_num_A] (num_A*r x in) and B_eff = B_cat (M kron I_r), whose i-th column block is
  sum_j M[j, i] B_j.
"""

from __future__ import annotations

import math
import random

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


def random_pairing_indices(num_A: int, num_B: int, seed: int, layer_key: str, step: int) -> list[int]:
    """For the ``random`` strategy: the B index paired with each A at one training step.

    A pure function of (seed, layer, step), so every data-parallel rank (and a gradient-checkpointing recompute of
    the same step) draws the same pairing without communicating. String seeds are hashed with SHA-512 by
    ``random.Random``, which is stable across processes.
    """
    rng = random.Random(f"{seed}:{layer_key}:{step}")
    return [rng.randrange(num_B) for _ in range(num_A)]


def pairing_from_indices(indices: list[int], num_B: int) -> torch.Tensor:
    """M (num_B x num_A) with M[indices[i], i] = 1."""
    pairing = torch.zeros(num_B, len(indices))
    pairing[indices, list(range(len(indices)))] = 1.0
    return pairing


def effective_factors(
    experts_A: torch.Tensor,
    experts_B: torch.Tensor,
    *,
    strategy: str,
    scaling: float,
    pairing: torch.Tensor | None = None,
    random_indices: list[int] | None = None,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the experts into (A_eff, B_eff) with ``dW = B_eff @ A_eff``.

    experts_A: (num_A, r, in); experts_B: (num_B, out, r).
    strategy 'full' uses M = ones; 'random' uses ``random_indices`` (training) or E[M] = 1/num_B (when None);
    'heuristic' uses ``pairing`` (num_B x num_A).
    The scaling s and the optional fixed channel weights are folded in: dW = s * diag(out_scale) B.. A.. diag(in_scale).
    """
    num_A, r, in_features = experts_A.shape
    num_B, out_features, _ = experts_B.shape
    if strategy == "full" or (strategy == "random" and random_indices is None):
        factor_A = experts_A.sum(0)  # (r, in)
        factor_B = experts_B.sum(0)  # (out, r)
        if strategy == "random":
            factor_B = factor_B / num_B  # E[M] = 1/num_B everywhere
    elif strategy == "random":
        factor_A = experts_A.reshape(num_A * r, in_features)  # (num_A*r, in)
        index = torch.as_tensor(random_indices, device=experts_B.device)
        factor_B = experts_B.index_select(0, index).permute(1, 0, 2).reshape(out_features, num_A * r)
    elif strategy == "heuristic":
        factor_A = experts_A.reshape(num_A * r, in_features)  # (num_A*r, in)
        blocks = torch.einsum("ji,jor->oir", pairing.to(experts_B.dtype), experts_B)  # (out, num_A, r)
        factor_B = blocks.reshape(out_features, num_A * r)  # (out, num_A*r)
    else:
        raise ValueError(f"`cola_strategy` must be one of ['full', 'heuristic', 'random'], got {strategy!r}.")
    if in_scale is not None:
        factor_A = factor_A * in_scale.to(factor_A.dtype)  # (R, in) * (in,)
    factor_B = factor_B * scaling
    if out_scale is not None:
        factor_B = factor_B * out_scale.to(factor_B.dtype).unsqueeze(1)  # (out, R) * (out, 1)
    return factor_A, factor_B


def adapter_scaling(lora_alpha: float, r: int, use_rslora: bool, scaling_rank: int | None = None) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; ``scaling_rank`` replaces r when given
    (``layer_scaling='base'``: the configured r, not the allocated one)."""
    rank = scaling_rank or r
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def pairing_total(strategy: str, num_A: int, num_B: int) -> float:
    """Sum of the entries of M (of every sampled M for 'random'): used to spread a target update over the copies."""
    if strategy == "full":
        return float(num_A * num_B)
    if strategy == "heuristic":
        return float(num_B)
    return float(num_A)  # random: each A is paired with exactly one B
