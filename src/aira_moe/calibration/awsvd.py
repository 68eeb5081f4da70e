"""AwSVD: activation-weighted SVD initial factors, with a seeded randomized SVD."""

from __future__ import annotations

import torch

RMS_FLOOR = 1e-3  # channels are clamped to >= RMS_FLOOR * mean RMS, so a dead channel cannot make S^-1 blow up


def guarded_scale(rms: torch.Tensor, floor: float = RMS_FLOOR) -> torch.Tensor:
    """S = max(rms_j, floor * mean(rms)); raises if every channel is zero."""
    mean = rms.mean()
    if not mean > 0:
        raise ValueError("AwSVD: every input channel has zero activation RMS; the calibration data never reached this layer")
    return rms.clamp(min=(floor * mean).item())


def randomized_svd(
    matrix: torch.Tensor, rank: int, niter: int = 6, oversample: int = 16, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD (U, S, V) of ``matrix`` (m x n) by Halko-Martinsson-Tropp range finding with ``niter`` power
    iterations (re-orthonormalised each time). The test matrix is drawn on the CPU from ``generator`` so every rank and
    device gets the same one."""
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=torch.float32).to(matrix.device, matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ omega)  # (m, q)
    for _ in range(niter):
        co_basis, _ = torch.linalg.qr(matrix.T @ basis)  # (n, q)
        basis, _ = torch.linalg.qr(matrix @ co_basis)  # (m, q)
    small = basis.T @ matrix  # (q, n)
    u_small, singular, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ u_small)[:, :rank], singular[:rank], vh[:rank].T


def truncated_svd(matrix: torch.Tensor, rank: int, solver: str, niter: int, oversample: int, generator=None):
    """Top-``rank`` (U, S, V) with the chosen solver ('randomized' or 'full')."""
    if solver == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    return randomized_svd(matrix, rank, niter=niter, oversample=oversample, generator=generator)


def weighted_svd(weight, rms, rank: int, solver: str, niter: int, oversample: int, generator=None):
    """(S, U', Sigma', V') with W S = U' Sigma' V'^T (top ``rank``), S = diag(guarded rms); fp32 on the weight's
    device."""
    scale = guarded_scale(rms.to(weight.device, torch.float32))
    weighted = weight.to(torch.float32) * scale.unsqueeze(0)  # W S: (out, in)
    return (scale, *truncated_svd(weighted, rank, solver, niter, oversample, generator))


def awsvd_factors(
    weight: torch.Tensor,
    rms: torch.Tensor,
    rank: int,
    *,
    solver: str = "randomized",
    niter: int = 6,
    oversample: int = 16,
    split: str = "reference",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A: rank x in, B: out x rank) with B @ A the best rank-``rank`` approximation of W in the
    activation-weighted norm ||(W - B A) S||_F, S = diag(guarded rms).

    W' = W S = U' Sigma' V'^T (top rank);  reference split: A = V'^T S^-1, B = U' Sigma';
    symmetric split: A = sqrt(Sigma') V'^T S^-1, B = U' sqrt(Sigma').
    Computed in fp32 on the weight's device.
    """
    scale, u, singular, v = weighted_svd(weight, rms, rank, solver, niter, oversample, generator)
    factor_A = v.T / scale.unsqueeze(0)  # V'^T S^-1: (rank, in)
    factor_B = u * singular.unsqueeze(0)  # U' Sigma': (out, rank)
    if split == "symmetric":
        root = singular.sqrt()
        factor_A = root.unsqueeze(1) * factor_A
        factor_B = u * root.unsqueeze(0)
    return factor_A, factor_B


def awsvd_directions(
    weight: torch.Tensor,
    rms: torch.Tensor,
    count: int,
    *,
    solver: str = "randomized",
    niter: int = 6,
    oversample: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The top-``count`` activation-weighted input directions of W as rows (count x in): row k = c * v_k^T S^-1 with
    W S = U' Sigma' V'^T, so that row k reads the whitened input S^-1 x along W's k-th principal direction.

    c = sqrt(median(rms^2) / 3) gives each row the activation-space scale of LoRA's Kaiming-uniform A row on a typical
    channel (E[(a x)^2] = mean(rms^2) / 3 for entries U(-1/sqrt(in), 1/sqrt(in))); the median, not the mean, so that a
    few outlier channels do not inflate it (W S, and with it V', is unchanged when a channel of x is scaled by k and
    the matching column of W by 1/k, so with the median the rows are too, up to that channel).
    """
    scale, _, _, v = weighted_svd(weight, rms, count, solver, niter, oversample, generator)
    level = (scale.square().median() / 3.0).sqrt()
    return level * v.T / scale.unsqueeze(0)  # (count, in)


def divide_out_input_weights(rows: torch.Tensor, weights: torch.Tensor, floor: float = RMS_FLOOR) -> torch.Tensor:
    """rows diag(1/w) (rows: k x in, w: in), so that (rows diag(1/w)) diag(w) = rows; w is floored at ``floor`` * mean
    so that a zero weight cannot blow up."""
    guarded = weights.to(rows.device, torch.float32).clamp(min=(floor * weights.float().mean()).item())
    return rows / guarded.unsqueeze(0)
