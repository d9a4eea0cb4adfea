"""SENSE forward model ``A = M F S`` and its adjoint, for single- and multi-coil Cartesian MRI.

Conventions (Pruessmann et al., "SENSE: sensitivity encoding for fast MRI", MRM 1999):

- image ``x``: complex ``(B, H, W)`` (any leading batch dims ``...`` work);
- coil sensitivity maps ``S``: complex ``(B, C, H, W)`` — coils in dim -3; single-coil data use one map of
  ones (:func:`single_coil_maps`), so the same operators serve both;
- k-space ``y``: complex ``(B, C, H, W)``, centered orthonormal FFT (:mod:`improved_diffusion.mri.fftc`);
- mask ``M``: real (0/1 or weights), broadcastable to ``y`` — a column mask ``(1, ..., 1, W)`` or a 2-D mask
  ``(H, W)``; ``None`` means fully sampled.

``A x = M F (S x)`` and ``A^H y = sum_c conj(S_c) F^H (M y_c)``. With maps normalized to
``sum_c |S_c|^2 = 1`` on the object support (:func:`normalize_maps`) and a full mask, ``A^H A = I`` there,
so ``coil_combine(ifft2c(y), S)`` is the least-squares image. Every function keeps the input's dtype
(complex64 or complex128) and device.

:class:`SenseNormal` is ``A^H A`` for fixed maps and mask, set up once for the many applications of an
iterative solve: with a column mask (constant along the fully sampled readout, dim -2) the readout
transforms cancel, ``F_rows^H M F_rows = M``, so only 1-D FFTs along the phase encodes remain; for an even
width the centring shifts are signs (:mod:`improved_diffusion.mri.fftc`) that cancel between the forward and
inverse transform except for one sign pattern on the image side, which is folded into the maps once.
"""

from typing import Optional, Sequence, Union

import torch

from .fftc import centering_signs, fft2c, fftc, ifft2c, ifftc


def _check_complex(name: str, t: torch.Tensor, min_dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"sense: {name} must be a torch tensor, got {type(t).__name__}")
    if not t.is_complex():
        raise ValueError(f"sense: {name} must be complex, got dtype {t.dtype}")
    if t.dim() < min_dims:
        raise ValueError(f"sense: {name} needs at least {min_dims} dims, got shape {tuple(t.shape)}")


def _check_pair(img_name: str, img: torch.Tensor, maps: torch.Tensor, coil_dim_in_img: bool) -> None:
    _check_complex(img_name, img, 3 if coil_dim_in_img else 2)
    _check_complex("maps", maps, 3)
    if img.shape[-2:] != maps.shape[-2:]:
        raise ValueError(
            f"sense: {img_name} {tuple(img.shape)} and maps {tuple(maps.shape)} differ in (H, W)"
        )
    if coil_dim_in_img and img.shape[-3] != maps.shape[-3]:
        raise ValueError(f"sense: {img_name} has {img.shape[-3]} coils in dim -3, maps have {maps.shape[-3]}")


