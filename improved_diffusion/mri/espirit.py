"""Coil sensitivity maps from the fully sampled k-space centre: ESPIRiT on the whole calibration region.

ESPIRiT (Uecker et al., "ESPIRiT - an eigenvalue approach to autocalibrating parallel MRI: where SENSE
meets GRAPPA", MRM 71:990-1001, 2014) is computed here (:func:`espirit_maps`, in torch) on the largest
centred rectangle that is actually fully sampled (from ``mask`` or from the non-zero k-space), as BART's
``ecalib`` does: at a 4x mask on 128 columns that is all 128 rows x 10 columns, where a square region
(sigpy's ``calib_width``) would keep 10 x 10. The kernel is shrunk along an axis where the region is
narrow. When the region is too narrow for a 3-wide kernel, or ESPIRiT keeps almost no support, it falls
back, with a warning, to maps from the windowed low-resolution coil images of the sampled centre divided
by their root-sum-of-squares (e.g. McKenzie et al., MRM 2002 "self-calibrating parallel imaging").
Either way the maps are finite, their phase is relative to coil 0 (ESPIRiT's convention) and
``sum_c |S_c|^2 = 1`` on the support, 0 outside.
"""

import math
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from .fftc import ifft2c

# Fallback support: pixels whose low-resolution RSS exceeds this fraction of its maximum. The blurred
# low-resolution image spreads beyond the object, so this keeps the object plus a margin.
FALLBACK_SUPPORT = 0.05
# ESPIRiT is judged to have failed when it keeps less than this fraction of the fallback support.
MIN_SUPPORT_RATIO = 0.5
MIN_KERNEL_WIDTH = 3


class CalibrationWarning(UserWarning):
    """ESPIRiT could not run as asked (small calibration region) and the maps come from a fallback."""


def _centered_fft_inverse(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


def sampled_pattern(kspace: np.ndarray, mask=None) -> np.ndarray:
    """(H, W) bool: which k-space points were measured (from ``mask`` if given, else non-zero samples).

    Args:
        kspace: (C, H, W) complex k-space.
        mask: anything broadcastable to (C, H, W) or (H, W) (e.g. (W,), (1, W), (1, 1, W), (H, W)).
    """
    if mask is None:
        return np.any(kspace != 0, axis=0)
    mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask) != 0
    while mask.ndim > 2:  # (1, 1, W), (C, H, W), ...: a point is sampled if any leading index samples it
        mask = mask.any(axis=0)
    try:
        return np.broadcast_to(mask, kspace.shape[-2:]).copy()
    except ValueError:
        raise ValueError(
            f"mask shape {mask.shape} does not broadcast to k-space {kspace.shape[-2:]}"
        ) from None


def calibration_region(sampled: np.ndarray) -> Tuple[int, int, int, int]:
    """Largest fully sampled rectangle around the k-space centre (H // 2, W // 2).

    Returns:
        (top, bottom, left, right) extents from the centre, inclusive: rows ``c_h - top .. c_h + bottom``
        and columns ``c_w - left .. c_w + right`` are all sampled. (0, 0, 0, 0) means only the centre
        point; raises ValueError if even the centre is missing.
    """
    h, w = sampled.shape
    ch, cw = h // 2, w // 2
    if not sampled[ch, cw]:
        raise ValueError("the k-space centre is not sampled; sensitivity maps need a calibration region")

    def run(line: np.ndarray, start: int, step: int) -> int:
        n, i = 0, start + step
        while 0 <= i < len(line) and line[i]:
            n, i = n + 1, i + step
        return n

    ext = [
        run(sampled[:, cw], ch, -1),
        run(sampled[:, cw], ch, 1),
        run(sampled[ch], cw, -1),
        run(sampled[ch], cw, 1),
    ]
    # Shrink until the whole rectangle is sampled (Poisson masks and full centre lines reach past the
    # square): take away the edge line with the largest missing fraction (ties: the longer extent).
    while True:
        box = sampled[ch - ext[0] : ch + ext[1] + 1, cw - ext[2] : cw + ext[3] + 1]
        if box.all():
            return tuple(ext)
        missing = [1 - line.mean() for line in (box[0], box[-1], box[:, 0], box[:, -1])]
        movable = [i for i in range(4) if ext[i] > 0]
        ext[max(movable, key=lambda i: (missing[i], ext[i]))] -= 1


