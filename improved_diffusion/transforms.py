"""The image of a slice and its intensity scale: one rule shared by training and reconstruction.

The image of a fully sampled slice is ``ifft2c(kspace)`` (single-coil) or the coil combination
``sum_c conj(S_c) * ifft2c(y_c)`` with sensitivity maps ``S`` (multi-coil), :func:`slice_to_image`. The
network sees an image divided by :func:`scale_from_kspace`, computed from the part of k-space that is fully
sampled around the centre (:func:`sampled_center_block`): all of it for training data
(:mod:`improved_diffusion.fastmri_data`), the calibration region of undersampled measurements
(:mod:`improved_diffusion.reconstruction`), so both see images on the same intensity range (docs/data.md,
"Scaling rule").
"""

from typing import Optional, Tuple

import torch

from .mri.fftc import ifft2c

# The intensity scale is SCALE_MARGIN x the peak of the image from the largest centred k-space block that is
# fully sampled: the whole k-space in training (so the normalized training image peaks at exactly
# 1 / SCALE_MARGIN), all rows x the ACS columns of a column mask, the calibration square of a 2-D mask. A
# blurred image peaks lower than the sharp one, so undersampled data give a normalized peak somewhat above
# 1 / SCALE_MARGIN; the ``gain`` augmentation (augment.py) trains the prior on that range. The block must
# hold at least the 3x3 around the centre (H // 2, W // 2), which every supported mask samples.
SCALE_MIN_HALF_WIDTH = 1
SCALE_MARGIN = 2.0

# What to do about a multi-coil slice without maps (also in fastmri_data.check_file's message).
PREPARE_HINT = "run datasets/prepare_fastmri.py to add ESPIRiT sensitivity maps"


def _as_complex_tensor(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_complex():
        raise ValueError(f"{name} must be complex, got dtype {x.dtype}")
    return x


def slice_to_image(kspace: torch.Tensor, maps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Complex image of one fully sampled slice.

    Args:
        kspace: (H, W) single-coil or (C, H, W) multi-coil complex k-space (centered, fastMRI layout).
        maps: (C, H, W) complex sensitivity maps; required for multi-coil k-space, ignored otherwise.

    Returns:
        (H, W) complex image: ``ifft2c(kspace)`` or ``sum_c conj(maps_c) * ifft2c(kspace_c)``.
    """
    kspace = _as_complex_tensor("kspace", kspace)
    if kspace.ndim == 2:
        return ifft2c(kspace)
    if kspace.ndim != 3:
        raise ValueError(f"kspace must be (H, W) or (C, H, W), got shape {tuple(kspace.shape)}")
    if maps is None:
        raise ValueError(f"multi-coil kspace {tuple(kspace.shape)} needs sensitivity maps ({PREPARE_HINT})")
    maps = _as_complex_tensor("maps", maps).to(kspace.device)
    if maps.shape != kspace.shape:
        raise ValueError(f"maps shape {tuple(maps.shape)} does not match kspace shape {tuple(kspace.shape)}")
    return (maps.conj() * ifft2c(kspace)).sum(dim=-3)


def sampled_center_block(sampled: torch.Tensor) -> Optional[Tuple[slice, slice]]:
    """The largest fully sampled rectangle grown from the centre of a k-space sampling pattern.

    Starts from the 3x3 block around ``(H // 2, W // 2)`` and moves each of its four edges outwards, one
    row or column at a time, while the new row/column is sampled across the block. A column mask gives all
    rows x its ACS columns, a 2-D mask its calibration square, full sampling the whole k-space.

    Args:
        sampled: (H, W) bool, True where k-space was sampled.

    Returns:
        ``(rows, cols)`` slices, or None if the central 3x3 block is not fully sampled.
    """
    h, w = sampled.shape
    r = SCALE_MIN_HALF_WIDTH
    top, bottom, left, right = h // 2 - r, h // 2 + r + 1, w // 2 - r, w // 2 + r + 1  # half-open
    if top < 0 or left < 0 or bottom > h or right > w or not sampled[top:bottom, left:right].all():
        return None
    grown = True
    while grown:
        grown = False
        if top > 0 and sampled[top - 1, left:right].all():
            top, grown = top - 1, True
        if bottom < h and sampled[bottom, left:right].all():
            bottom, grown = bottom + 1, True
        if left > 0 and sampled[top:bottom, left - 1].all():
            left, grown = left - 1, True
        if right < w and sampled[top:bottom, right].all():
            right, grown = right + 1, True
    return slice(top, bottom), slice(left, right)


def scale_from_kspace(kspace: torch.Tensor, maps: Optional[torch.Tensor] = None) -> float:
    """Intensity scale of a slice: twice the peak of its image from the fully sampled k-space centre.

    ``scale = SCALE_MARGIN * max_r sqrt(sum_c |ifft2c(B y_c)(r)|^2)`` where ``B`` keeps the largest centred
    block that is fully sampled (:func:`sampled_center_block`) and zeros the rest: the whole k-space for
    training data, so training images peak at ``1 / SCALE_MARGIN``; the ACS region for undersampled data, a
    blurred image whose peak is somewhat lower (docs/reconstruction.md, "Intensity scale"). For normalized
    maps (sum_c |S_c|^2 = 1) the RSS of the coil images is the magnitude of the coil-combined image, so the
    scale does not depend on how the maps were estimated; ``maps`` is accepted for a uniform call signature
    and not used. All-zero k-space gives 1.0 (nothing to scale).

    Args:
        kspace: (H, W) or (C, H, W) complex k-space (torch or numpy), fully sampled or masked.
        maps: unused, see above.

    Returns:
        The scale (python float > 0); the network sees ``image / scale``.

    Raises:
        ValueError: if the central 3x3 block is not fully sampled (a mask that misses it).
    """
    del maps  # the RSS of the coil images already is the combined magnitude
    kspace = _as_complex_tensor("kspace", kspace)
    if kspace.ndim not in (2, 3):
        raise ValueError(f"kspace must be (H, W) or (C, H, W), got shape {tuple(kspace.shape)}")
    n = 2 * SCALE_MIN_HALF_WIDTH + 1
    if min(kspace.shape[-2:]) < n:
        raise ValueError(f"kspace {tuple(kspace.shape)} is smaller than the {n}x{n} scale block")
    sampled = (kspace != 0).reshape(-1, *kspace.shape[-2:]).any(dim=0)
    if not sampled.any():
        return 1.0
    block = sampled_center_block(sampled)
    if block is None:
        raise ValueError(
            f"the central {n}x{n} k-space block is only partly sampled; the intensity scale needs a mask "
            "that fully samples at least the 3 central rows and columns"
        )
    rows, cols = block
    low = torch.zeros_like(kspace)
    low[..., rows, cols] = kspace[..., rows, cols]
    low_img = ifft2c(low)
    rss = low_img.abs() if kspace.ndim == 2 else low_img.abs().pow(2).sum(dim=0).sqrt()
    return float(SCALE_MARGIN * rss.max())
