"""Joint refinement of coil sensitivity maps and image on all measured k-space (JSENSE / NLINV-style).

Maps estimated from the fully sampled centre alone can be poor when it is narrow (at 8x with centre
fraction 0.04 only 5 of 128 columns): ESPIRiT then sees little of each coil's k-space to separate the
coil profile from the object. The undersampled outer k-space also constrains the maps, once an image is
known. :func:`refine_maps` alternates the two linear sub-problems of the bilinear model
``y_c = M F(S_c x) + n`` (whitened coils, white noise of std ``sigma``):

(a) the image given the maps: Tikhonov-regularized SENSE ``min_x ||M F(S x) - y||^2 + lamda ||x||^2`` by
    conjugate gradients, warm-started (``lamda`` is relative to ``A^H A``, whose largest eigenvalue is 1
    for normalized maps, so it does not depend on the data's units). It is small (1e-3, not the 1e-2 of
    the final SENSE image at sigma 0.002) because the maps step explains whatever the image leaves: with
    a strongly regularized image the maps absorb the regularization's bias and drift from the truth;
(b) the maps given the image: each coil's map is corrected by a smooth complex factor,
    ``S_c <- S_c p_c`` with ``p_c`` the inverse FFT of a centred ``block x block`` patch of k-space
    coefficients (5 x 5 by default), fitted by least squares (conjugate gradients from ``p_c = 1``, a
    small ridge) to all measured k-space of that coil; the maps are then normalized to
    ``sum_c |S_c|^2 = 1`` on the initial maps' support with their phase relative to coil 0 (ESPIRiT's
    convention), the image taking the factor so that the product ``S x`` is unchanged. A few smooth
    coefficients per coil, times the initial maps, keep their support and detail: a free low-resolution
    map (NLINV's parametrization, 16 x 16 coefficients per coil) followed the noise and the image's
    errors at 8x and moved away from the true maps while lowering the misfit.

This is the alternation of JSENSE (Ying & Sheng, "Joint image reconstruction and sensitivity estimation
in SENSE (JSENSE)", MRM 57:1196-1202, 2007) with NLINV's smoothness prior on the maps, here as a
multiplicative low-resolution correction (Uecker et al., "Image reconstruction by regularized nonlinear
inversion - joint estimation of coil sensitivities and image content", MRM 60:674-682, 2008). Since the
model is bilinear, a smooth factor can move between maps and image (``S x = (S a)(x / a)``); the
normalization fixes its magnitude and the phase convention its phase, and only the product meets the data.

The misfit on all measured data, in units of what the noise alone leaves at the true image
(:func:`data_misfit`, ``||A x - y||^2 / (sigma^2 N)`` over the ``N`` measured coil samples), is monitored
after every outer iteration: the iteration stops when it has reached the noise level (further decrease
would fit noise: the discrepancy principle) or falls by less than ``MIN_IMPROVEMENT``, and the maps with
the lowest misfit are returned (the initial ones if no iteration improved on them). The stop at 1 is
conservative: a least-squares image has as many unknowns as support pixels, so even the true maps leave
less than the noise level when there are few measurements per unknown (0.6-0.9 at 8x with 8 coils on
the held-out data); maps that reach 1 are not refined further.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from .fftc import fft2c, ifft2c
from .sense import sense_adjoint, sense_forward, sense_normal
from .solvers import conjugate_gradient

# Side of the centred k-space block that parametrizes each coil's map (capped at the image size).
MAP_BLOCK = 5
# Tikhonov weight of the image sub-problem, relative to A^H A (see the module docstring).
IMAGE_LAMBDA = 1e-3
# Ridge of the map sub-problem, relative to the typical eigenvalue of its normal operator; it only keeps
# coefficients that the data do not see (a coil over image background) from drifting.
MAP_RIDGE = 1e-3
CG_ITERS = 50
CG_TOL = 1e-3
# An outer iteration that lowers the all-data misfit by less than this fraction ends the refinement.
MIN_IMPROVEMENT = 0.01


@dataclass
class Refinement:
    """Result of :func:`refine_maps` (numpy).

    Attributes:
        maps: ``(C, H, W)`` complex64 refined maps, ``sum_c |S_c|^2 = 1`` on the initial maps' support.
        image: ``(H, W)`` complex64 regularized SENSE image with those maps.
        misfits: :func:`data_misfit` before refining (entry 0) and after each outer iteration run.
        best: index into ``misfits`` of the returned maps (0: the initial maps were kept).
    """

    maps: np.ndarray
    image: np.ndarray
    misfits: List[float] = field(default_factory=list)
    best: int = 0


def data_misfit(
    kspace: torch.Tensor, maps: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, sigma: float
) -> float:
    """``||M F(S x) - y||^2 / (sigma^2 N)`` over all ``N`` measured coil samples (NaN when sigma is 0).

    Args:
        kspace: ``(C, H, W)`` whitened k-space, zero off the mask.
        maps: ``(C, H, W)``; image: ``(H, W)``; mask: ``(H, W)`` 0/1.
        sigma: complex noise std of one whitened sample.
    """
    expected = sigma**2 * kspace.shape[0] * float(mask.sum())
    return _residual(kspace, maps, image, mask) / expected if expected > 0 else float("nan")


def _residual(kspace, maps, image, mask) -> float:
    return float((sense_forward(image[None], maps[None], mask) - kspace[None]).abs().pow(2).sum())


def _pad(block: torch.Tensor, shape) -> torch.Tensor:
    """Centred ``(C, n, n)`` block -> ``(C, H, W)`` k-space, zero outside the block."""
    h, w = shape
    n = block.shape[-1]
    out = block.new_zeros(block.shape[:-2] + (h, w))
    top, left = h // 2 - n // 2, w // 2 - n // 2
    out[..., top : top + n, left : left + n] = block
    return out


def _crop(kspace: torch.Tensor, n: int) -> torch.Tensor:
    h, w = kspace.shape[-2:]
    top, left = h // 2 - n // 2, w // 2 - n // 2
    return kspace[..., top : top + n, left : left + n]


def _normalize(maps: torch.Tensor, support: torch.Tensor):
    """Maps normalized to ``sum_c |S_c|^2 = 1`` on ``support`` with the phase of coil 0 removed, and the
    per-pixel factor ``g`` with ``normalized * g = maps`` (so the image becomes ``x g``)."""
    norm = maps.abs().pow(2).sum(dim=0).sqrt()
    ref = maps[0]
    rotation = torch.where(ref.abs() > 0, ref.conj() / ref.abs().clamp_min(1e-30), torch.ones_like(ref))
    ok = support & (norm > 0)
    normalized = torch.where(ok, maps * rotation / norm.clamp_min(1e-30), torch.zeros_like(maps))
    factor = torch.where(ok, norm * rotation.conj(), torch.zeros_like(ref))
    return normalized, factor


def _image_step(y, maps, mask, x0, lamda: float) -> torch.Tensor:
    rhs = sense_adjoint(y[None], maps[None], mask)
    x = conjugate_gradient(
        lambda v: sense_normal(v, maps[None], mask) + lamda * v, rhs, x0[None], CG_ITERS, tol=CG_TOL
    )
    return x[0]


def _map_step(y, image, mask, maps, block: int) -> torch.Tensor:
    """Least squares ``S_c p_c`` given the image, ``p_c`` smooth (a ``block x block`` k-space patch), from
    ``p_c = 1`` (the current maps); returns the corrected, unnormalized maps."""
    h, w = image.shape

    def smooth(k):  # coefficients (C, n, n) -> smooth factors (C, H, W)
        return ifft2c(_pad(k, (h, w)))

    sx = maps * image  # the current coil images; the model is F^{-1}(y_c) ~ p_c (S_c x)
    # Typical eigenvalue of the normal operator: the mean |S_c x|^2 times the sampled fraction.
    ridge = MAP_RIDGE * float(sx.abs().pow(2).mean()) * float(mask.mean())

    def normal(k):
        return _crop(fft2c(sx.conj() * ifft2c(mask * fft2c(sx * smooth(k)))), block) + ridge * k

    rhs = _crop(fft2c(sx.conj() * ifft2c(mask * y)), block)
    k0 = torch.zeros_like(rhs)
    k0[:, block // 2, block // 2] = float(np.sqrt(h * w))  # the inverse FFT of this is 1 everywhere
    return maps * smooth(conjugate_gradient(normal, rhs, k0, CG_ITERS, tol=CG_TOL))


def refine_maps(
    kspace: np.ndarray,
    sampled: np.ndarray,
    maps: np.ndarray,
    sigma: float,
    iters: int,
    block: int = MAP_BLOCK,
    lamda: float = IMAGE_LAMBDA,
) -> Refinement:
    """Refine maps jointly with the image on all measured data (see the module docstring).

    Args:
        kspace: ``(C, H, W)`` prewhitened k-space (entries off ``sampled`` are ignored).
        sampled: ``(H, W)`` bool, the measured positions.
        maps: ``(C, H, W)`` initial maps (e.g. ESPIRiT), normalized; their support is kept.
        sigma: complex noise std of one whitened sample (0: noiseless, then only the improvement test stops).
        iters: outer iterations at most (0: the initial maps and their image are returned).
        block: side of the centred k-space block of each coil's smooth correction factor.
        lamda: Tikhonov weight of the image sub-problem, relative to ``A^H A``.

    Returns:
        :class:`Refinement`.
    """
    if iters < 0:
        raise ValueError(f"refine_maps: iters must be >= 0, got {iters}")
    if block < 1:
        raise ValueError(f"refine_maps: block must be >= 1, got {block}")
    block = min(block, *kspace.shape[-2:])
    mask = torch.from_numpy(np.asarray(sampled, dtype=np.float32))
    y = torch.from_numpy(np.asarray(kspace, dtype=np.complex64)) * mask
    s = torch.from_numpy(np.asarray(maps, dtype=np.complex64))
    support = (s.abs() > 0).any(dim=0)
    # Residuals in units of the noise (raw residuals for noiseless data, where only improvement counts).
    expected = sigma**2 * y.shape[0] * float(mask.sum()) if sigma > 0 else 1.0
    x = _image_step(y, s, mask, torch.zeros(s.shape[-2:], dtype=s.dtype), lamda)
    misfits = [_residual(y, s, x, mask) / expected]
    best, best_maps, best_x = 0, s, x
    for it in range(1, iters + 1):
        if sigma > 0 and misfits[-1] <= 1.0:  # at the noise level: a lower misfit would be fitted noise
            break
        s, factor = _normalize(_map_step(y, x, mask, s, block), support)
        x = _image_step(y, s, mask, x * factor, lamda)
        misfits.append(_residual(y, s, x, mask) / expected)
        if misfits[-1] < misfits[best]:
            best, best_maps, best_x = it, s, x
        if not misfits[-1] < (1 - MIN_IMPROVEMENT) * misfits[-2]:
            break
    if not sigma > 0:
        misfits = [float("nan")] * len(misfits)
    return Refinement(best_maps.numpy(), best_x.numpy(), misfits, best)
