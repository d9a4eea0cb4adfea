"""Centered, orthonormal Fourier transforms (fastMRI's convention).

k-space is stored with the DC component at the centre of the array (index ``n // 2``), so every
transform is ``fftshift(fft(ifftshift(x)))`` with ``norm="ortho"`` over the last two dimensions
(:func:`fft2c`, :func:`ifft2c`) or over one dimension (:func:`fftc`, :func:`ifftc`). All functions take
complex torch tensors of shape ``(..., H, W)`` and work for odd and even sizes.

The shifts are not done as copies (``torch.roll``): along a dimension of even length ``n``,
``fftshift(fft(ifftshift(x)))[k] = (-1)^(n/2) (-1)^k fft((-1)^m x[m])[k]``, so the shifts become a
multiplication by a precomputed sign pattern on the input and the output. Odd lengths have no such
identity and keep the shifts.
"""

import functools
from typing import Sequence, Tuple

import torch

_DIMS = (-2, -1)


@functools.lru_cache(maxsize=64)
def centering_signs(n: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """For even ``n``: ``((-1)^m, (-1)^(n/2) (-1)^k)``, the input and output sign patterns of length n
    (module docstring), real, cached per (n, device, dtype)."""
    s = 1.0 - 2.0 * (torch.arange(n, device=device) % 2).to(dtype)
    return s, s * (-1.0) ** (n // 2)


def _centered(x: torch.Tensor, dims: Sequence[int], inverse: bool) -> torch.Tensor:
    """``fftshift(fft(ifftshift(x)))`` (or with ``ifft``) over ``dims``, orthonormal."""
    dims = tuple(d % x.dim() for d in dims)
    odd = tuple(d for d in dims if x.shape[d] % 2)
    real = x.real.dtype
    pre, post = 1, 1
    for d in dims:
        if x.shape[d] % 2 == 0:
            s_in, s_out = centering_signs(x.shape[d], x.device, real)
            view = [1] * x.dim()
            view[d] = -1
            pre = pre * s_in.view(view)
            post = post * s_out.view(view)
    if odd:
        x = torch.fft.ifftshift(x, dim=odd)
    if not isinstance(pre, int):
        x = x * pre
    x = (torch.fft.ifftn if inverse else torch.fft.fftn)(x, dim=dims, norm="ortho")
    if not isinstance(post, int):
        x = x * post
    return torch.fft.fftshift(x, dim=odd) if odd else x


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2-D FFT over the last two dims: image (..., H, W) -> k-space (..., H, W)."""
    return _centered(x, _DIMS, inverse=False)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centered orthonormal 2-D inverse FFT over the last two dims: k-space -> image."""
    return _centered(k, _DIMS, inverse=True)


def fftc(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Centered orthonormal 1-D FFT along ``dim`` (e.g. -2, the readout rows of (..., H, W))."""
    return _centered(x, (dim,), inverse=False)


def ifftc(k: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Centered orthonormal 1-D inverse FFT along ``dim``."""
    return _centered(k, (dim,), inverse=True)


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
