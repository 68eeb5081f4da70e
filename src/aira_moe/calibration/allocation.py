"""Layer-wise rank allocation: an exact integer solve of max sum_l theta_l f(r_l) under a rank budget."""

from __future__ import annotations

import math

import numpy as np

OBJECTIVES = {
    "log": math.log,
    "linear": float,
    "exp2": lambda r: float(r) ** 2,
    "cubic": lambda r: float(r) ** 3,
}


def check_rank_bounds(min_rank: int, max_rank: int) -> None:
    """The one check of ``min_rank`` / ``max_rank`` (the config runs it at construction, the solver before solving)."""
    if min_rank < 1:
        raise ValueError(f"`min_rank` must be >= 1, got {min_rank}.")
    if min_rank > max_rank:
        raise ValueError(f"`min_rank` ({min_rank}) must be <= `max_rank` ({max_rank}).")


def check_budget(budget: int, num_units: int, min_rank: int, max_rank: int) -> None:
    """Raise ValueError, naming the keys and numbers, when no allocation can satisfy the constraints."""
    check_rank_bounds(min_rank, max_rank)
    if num_units < 1:
        raise ValueError("rank allocation needs at least one adapted layer; `target_modules` matched none")
    low, high = num_units * min_rank, num_units * max_rank
    if not low <= budget <= high:
        raise ValueError(
            f"`rank_budget`={budget} cannot be met by {num_units} layers with `min_rank`={min_rank} and "
            f"`max_rank`={max_rank}: it must lie in [{low}, {high}] (num_layers * min_rank, num_layers * max_rank)."
        )


def resolve_budget(rank_budget, num_units: int, r: int, min_rank: int, max_rank: int) -> int:
    """``rank_budget`` as an int ('auto' means num_units * r, the parameter count of uniform rank r), checked against
    the rank bounds: a budget no allocation can meet is an error here, before any forward pass."""
    budget = num_units * r if rank_budget == "auto" else int(rank_budget)
    check_budget(budget, num_units, min_rank, max_rank)
    return budget


def allocate_ranks(theta: list[float], budget: int, min_rank: int, max_rank: int, objective: str) -> list[int]:
    """Exact optimum of  max sum_l theta_l f(r_l)  s.t.  sum_l r_l = budget, min_rank <= r_l <= max_rank, r_l integer.

    Solved as a multiple-choice knapsack with binaries x_{l,k} ("layer l gets rank k"), one choice per layer, by
    HiGHS (scipy.optimize.milp). Exact for any f, including the convex exp2/cubic where continuous solvers fail.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # here, not at import: every peft user loads this module

    if objective not in OBJECTIVES:
        raise ValueError(f"`objective_function` must be one of {list(OBJECTIVES)}, got {objective!r}.")
    num_units = len(theta)
    check_budget(budget, num_units, min_rank, max_rank)
    theta_arr = np.asarray(theta, dtype=np.float64)
    if not np.all(np.isfinite(theta_arr)) or np.any(theta_arr < 0):
        raise ValueError(f"layer importance must be finite and >= 0, got {theta}")
    if not np.any(theta_arr > 0):
        raise ValueError("layer importance is zero for every layer: nothing to allocate by (check `theta_type` and "
                         "`lod_threshold_M`, or the calibration data)")
    ranks = np.arange(min_rank, max_rank + 1)
    f = np.array([OBJECTIVES[objective](k) for k in ranks])
    num_choices = len(ranks)
    # normalise for numerical conditioning (cubic of 64 is 2.6e5); does not change the argmax
    gain = np.outer(theta_arr / theta_arr.max(), f / np.abs(f).max() if np.abs(f).max() > 0 else f).ravel()
    one_choice = np.kron(np.eye(num_units), np.ones(num_choices))  # (L, L*K)
    rank_sum = np.tile(ranks, num_units)[None, :]  # (1, L*K)
    result = milp(
        c=-gain,
        constraints=[LinearConstraint(one_choice, 1, 1), LinearConstraint(rank_sum, budget, budget)],
        integrality=np.ones_like(gain),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if not result.success:
        raise RuntimeError(f"rank allocation solver failed: {result.message}")
    choice = np.asarray(result.x).reshape(num_units, num_choices).argmax(axis=1)
    allocation = [int(ranks[k]) for k in choice]
    if sum(allocation) != budget:
        raise RuntimeError(f"rank allocation solver returned ranks summing to {sum(allocation)}, not {budget}")
    return allocation


def objective_value(theta: list[float], ranks: list[int], objective: str) -> float:
    """sum_l theta_l f(r_l)."""
    return float(sum(t * OBJECTIVES[objective](r) for t, r in zip(theta, ranks)))
