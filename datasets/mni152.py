"""The MNI152 template and its tissue maps (nilearn, resolution=1, no download), as oriented slices.

Every volume is ``(z, AP, LR)`` on the template's 1 mm grid (197 x 233 x 189 voxels): axial slices, anterior
at row 0. :func:`oriented` views such a volume as coronal or sagittal slices. Used by make_demo_data.py (the
demo set and its synthesized contrasts).
"""

import functools
from typing import Tuple

import numpy as np

BRAIN_AREA_FRACTION = 0.3  # a slice counts as brain when its area is >= 30% of the largest slice's
TISSUE_LEVEL = 0.05  # template intensity above which a voxel is tissue
ORIENTATIONS = ("axial", "coronal", "sagittal")


@functools.lru_cache(maxsize=1)
def load_template() -> np.ndarray:
    """MNI152 T1 template as axial slices (z, AP, LR) float32 in [0, 1], anterior at row 0 (read-only)."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)  # (x, y, z)
    vol = np.transpose(vol, (2, 1, 0))[:, ::-1, :]  # (z, y, x) with y flipped: anterior first
    vol = np.ascontiguousarray(vol / vol.max())
    vol.flags.writeable = False  # cached: shared by every call
    return vol


@functools.lru_cache(maxsize=1)
def load_tissue_maps() -> np.ndarray:
    """GM, WM and CSF fractions (3, z, AP, LR) float32 on the template's grid and orientation (read-only).

    GM and WM probabilities (nilearn, resolution=1) are multiplied by the binary brain mask; CSF is
    ``mask - GM - WM`` clipped at 0, so the three add up to at most 1 inside the mask and are 0 outside.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template

    def axial(img) -> np.ndarray:
        vol = np.asarray(img.get_fdata(), dtype=np.float32)  # (x, y, z), as load_template
        return np.transpose(vol, (2, 1, 0))[:, ::-1, :]

    mask = (axial(load_mni152_brain_mask(resolution=1)) > 0.5).astype(np.float32)
    gm = np.clip(axial(load_mni152_gm_template(resolution=1)), 0, 1) * mask
    wm = np.clip(axial(load_mni152_wm_template(resolution=1)), 0, 1) * mask
    total = gm + wm
    over = total > 1  # rounding (sums of 1 + 3e-8 occur): keep gm + wm <= 1
    gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
    csf = np.clip(mask - gm - wm, 0, None)
    maps = np.ascontiguousarray(np.stack([gm, wm, csf]))
    maps.flags.writeable = False
    return maps


def oriented(vol: np.ndarray, orientation: str) -> np.ndarray:
    """A (..., z, AP, LR) volume as (..., slice, rows, cols) for ``orientation`` (a view).

    axial: (z, AP, LR), anterior up; coronal: (AP, z, LR), superior up; sagittal: (LR, z, AP), superior up,
    anterior left.
    """
    if orientation == "axial":
        return vol
    flipped = vol[..., ::-1, :, :]  # superior first
    if orientation == "coronal":
        return np.swapaxes(flipped, -3, -2)
    if orientation == "sagittal":
        return np.moveaxis(flipped, -1, -3)
    raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")


def brain_slices(vol: np.ndarray) -> Tuple[int, int]:
    """First and last axial slice whose tissue area is at least BRAIN_AREA_FRACTION of the largest."""
    area = (vol > TISSUE_LEVEL).sum(axis=(1, 2))
    keep = np.nonzero(area >= BRAIN_AREA_FRACTION * area.max())[0]
    return int(keep[0]), int(keep[-1])
