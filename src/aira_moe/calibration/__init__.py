"""Calibration pass and the activation-aware techniques (statistics, importance, allocation, AwSVD, weighting)."""

from .allocation import allocate_ranks, check_budget, objective_value, resolve_budget
from .awsvd import awsvd_factors, randomized_svd
from .stats import ChannelStats, channel_scores, lod_score, minmax_normalize, update_stats

__all__ = [
    "ChannelStats",
    "allocate_ranks",
    "awsvd_factors",
    "channel_scores",
    "check_budget",
    "lod_score",
    "minmax_normalize",
    "objective_value",
    "randomized_svd",
    "resolve_budget",
    "update_stats",
]