def lowres_maps(kspace: np.ndarray, ext: Tuple[int, int, int, int]) -> np.ndarray:
    """Maps from the Hann-windowed sampled centre: low-resolution coil images / their RSS.

    Args:
        kspace: (C, H, W) complex.
        ext: the calibration rectangle from :func:`calibration_region`.

    Returns:
        (C, H, W) complex64 maps, phase relative to coil 0, zero where the low-resolution RSS is below
        ``FALLBACK_SUPPORT`` of its maximum.
    """
    _, h, w = kspace.shape
    ch, cw = h // 2, w // 2
    rows = np.arange(ch - ext[0], ch + ext[1] + 1)
    cols = np.arange(cw - ext[2], cw + ext[3] + 1)

    def hann(n: int) -> np.ndarray:  # no zero end points, so even a 1- or 2-sample region keeps data
        return np.sin(np.pi * (np.arange(n) + 1) / (n + 1)) ** 2

    low = np.zeros_like(kspace)
    low[:, rows[:, None], cols[None, :]] = kspace[:, rows[:, None], cols[None, :]] * np.outer(
        hann(len(rows)), hann(len(cols))
    )
    imgs = _centered_fft_inverse(low)
    rss = np.sqrt((np.abs(imgs) ** 2).sum(axis=0))
    support = rss > FALLBACK_SUPPORT * rss.max() if rss.max() > 0 else np.zeros_like(rss, dtype=bool)
    maps = np.where(support, imgs / np.where(support, rss, 1.0), 0)
    return _phase_to_first_coil(maps).astype(np.complex64)


def _phase_to_first_coil(maps: np.ndarray) -> np.ndarray:
    ref = maps[0]
    mag = np.abs(ref)
    rotation = np.where(mag > 0, np.conj(ref) / np.where(mag > 0, mag, 1.0), 1.0)
    return maps * rotation


def _normalize(maps: np.ndarray) -> np.ndarray:
    """Finite maps with sum_c |S_c|^2 = 1 where any coil is non-zero, 0 elsewhere."""
    maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.sqrt((np.abs(maps) ** 2).sum(axis=0))
    return np.where(norm > 0, maps / np.where(norm > 0, norm, 1.0), 0).astype(np.complex64)


