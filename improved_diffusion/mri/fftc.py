"""Centered, orthonormal 2-D Fourier transforms (fastMRI's convention).

k-space is stored with the DC component at the centre of the array (index ``n // 2``), so every
transform is ``fftshift(fft(ifftshift(x)))`` with ``norm="ortho"`` over the last two dimensions.
All functions take complex torch tensors of shape ``(..., H, W)`` and work for odd and even sizes.
"""

from typing import Tuple

import torch

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2-D FFT over the last two dims: image (..., H, W) -> k-space (..., H, W)."""
    x = torch.fft.ifftshift(x, dim=_DIMS)
    x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2-D inverse FFT over the last two dims: k-space -> image."""
    k = torch.fft.ifftshift(k, dim=_DIMS)
    k = torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS)


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """Complex (..., H, W) -> real (..., 2, H, W) with channels (real, imaginary)."""
    return torch.stack([x.real, x.imag], dim=-3)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real (..., 2, H, W) -> complex (..., H, W); the inverse of :func:`complex_to_channels`."""
    if x.shape[-3] != 2:
        raise ValueError(f"expected 2 channels (real, imaginary) in dim -3, got shape {tuple(x.shape)}")
    return torch.complex(x[..., 0, :, :].contiguous(), x[..., 1, :, :].contiguous())


def center_crop(x: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Crop the last two dims of ``x`` to ``shape`` around the centre (fastMRI's rounding).

    The crop starts at ``(n - s) // 2``, so the k-space/image centre ``n // 2`` stays at ``s // 2``.
    """
    h, w = x.shape[-2:]
    ch, cw = shape
    if not (0 < ch <= h and 0 < cw <= w):
        raise ValueError(f"crop {tuple(shape)} does not fit in the last two dims {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]
