"""Activation statistics and the importance / weighting formulas, as pure tensor functions (no framework import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ChannelStats:
    """Streaming fp32 sums over the real (unpadded) tokens seen by one Linear.

    sum_sq[j] = sum_t x_tj^2, sum_abs[j] = sum_t |x_tj| over input channels j; sum_abs_out[k] = sum_t |(W x_t)_k| over
    output channels k (only when output scores are needed); count = number of tokens.
    """

    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    count: torch.Tensor
    sum_abs_out: Optional[torch.Tensor] = None

    @classmethod
    def zeros(cls, in_features: int, out_features: Optional[int], device=None) -> "ChannelStats":
        def z(n):
            return torch.zeros(n, dtype=torch.float32, device=device)

        return cls(z(in_features), z(in_features), torch.zeros((), dtype=torch.float64, device=device),
                   z(out_features) if out_features else None)

    def tensors(self) -> list[torch.Tensor]:
        """The sums, in a fixed order (used to all-reduce them)."""
        return [t for t in (self.sum_sq, self.sum_abs, self.count, self.sum_abs_out) if t is not None]


def update_stats(stats: ChannelStats, inputs: torch.Tensor, mask: torch.Tensor, outputs: Optional[torch.Tensor] = None) -> None:
    """Add one batch. inputs: (..., in); mask: inputs.shape[:-1], 1 for real tokens and 0 for padding;
    outputs: (..., out) = W x (no bias), needed only when ``stats.sum_abs_out`` is tracked."""
    if inputs.shape[:-1] != mask.shape:
        raise ValueError(
            f"calibration: activation shape {tuple(inputs.shape)} does not match attention_mask shape {tuple(mask.shape)}"
        )
    weight = mask.to(torch.float32).unsqueeze(-1)  # (..., 1)
    x = inputs.to(torch.float32)
    dims = tuple(range(x.dim() - 1))
    stats.sum_sq += (x.square() * weight).sum(dims)
    stats.sum_abs += (x.abs() * weight).sum(dims)
    stats.count += weight.sum().to(torch.float64)
    if stats.sum_abs_out is not None:
        if outputs is None:
            raise ValueError("calibration: output statistics requested but no outputs were given")
        stats.sum_abs_out += (outputs.to(torch.float32).abs() * weight).sum(dims)


def _require_tokens(count: torch.Tensor) -> float:
    n = float(count)
    if n <= 0:
        raise ValueError("calibration saw no real tokens (all attention masks were 0); check the calibration data")
    return n


def input_channel_norms(stats: ChannelStats) -> torch.Tensor:
    """a_j = ||X[:, j]||_2 over the calibration tokens."""
    return stats.sum_sq.sqrt()


def input_rms(stats: ChannelStats) -> torch.Tensor:
    """sqrt(mean_t x_tj^2) per input channel (the diagonal of S in AwSVD)."""
    return (stats.sum_sq / _require_tokens(stats.count)).sqrt()


def input_mean_abs(stats: ChannelStats) -> torch.Tensor:
    """mean_t |x_tj| per input channel (the 'inps' channel score)."""
    return stats.sum_abs / _require_tokens(stats.count)


def output_mean_abs(stats: ChannelStats) -> torch.Tensor:
    """mean_t |(W x_t)_k| per output channel (the 'outps' channel score)."""
    if stats.sum_abs_out is None:
        raise ValueError("output statistics were not collected (activation_aware_mode='outps' needs them)")
    return stats.sum_abs_out / _require_tokens(stats.count)


LOD_REFERENCES = ("mean", "median")
DEFAULT_LOD_REFERENCE = "median"  # the one copy: AiraMoeConfig.lod_reference defaults to it too


def lod_score(weight: torch.Tensor, channel_norms: torch.Tensor, threshold_M: float,
              reference: str = DEFAULT_LOD_REFERENCE) -> float:
    """Layer-wise outlier distribution: with A_ij = |W_ij| * a_j (W: out x in, a_j = ||X_j||_2),
    LOD = fraction of entries with A_ij > M * ref(A), ref = mean (the seed's formula) or median. A few huge entries
    inflate the mean (and with it the threshold) but not the median."""
    scores = weight.to(torch.float32).abs() * channel_norms.to(weight.device, torch.float32).unsqueeze(0)  # (out, in)
    if reference == "mean":
        level = scores.mean()
    elif reference == "median":
        level = scores.flatten().median()
    else:
        raise ValueError(f"`lod_reference` must be one of {list(LOD_REFERENCES)}, got {reference!r}.")
    return (scores > threshold_M * level).to(torch.float32).mean().item()


def activation_importance(stats: ChannelStats) -> float:
    """theta_act = mean over channels and tokens of |x| = mean_j (sum_t |x_tj| / N)."""
    return input_mean_abs(stats).mean().item()


def minmax_normalize(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(s - min) / (max - min + eps), in [0, 1)."""
    return (scores - scores.min()) / (scores.max() - scores.min() + eps)


def _positive_mean(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    if not mean > 0:
        raise ValueError("activation-aware weighting: every channel score is zero; the calibration data never reached "
                         "this layer")
    return mean


def _inverse(scores: torch.Tensor) -> torch.Tensor:
    floored = scores.clamp(min=(1e-3 * _positive_mean(scores)).item())
    inverse = 1.0 / floored
    return inverse / inverse.mean()


# name -> weights from raw channel scores s (>= 0). 'minmax' is the seed's formula; the others keep the update's
# average scale (mean weight 1), so the weighting re-distributes the update over channels instead of shrinking it.
CHANNEL_NORMALIZERS = {
    "minmax": minmax_normalize,
    "mean": lambda s: s / _positive_mean(s),
    "sqrt": lambda s: s.sqrt() / _positive_mean(s.sqrt()),
    "inverse": _inverse,
    "none": lambda s: s,
}


def normalize_channel_scores(scores: torch.Tensor, method: str) -> torch.Tensor:
    """Channel weights from raw scores by ``method`` (see ``CHANNEL_NORMALIZERS``)."""
    if method not in CHANNEL_NORMALIZERS:
        raise ValueError(f"`activation_normalize` must be one of {list(CHANNEL_NORMALIZERS)}, got {method!r}.")
    return CHANNEL_NORMALIZERS[method](scores)


def channel_scores(stats: ChannelStats, mode: str, normalize: str) -> torch.Tensor:
    """Fixed per-channel weights of activation-aware weighting: 'inps' mean |x| (in), 'outps' mean |Wx| (out),
    normalised by ``normalize`` (a key of ``CHANNEL_NORMALIZERS``)."""
    scores = input_mean_abs(stats) if mode == "inps" else output_mean_abs(stats)
    return normalize_channel_scores(scores, normalize)
