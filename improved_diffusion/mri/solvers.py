"""Iterative solvers shared by data consistency, the coil checks and the baselines."""

from typing import Callable

import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched real inner product Re<a, b> over the image dims, shape (B, 1, 1)."""
    return (a.conj() * b).real.sum(dim=(-2, -1), keepdim=True)


def conjugate_gradient(
    normal_op: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    num_iters: int,
    tol: float = 0.0,
) -> torch.Tensor:
    """Batched conjugate gradients for a Hermitian positive (semi-)definite operator.

    Solves ``N x = rhs`` independently for every batch element of complex images ``(B, H, W)``, starting
    at ``x0``. Stops early when every element's residual norm is below ``tol`` times its initial residual
    ``‖rhs − N x0‖`` (a warm start from a good estimate must still converge, not stop at once), or below
    ten times the working precision of ``‖rhs‖``. An element whose search direction has vanished (already
    converged) keeps its iterate.
    """
    x = x0.clone()
    r = rhs - normal_op(x)
    p = r.clone()
    rs = _dot(r, r)
    # ... but never below the working precision of ``rhs``: iterating on rounding noise in a singular
    # system only amplifies it.
    floor = (10 * torch.finfo(rhs.real.dtype).eps) ** 2 * _dot(rhs, rhs)
    stop = torch.maximum(tol**2 * rs, floor)
    for _ in range(num_iters):
        if bool((rs <= stop).all()):
            break
        q = normal_op(p)
        pq = _dot(p, q)
        alpha = torch.where(pq > 0, rs / pq.clamp_min(1e-30), torch.zeros_like(pq))
        x = x + alpha * p
        r = r - alpha * q
        rs_new = _dot(r, r)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x