def _masked(y: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return y
    if mask.is_complex():
        raise ValueError("sense: mask must be real (0/1 or sampling weights), got a complex tensor")
    try:
        torch.broadcast_shapes(mask.shape, y.shape)
    except RuntimeError as err:
        raise ValueError(
            f"sense: mask {tuple(mask.shape)} does not broadcast to k-space {tuple(y.shape)}"
        ) from err
    # Keep y's precision: a float32 mask must not demote complex128 data, nor float64 promote complex64.
    return y * mask.to(device=y.device, dtype=y.real.dtype)


def sense_forward(x: torch.Tensor, maps: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A x = M F (S x)``: image ``(B, H, W)`` -> undersampled multi-coil k-space ``(B, C, H, W)``."""
    _check_pair("x", x, maps, coil_dim_in_img=False)
    return _masked(fft2c(maps * x.unsqueeze(-3)), mask)


def sense_adjoint(y: torch.Tensor, maps: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A^H y = sum_c conj(S_c) F^H (M y_c)``: k-space ``(B, C, H, W)`` -> image ``(B, H, W)``."""
    _check_pair("y", y, maps, coil_dim_in_img=True)
    return coil_combine(ifft2c(_masked(y, mask)), maps)


def sense_normal(x: torch.Tensor, maps: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A^H A x`` (image ``(B, H, W)`` -> image); the mask enters twice, so weights act squared."""
    return sense_adjoint(sense_forward(x, maps, mask), maps, mask)


class SenseNormal:
    """``x -> A^H A x`` for fixed ``maps`` ``(..., C, H, W)`` and ``mask`` (module docstring).

    Equal to ``sense_normal(x, maps, mask)``; faster for column masks (a mask broadcast along dim -2: shape
    ``(..., 1, W)`` or ``(W,)``), where it needs two 1-D FFTs along W instead of two 2-D FFTs, and no shift.
    """

    def __init__(self, maps: torch.Tensor, mask: Optional[torch.Tensor] = None):
        _check_complex("maps", maps, 3)
        self.maps, self.mask = maps, mask
        if (
            mask is not None
            and mask.dim() >= 2
            and mask.shape[-2] > 1
            and bool((mask == mask[..., :1, :]).all())
        ):
            mask = mask[..., :1, :]  # a 2-D mask that samples whole columns
        self.columns = mask is not None and (mask.dim() == 1 or mask.shape[-2] == 1)
        if not self.columns:
            return
        w = maps.shape[-1]
        self.weights = mask.reshape(mask.shape[:-1] + (1, w) if mask.dim() == 1 else mask.shape)
        self.weights = self.weights.to(device=maps.device, dtype=maps.real.dtype) ** 2  # M enters twice
        self.even = w % 2 == 0
        if self.even:  # ifftc(M fftc(z)) = s F^H M F (s z): fold s (along W) into the maps
            self.maps = maps * centering_signs(w, maps.device, maps.real.dtype)[0]
        self.maps_conj = self.maps.conj().resolve_conj()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.columns:
            return sense_normal(x, self.maps, self.mask)
        _check_pair("x", x, self.maps, coil_dim_in_img=False)
        z = self.maps * x.unsqueeze(-3)
        if self.even:
            z = torch.fft.ifft(self.weights * torch.fft.fft(z, dim=-1, norm="ortho"), dim=-1, norm="ortho")
        else:
            z = ifftc(self.weights * fftc(z, dim=-1), dim=-1)
        return (self.maps_conj * z).sum(dim=-3)


def rss(x: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares over the coil dim: ``sqrt(sum_c |x_c|^2)`` (real, fastMRI's multi-coil target)."""
    return torch.sqrt((x.abs() ** 2).sum(dim=dim))


def coil_combine(coil_images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """SENSE coil combination ``sum_c conj(S_c) x_c``: coil images ``(B, C, H, W)`` -> image ``(B, H, W)``."""
    _check_pair("coil_images", coil_images, maps, coil_dim_in_img=True)
    return (maps.conj() * coil_images).sum(dim=-3)


def sensitivity_support(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Boolean support ``(B, H, W)``: where ``sqrt(sum_c |S_c|^2)`` exceeds ``eps`` times its maximum over
    ``(H, W)`` of that map set (relative, so the threshold does not depend on the maps' scale)."""
    _check_complex("maps", maps, 3)
    norm = rss(maps)
    peak = norm.amax(dim=(-2, -1), keepdim=True)
    return (norm > eps * peak) & (norm > 0)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale maps ``(B, C, H, W)`` so that ``sum_c |S_c|^2 = 1`` on the support and 0 outside it.

    The support is :func:`sensitivity_support` (relative threshold ``eps``); no NaN or Inf is produced, even
    for all-zero maps (which come back all zero).
    """
    if not eps >= 0:
        raise ValueError(f"normalize_maps: eps must be >= 0, got {eps}")
    support = sensitivity_support(maps, eps).unsqueeze(-3)
    norm = rss(maps).unsqueeze(-3)
    # Divide by 1 outside the support so no 0/0 appears, then zero it.
    safe = torch.where(support, norm, torch.ones_like(norm))
    return torch.where(support, maps / safe, torch.zeros_like(maps))


def single_coil_maps(
    shape: Sequence[int],
    dtype: torch.dtype = torch.complex64,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """All-ones maps for single-coil data: image shape ``(..., H, W)`` -> ``(..., 1, H, W)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"single_coil_maps: shape must be an image shape (..., H, W), got {shape}")
    if not dtype.is_complex:
        raise ValueError(f"single_coil_maps: dtype must be complex, got {dtype}")
    return torch.ones(shape[:-2] + (1,) + shape[-2:], dtype=dtype, device=device)
