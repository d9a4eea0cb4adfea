"""Coil sensitivity maps from the fully sampled k-space centre: ESPIRiT, with a low-resolution fallback.

ESPIRiT (Uecker et al., "ESPIRiT - an eigenvalue approach to autocalibrating parallel MRI: where SENSE
meets GRAPPA", MRM 71:990-1001, 2014) runs through ``sigpy.mri.app.EspiritCalib``. sigpy takes a square
calibration region of ``calib_width`` around the centre, so this module first finds the largest centred
rectangle that is actually fully sampled (from ``mask`` or from the non-zero k-space) and shrinks the
square to fit in it. When that square is too small for the kernel (fastMRI's 8x masks leave 5 centre
columns at 128 columns) or ESPIRiT keeps almost no support, it falls back, with a warning, to maps from
the windowed low-resolution coil images of the sampled centre divided by their root-sum-of-squares
(the approach of e.g. McKenzie et al., MRM 2002 "self-calibrating parallel imaging"). Either way the maps
are finite, their phase is relative to coil 0 (ESPIRiT's convention) and ``sum_c |S_c|^2 = 1`` on the
support, 0 outside.
"""

import warnings
from typing import Tuple

import numpy as np

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


def _square_width(ext: Tuple[int, int, int, int], calib_width: int) -> int:
    """Largest square side <= calib_width that sigpy's centred crop places inside the sampled rectangle.

    sigpy takes indices ``c - n // 2 .. c - n // 2 + n - 1`` along each axis for a side ``n``.
    """
    before, after = min(ext[0], ext[2]), min(ext[1], ext[3])
    n = calib_width
    while n > 1 and not (n // 2 <= before and n - n // 2 - 1 <= after):
        n -= 1
    return n


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


def estimate_sens_maps(
    kspace: np.ndarray,
    mask=None,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    device=-1,
    max_iter: int = 100,
) -> np.ndarray:
    """ESPIRiT sensitivity maps of one slice, from its actually sampled centre.

    Args:
        kspace: (C, H, W) complex k-space (numpy, or a torch tensor), fully sampled or masked.
        mask: sampling pattern broadcastable to (H, W); None infers it from the non-zero samples.
        calib_width: side of ESPIRiT's square calibration region (shrunk to the sampled centre).
        thresh: singular-value threshold of the calibration matrix (relative to the largest).
        kernel_width: ESPIRiT kernel width (reduced to half the calibration side when needed).
        crop: eigenvalue threshold; pixels below it get zero maps.
        device: sigpy device (-1 CPU, >= 0 GPU through cupy).
        max_iter: power iterations.

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
    ext = calibration_region(sampled)
    kspace = kspace * sampled  # a given mask wins over stray non-zero samples
    fallback = lowres_maps(kspace, ext)

    n = _square_width(ext, calib_width)
    kw = min(kernel_width, n // 2)
    region = f"{ext[0] + ext[1] + 1}x{ext[2] + ext[3] + 1}"
    if kw < MIN_KERNEL_WIDTH:
        warnings.warn(
            f"fully sampled centre {region} is too small for ESPIRiT (kernel {kernel_width}); "
            "using low-resolution maps (windowed centre / RSS)",
            CalibrationWarning,
            stacklevel=2,
        )
        return _normalize(fallback)
    if kw < kernel_width:
        warnings.warn(
            f"calibration square {n}x{n} (sampled centre {region}) is small for kernel_width "
            f"{kernel_width}; using kernel_width {kw}",
            CalibrationWarning,
            stacklevel=2,
        )
    maps = _espirit(kspace, n, thresh, kw, crop, device, max_iter)
    support = (np.abs(maps) > 0).any(axis=0).sum()
    wanted = (np.abs(fallback) > 0).any(axis=0).sum()
    if not np.all(np.isfinite(maps)) or support < MIN_SUPPORT_RATIO * wanted:
        warnings.warn(
            f"ESPIRiT kept {support} pixels of the {wanted}-pixel object (calibration {n}x{n}, kernel {kw}); "
            "using low-resolution maps (windowed centre / RSS)",
            CalibrationWarning,
            stacklevel=2,
        )
        return _normalize(fallback)
    return _normalize(maps)


def _espirit(
    kspace: np.ndarray, calib: int, thresh: float, kernel_width: int, crop: float, device, max_iter: int
) -> np.ndarray:
    import sigpy as sp  # lazy: sigpy (numba) costs seconds to import
    import sigpy.mri as mr

    dev = sp.Device(device)
    app = mr.app.EspiritCalib(
        sp.to_device(kspace, dev),
        calib_width=calib,
        thresh=thresh,
        kernel_width=kernel_width,
        crop=crop,
        device=dev,
        max_iter=max_iter,
        show_pbar=False,
    )
    with np.errstate(invalid="ignore", divide="ignore"):  # sigpy divides by |S_0| = 0 outside the support
        maps = app.run()
    return np.asarray(sp.to_device(maps, sp.cpu_device))


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
