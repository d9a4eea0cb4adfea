"""Gaussian KL divergence and discretized Gaussian log-likelihood (Ho et al. 2020, Nichol & Dhariwal 2021).

All functions broadcast their tensor arguments elementwise and work in nats.
"""

import math
from typing import Union

import torch

TensorLike = Union[torch.Tensor, float]


def normal_kl(mean1: TensorLike, logvar1: TensorLike, mean2: TensorLike, logvar2: TensorLike) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    At least one argument must be a tensor; scalars are promoted to its dtype and device.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl: at least one of mean1, logvar1, mean2, logvar2 must be a torch.Tensor")
    # Promote scalars so torch.exp works on them (a float logvar is common: fixed variances).
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=ref.dtype, device=ref.device)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (Page 1977), as used by DDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretized to 256 bins under a Gaussian.

    Args:
        x: targets of any shape, assumed to be uint8 values rescaled to [-1, 1].
        means: Gaussian means, same shape as ``x``.
        log_scales: Gaussian log standard deviations, same shape as ``x``.

    Returns:
        Log-probabilities (nats), same shape as ``x``. The edge bins extend to -inf / +inf.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"discretized_gaussian_log_likelihood: shapes differ: x {tuple(x.shape)}, "
            f"means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # Clamp before the log: probabilities can underflow to zero far in the tails.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))
