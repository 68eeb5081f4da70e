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
    scale = guarded_scale(rms.to(weight.device, torch.float32))
    weighted = weight.to(torch.float32) * scale.unsqueeze(0)  # W S: (out, in)
    u, singular, v = truncated_svd(weighted, rank, solver, niter, oversample, generator)
    factor_A = v.T / scale.unsqueeze(0)  # V'^T S^-1: (rank, in)
    factor_B = u * singular.unsqueeze(0)  # U' Sigma': (out, rank)
    if split == "symmetric":
        root = singular.sqrt()
        factor_A = root.unsqueeze(1) * factor_A
        factor_B = u * root.unsqueeze(0)
    return factor_A, factor_B
