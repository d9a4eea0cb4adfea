"""Small neural-network building blocks shared by the UNet and the diffusion losses."""

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes its statistics in float32 (stable under fp16/bf16 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)

    def forward_film(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``self(x) * (1 + scale) + shift`` (FiLM) in a single normalization pass.

        Per sample, FiLM is an affine map per channel, so it folds into the GroupNorm's affine: the batch is
        normalized as one sample with ``B * num_groups`` groups (the same groups and statistics) whose
        per-(sample, channel) weight and bias are ``weight * (1 + scale)`` and ``bias * (1 + scale) + shift``.
        That saves the separate scale-and-shift pass forward and its three full-size products backward;
        the result equals the two-step form to float32 rounding.

        Args:
            x: (B, C, *spatial).
            scale, shift: (B, C) or (B, C, 1, ...).

        Returns:
            (B, C, *spatial) in ``x``'s dtype.
        """
        b, c = x.shape[:2]
        factor = 1 + scale.reshape(b, c).float()
        weight = (self.weight * factor).reshape(-1)
        bias = (self.bias * factor + shift.reshape(b, c).float()).reshape(-1)
        out = F.group_norm(x.float().reshape(1, b * c, -1), b * self.num_groups, weight, bias, self.eps)
        return out.reshape(x.shape).type(x.dtype)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution module."""
    if dims not in (1, 2, 3):
        raise ValueError(f"nn.conv_nd: dims must be 1, 2 or 3, got {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    """A linear module (kept as a named factory for parity with upstream)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average-pooling module."""
    if dims not in (1, 2, 3):
        raise ValueError(f"nn.avg_pool_nd: dims must be 1, 2 or 3, got {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply all parameters of ``module`` by ``scale`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def normalization(channels: int) -> nn.Module:
    """The standard normalization layer: GroupNorm in float32 with 32 groups.

    Upstream always uses 32 groups, which needs ``channels % 32 == 0``. For the tiny models used in tests
    and CPU experiments (e.g. 8 or 16 channels) we fall back to ``gcd(32, channels)`` groups; for every
    upstream-sized model this is exactly 32.
    """
    if channels <= 0:
        raise ValueError(f"nn.normalization: channels must be positive, got {channels}")
    return GroupNorm32(math.gcd(32, channels), channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embeddings (Vaswani et al. 2017), as in DDPM.

    Args:
        timesteps: (N,) tensor of (possibly fractional) timesteps, one per batch element.
        dim: output dimension.
        max_period: controls the lowest frequency.

    Returns:
        (N, dim) float32 tensor: [cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i/half), zero-padded
        by one column when ``dim`` is odd.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(
    func: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Iterable[torch.Tensor],
    flag: bool,
) -> torch.Tensor:
    """Evaluate ``func(*inputs)``, recomputing activations in the backward pass when ``flag`` is set.

    Upstream used a hand-written autograd Function; torch's non-reentrant checkpoint handles parameters
    (``params`` is accepted for API parity and otherwise unused), kwargs-free closures and CUDA RNG state.

    Args:
        func: the function to evaluate.
        inputs: positional tensor arguments to ``func``.
        params: parameters ``func`` depends on (unused; kept for upstream's signature).
        flag: if False, simply call ``func`` without checkpointing.
    """
    del params
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def update_ema(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], rate: float = 0.99
):
    """EMA in place: target = rate * target + (1 - rate) * source, parameter by parameter."""
    with torch.no_grad():
        for targ, src in zip(target_params, source_params):
            targ.mul_(rate).add_(src, alpha=1 - rate)