def _kernel_side(size: int, kernel_width: int) -> int:
    """Kernel side along an axis of the calibration region: at most ``kernel_width`` and half the region
    (so the patches shift along it), but 3 where the region allows, the smallest useful kernel."""
    return min(kernel_width, max(size // 2, min(MIN_KERNEL_WIDTH, size)))


def _kernel_gram(kernels: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """``G(r) = sum_n k_n(r) k_n(r)^H`` ``(H, W, C, C)`` of kernels ``(n, C, kh, kw)`` taken to image space.

    ``k_n(r)`` is the centred orthonormal inverse FFT of kernel n zero-padded to ``shape``. Each entry
    ``G_cd`` is the inverse FFT of the kernels' cross-correlation ``sum_n k_nc * conj(k_nd)`` (an array of
    ``(2 kh - 1, 2 kw - 1)`` lags), so this costs ``C^2`` image FFTs instead of ``n C`` FFTs and a
    per-pixel matrix product (BART's ecalib does the same).
    """
    n, c, kh, kw = kernels.shape
    lh, lw = 2 * kh - 1, 2 * kw - 1
    spec = torch.fft.fft2(kernels, s=(lh, lw))  # (n, C, lh, lw)
    flat = spec.reshape(n, c, lh * lw).permute(2, 1, 0)  # (lags, C, n)
    corr = (flat @ flat.conj().transpose(-1, -2)).permute(1, 2, 0).reshape(c, c, lh, lw)
    corr = torch.fft.fftshift(torch.fft.ifft2(corr), dim=(-2, -1))  # lags -(k-1)..k-1, zero lag centred
    big_h, big_w = shape
    padded = torch.zeros(c, c, big_h, big_w, dtype=kernels.dtype, device=kernels.device)
    top, left = big_h // 2 - (kh - 1), big_w // 2 - (kw - 1)
    padded[..., top : top + lh, left : left + lw] = corr
    # A lag d becomes e^{i 2 pi d r / N} / sqrt(HW) under ifft2c; the product of two padded kernels has
    # 1 / (HW): hence the extra 1 / sqrt(HW).
    gram = ifft2c(padded) / math.sqrt(big_h * big_w)
    return gram.permute(2, 3, 0, 1)


def espirit_maps(
    calib: torch.Tensor,
    shape: Tuple[int, int],
    kernel: Tuple[int, int] = (6, 6),
    thresh: float = 0.02,
    crop: float = 0.95,
    noise_std: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ESPIRiT on a rectangular calibration region (Uecker et al. 2014, as BART's ``ecalib``).

    The calibration matrix holds every ``kernel``-sized patch of the region (all coils) as a row; its
    right singular vectors above ``thresh`` times the largest singular value span the signal subspace.
    Their kernels, taken to image space, give at every pixel the matrix ``G(r) = sum_n k_n k_n^H``
    (``C x C``); the maps are its leading eigenvectors, kept where the eigenvalue exceeds ``crop``.

    Args:
        calib: ``(C, h, w)`` complex, the fully sampled centre (any rectangle, h != w allowed).
        shape: image ``(H, W)``.
        kernel: kernel size ``(kh, kw)``, at most ``(h, w)``.
        thresh: relative singular-value threshold, used when ``noise_std`` is not known.
        crop: eigenvalue threshold (1 = exactly in the signal subspace).
        noise_std: complex noise std of the (whitened) calibration samples. When given, the signal
            subspace is every singular value above the largest one pure noise would give, the
            Marchenko-Pastur edge ``sigma (sqrt(rows) + sqrt(cols))`` of the calibration matrix.

    Returns:
        ``(maps (C, H, W), eigenvalue (H, W))``; maps are zero where the eigenvalue is below ``crop``, phase
        relative to coil 0, unit norm over coils elsewhere.
    """
    c, h, w = calib.shape
    kh, kw = kernel
    if not (1 <= kh <= h and 1 <= kw <= w):
        raise ValueError(f"ESPIRiT kernel {kernel} does not fit the calibration region {(h, w)}")
    patches = calib.unfold(1, kh, 1).unfold(2, kw, 1)  # (C, nh, nw, kh, kw)
    mat = patches.permute(1, 2, 0, 3, 4).reshape(-1, c * kh * kw)
    # The right singular vectors from the small (C kh kw)^2 Gram matrix, in double precision: the
    # calibration matrix is tall (one row per patch position), and its SVD costs rows x cols^2 anyway.
    evals, evecs = torch.linalg.eigh(mat.to(torch.complex128).T.conj() @ mat.to(torch.complex128))
    s = evals.flip(0).clamp_min(0).sqrt()
    vh = evecs.flip(1).T.conj().to(calib.dtype)
    if noise_std is not None and noise_std > 0:
        cut = noise_std * (math.sqrt(mat.shape[0]) + math.sqrt(mat.shape[1]))
    else:
        cut = thresh * s[0]
    kernels = vh[s > cut].reshape(-1, c, kh, kw)
    big_h, big_w = shape
    gram = _kernel_gram(kernels, shape) * (big_h * big_w / (kh * kw))
    evals, evecs = torch.linalg.eigh(gram)  # ascending; (H, W, C), (H, W, C, C)
    eig = evals[..., -1]
    maps = evecs[..., -1].permute(2, 0, 1)  # (C, H, W)
    ref = maps[0]
    maps = maps * torch.where(ref.abs() > 0, ref.conj() / ref.abs().clamp_min(1e-30), torch.ones_like(ref))
    maps = torch.where(eig > crop, maps, torch.zeros_like(maps))
    return maps, eig


def estimate_sens_maps(
    kspace: np.ndarray,
    mask=None,
    max_calib: int = 0,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    device: Optional[str] = None,
    noise_std: Optional[float] = None,
) -> np.ndarray:
    """ESPIRiT sensitivity maps of one slice, calibrated on its whole fully sampled centre.

    Args:
        kspace: (C, H, W) complex k-space (numpy, or a torch tensor), fully sampled or masked.
        mask: sampling pattern broadcastable to (H, W); None infers it from the non-zero samples.
        max_calib: cap on each side of the calibration rectangle (0 = the whole fully sampled centre).
        thresh: singular-value threshold of the calibration matrix (relative to the largest).
        kernel_width: ESPIRiT kernel width (reduced along an axis where the region is narrow).
        crop: eigenvalue threshold; pixels below it get zero maps.
        device: torch device for the computation (None: CPU).
        noise_std: complex noise std of the k-space samples; when given it sets the singular-value
            threshold (see :func:`espirit_maps`) instead of ``thresh``.

    Returns:
        (C, H, W) complex64 maps, finite, sum_c |S_c|^2 = 1 on the support and 0 outside.
    """
    if hasattr(kspace, "detach"):
        kspace = kspace.detach().cpu().numpy()
    kspace = np.asarray(kspace)
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex (C, H, W), got {kspace.dtype} {kspace.shape}")
    kspace = kspace.astype(np.complex64)
    if not np.any(kspace):
        warnings.warn(
            "k-space is all zero; returning zero sensitivity maps", CalibrationWarning, stacklevel=2
        )
        return np.zeros(kspace.shape, np.complex64)
    sampled = sampled_pattern(kspace, mask)
    ext = list(calibration_region(sampled))
    if max_calib > 0:  # cap each side symmetrically around the centre
        for lo, hi in ((0, 1), (2, 3)):
            while ext[lo] + ext[hi] + 1 > max_calib:
                ext[lo if ext[lo] >= ext[hi] else hi] -= 1
    kspace = kspace * sampled  # a given mask wins over stray non-zero samples
    fallback = lowres_maps(kspace, tuple(ext))
    _, h, w = kspace.shape
    ch, cw = h // 2, w // 2
    rows, cols = ext[0] + ext[1] + 1, ext[2] + ext[3] + 1
    kernel = (_kernel_side(rows, kernel_width), _kernel_side(cols, kernel_width))
    region = f"{rows}x{cols}"
    if min(kernel) < MIN_KERNEL_WIDTH:
        warnings.warn(
            f"fully sampled centre {region} is too small for ESPIRiT (kernel {kernel_width}); "
            "using low-resolution maps (windowed centre / RSS)",
            CalibrationWarning,
            stacklevel=2,
        )
        return _normalize(fallback)
    if min(kernel) < kernel_width and max(rows, cols) < 2 * kernel_width:
        warnings.warn(
            f"calibration region {region} is small for kernel_width {kernel_width}; using kernel "
            f"{kernel[0]}x{kernel[1]}",
            CalibrationWarning,
            stacklevel=2,
        )
    calib = torch.from_numpy(kspace[:, ch - ext[0] : ch + ext[1] + 1, cw - ext[2] : cw + ext[3] + 1])
    maps, _ = espirit_maps(calib.to(device or "cpu"), (h, w), kernel, thresh, crop, noise_std)
    maps = maps.cpu().numpy()
    support = (np.abs(maps) > 0).any(axis=0).sum()
    wanted = (np.abs(fallback) > 0).any(axis=0).sum()
    if not np.all(np.isfinite(maps)) or support < MIN_SUPPORT_RATIO * wanted:
        warnings.warn(
            f"ESPIRiT kept {support} pixels of the {wanted}-pixel object (calibration {region}, kernel "
            f"{kernel[0]}x{kernel[1]}); using low-resolution maps (windowed centre / RSS)",
            CalibrationWarning,
            stacklevel=2,
        )
        return _normalize(fallback)
    return _normalize(maps)


def estimate_sens_maps_volume(kspace: np.ndarray, mask=None, progress: bool = False, **kwargs) -> np.ndarray:
    """:func:`estimate_sens_maps` for every slice of a (slices, C, H, W) volume -> (slices, C, H, W)."""
    kspace = np.asarray(kspace)
    if kspace.ndim != 4:
        raise ValueError(f"kspace volume must be (slices, C, H, W), got shape {kspace.shape}")
    out = np.empty(kspace.shape, np.complex64)
    slices = range(kspace.shape[0])
    if progress:
        from tqdm import tqdm

        slices = tqdm(slices, desc="ESPIRiT", leave=False)
    for s in slices:
        out[s] = estimate_sens_maps(kspace[s], mask=mask, **kwargs)
    return out
