"""Image-quality metrics with fastMRI's conventions (``fastmri.evaluate``), on numpy volumes.

All functions take real magnitude volumes ``(slices, H, W)`` (a single ``(H, W)`` slice is treated as a
one-slice volume) and return Python floats:

- ``nmse = ||gt - pred||^2 / ||gt||^2`` over the whole volume;
- ``psnr = 10 log10(maxval^2 / mse)`` over the whole volume, ``maxval = gt.max()`` of the volume by default;
- ``ssim``: mean over slices of the per-slice SSIM (Wang et al., "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 2004) with a 7x7 uniform window, K1 = 0.01, K2 = 0.03,
  sample (N-1) covariances, ``data_range = maxval`` of the *volume*, local maps cropped by 3 pixels at each
  border before averaging — scikit-image's ``structural_similarity`` defaults, which fastMRI calls.

Computation is in float64 whatever the input dtype (scikit-image keeps float32 inputs in float32; the
difference is at the 1e-7 level, see tests/test_metrics.py). Score against the right target: RSS for
multi-coil data, the single-coil image otherwise, both center-cropped the same way.
"""

from typing import Dict, Optional

import numpy as np
import torch
from scipy.ndimage import uniform_filter

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_volume(name: str, a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if np.iscomplexobj(a):
        raise ValueError(f"metrics: {name} is complex; pass magnitude images (abs) instead")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"metrics: {name} must be a volume (slices, H, W) or one slice (H, W), got {a.shape}"
        )
    return a.astype(np.float64, copy=False)


def _pair(gt, pred):
    gt, pred = _as_volume("gt", gt), _as_volume("pred", pred)
    if gt.shape != pred.shape:
        raise ValueError(f"metrics: gt {gt.shape} and pred {pred.shape} differ in shape")
    return gt, pred


def _maxval(gt: np.ndarray, maxval: Optional[float]) -> float:
    value = float(gt.max()) if maxval is None else float(maxval)
    if not value > 0:
        raise ValueError(f"metrics: data range (maxval) must be > 0, got {value}")
    return value


def mse(gt, pred) -> float:
    """Mean squared error over the volume."""
    gt, pred = _pair(gt, pred)
    return float(np.mean((gt - pred) ** 2))


def nmse(gt, pred) -> float:
    """Normalized MSE ``||gt - pred||^2 / ||gt||^2`` over the volume."""
    gt, pred = _pair(gt, pred)
    energy = float(np.sum(gt**2))
    if energy == 0:
        raise ValueError("metrics: nmse is undefined for an all-zero gt")
    return float(np.sum((gt - pred) ** 2) / energy)


def psnr(gt, pred, maxval: Optional[float] = None) -> float:
    """PSNR in dB over the volume with data range ``maxval`` (default: ``gt.max()``); inf if identical."""
    gt, pred = _pair(gt, pred)
    peak = _maxval(gt, maxval)
    err = float(np.mean((gt - pred) ** 2))
    if err == 0:
        return float("inf")
    return float(10 * np.log10(peak**2 / err))


def _ssim_slice(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Mean SSIM of two (H, W) float64 images (see the module docstring for the convention)."""
    n = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = n / (n - 1)  # local sample covariances, as scikit-image's default

    def local_mean(a):
        return uniform_filter(a, size=SSIM_WINDOW)  # mode "reflect" at the borders

    mx, my = local_mean(x), local_mean(y)
    vx = cov_norm * (local_mean(x * x) - mx * mx)
    vy = cov_norm * (local_mean(y * y) - my * my)
    vxy = cov_norm * (local_mean(x * y) - mx * my)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (SSIM_WINDOW - 1) // 2  # only windows that lie fully inside the image are averaged
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def ssim(gt, pred, maxval: Optional[float] = None) -> float:
    """SSIM averaged over slices, data range ``maxval`` (default: ``gt.max()`` of the whole volume)."""
    gt, pred = _pair(gt, pred)
    if min(gt.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"metrics: ssim needs slices of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {gt.shape[-2:]}"
        )
    peak = _maxval(gt, maxval)
    return float(np.mean([_ssim_slice(g, p, peak) for g, p in zip(gt, pred)]))


def volume_metrics(gt, pred, maxval: Optional[float] = None) -> Dict[str, float]:
    """``{"nmse", "psnr", "ssim"}`` of one volume (fastMRI's per-volume numbers)."""
    return {"nmse": nmse(gt, pred), "psnr": psnr(gt, pred, maxval), "ssim": ssim(gt, pred, maxval)}
