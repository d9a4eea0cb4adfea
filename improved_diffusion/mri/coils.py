"""One slice's measurements made ready for reconstruction: noise, prewhitened coils, maps that fit them.

:func:`prepare_slice` is the single place where a measured slice becomes the model ``y = M F(S x) + n``
with white noise of a known ``sigma``, for the diffusion reconstruction and the classical baselines alike:

0. the reconstruction field of view: the readout is cropped to ``fov_rows`` exactly in k-space
   (:mod:`improved_diffusion.mri.fov`), so everything below runs on ``(fov_rows, W)``;
1. the noise model (:mod:`improved_diffusion.mri.noise`: a given std, a noise scan, or an estimate);
2. multi-coil: prewhitening ``y <- W y`` so that the coil noise is independent with equal variance,
   then coil compression to virtual coils ``y <- U^H y`` (:func:`compress_coils`; U has orthonormal
   columns, so the noise stays white with the same ``sigma``);
3. sensitivity maps of the whitened coils: ESPIRiT on the whole fully sampled centre
   (:func:`improved_diffusion.mri.espirit.estimate_sens_maps`), or maps stored with the data, whitened the
   same way (``W S``), checked and normalized to ``sum_c |S_c|^2 = 1`` on their support;
   optionally refined jointly with the image on all measured data (:mod:`improved_diffusion.mri.jsense`,
   ``refine_maps`` outer iterations);
4. a check that maps times image predict the calibration data to the noise level (:func:`calibration_misfit`).

Whitening and normalizing change the coil-combined image by a smooth per-pixel factor. ``intensity``
undoes it for the magnitude output: ``|x| * ||W^{-1} U S(r)||`` is the root-sum-of-squares of the
(unwhitened, uncompressed) coil images ``W^{-1} U S x``, fastMRI's multi-coil target.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from . import jsense
from .espirit import calibration_region, estimate_sens_maps, sampled_pattern
from .fov import crop_rows, readout_complete, readout_crop
from .noise import noise_model
from .sense import SenseNormal, sense_adjoint, sense_forward
from .solvers import conjugate_gradient

# Calibration misfit (in units of the misfit pure noise would leave) above which maps are reported as not
# explaining the data.
MISFIT_WARN = 2.0
# At most this many refinements of a noise estimate from the data by the calibration residual.
SIGMA_REFINEMENTS = 4
# Automatic coil compression keeps the fewest virtual coils that hold this fraction of the whitened
# k-space energy, but never fewer than MIN_VIRTUAL_COILS: scans with up to 8 coils are left as they are,
# and 15-20 coil knee/brain scans go to about 8 (SVD compression to 8 costs them little, Huang et al.).
COIL_ENERGY = 0.99
MIN_VIRTUAL_COILS = 8
# The maps' support: where sum_c |S_c|^2 exceeds this fraction of its maximum.
MAPS_SUPPORT = 1e-6
# Stored maps used as they are (training) must have sum_c |S_c|^2 = 1 on their support to this tolerance;
# datasets/prepare_fastmri.py's ESPIRiT maps are normalized to float32 rounding (about 1e-6).
MAPS_NORM_TOLERANCE = 1e-3


class MapsWarning(UserWarning):
    """The sensitivity maps do not predict the calibration data to the noise level."""


@dataclass
class CoilData:
    """A slice ready for reconstruction (numpy).

    Attributes:
        kspace: masked k-space, ``(H, W)`` single-coil or ``(C, H, W)`` prewhitened (and compressed)
            multi-coil, complex64, on the reconstruction grid (readout cropped to ``fov_rows``).
        mask: the sampling mask on that grid, broadcastable to ``(H, W)``.
        maps: ``(C, H, W)`` normalized maps of the whitened (virtual) coils, or None for single-coil data.
        sigma: complex noise std of one (whitened) k-space sample.
        noise_source: ``given``, ``noise_scan`` or ``data``.
        intensity: ``(H, W)`` factor from the coil-combined magnitude to the RSS of the unwhitened coil
            images (1 off the maps' support and for single-coil data).
        calib_misfit: :func:`calibration_misfit` of the maps (NaN for single-coil data).
        num_coils: coils as measured (1 for single-coil data); ``kspace`` holds ``C <= num_coils``.
    """

    kspace: np.ndarray
    mask: np.ndarray
    maps: Optional[np.ndarray]
    sigma: float
    noise_source: str
    intensity: np.ndarray
    calib_misfit: float = float("nan")
    num_coils: int = 1

    @property
    def multicoil(self) -> bool:
        return self.maps is not None


def check_maps(maps: np.ndarray, shape, name: str = "sens_maps") -> np.ndarray:
    """Validate stored maps ``(C, H, W)`` and return them normalized (``sum_c |S_c|^2 = 1`` on the support).

    Raises:
        ValueError: wrong shape, non-finite values, or all zero.
    """
    maps = np.asarray(maps)
    if maps.shape != tuple(shape) or not np.iscomplexobj(maps):
        raise ValueError(f"'{name}' {maps.dtype} {maps.shape} does not match the k-space {tuple(shape)}")
    if not np.isfinite(maps).all():
        raise ValueError(f"'{name}' holds NaN or inf values")
    norm = np.sqrt((np.abs(maps) ** 2).sum(axis=0))
    if not norm.any():
        raise ValueError(f"'{name}' is all zero")
    support = norm > MAPS_SUPPORT * norm.max()
    return np.where(support, maps / np.where(support, norm, 1.0), 0).astype(np.complex64)


def maps_problem(maps, name: str = "sens_maps") -> Optional[str]:
    """What makes finite stored maps ``(C, H, W)`` unusable as they are, or None.

    Training combines coils with the stored maps directly (``sum_c conj(S_c) F^-1 y_c``), so maps that are
    all zero, or whose ``sum_c |S_c|^2`` is not 1 on their support, would silently zero or rescale the
    image against its k-space scale. (Reconstruction normalizes stored maps instead: :func:`check_maps`.)
    """
    sumsq = (np.abs(np.asarray(maps)) ** 2).sum(axis=0)
    if not sumsq.any():
        return f"'{name}' is all zero"
    on = sumsq[sumsq > MAPS_SUPPORT**2 * sumsq.max()]
    if np.abs(on - 1).max() > MAPS_NORM_TOLERANCE:
        return (
            f"'{name}' are not normalized: sum_c |S_c|^2 is {on.min():.3g} to {on.max():.3g} on their "
            "support, expected 1"
        )
    return None


def compress_coils(kspace: np.ndarray, num_virtual_coils: int = 0) -> np.ndarray:
    """The virtual-coil basis of SVD coil compression (Buehrer et al. 2007, Huang et al. 2008).

    The coil covariance ``K K^H`` of the whitened, masked k-space ``K`` (all sampled points) is
    diagonalised; its leading eigenvectors ``U`` (orthonormal columns) span the coil combinations that
    hold the most energy, and ``U^H y`` are the virtual coils. Whitened noise stays white with the same
    std in them, and dropping the weakest combinations drops mostly noise.

    Args:
        kspace: ``(C, H, W)`` prewhitened k-space (zeros where not sampled).
        num_virtual_coils: > 0 that many (at most C); 0 the fewest that hold ``COIL_ENERGY`` of the
            energy, at least ``MIN_VIRTUAL_COILS``; -1 no compression (U = I).

    Returns:
        ``U``: ``(C, V)`` complex64 with orthonormal columns, strongest first (the identity when V = C).
    """
    c = kspace.shape[0]
    if num_virtual_coils < -1:
        raise ValueError(
            f"num_virtual_coils must be > 0, 0 (automatic) or -1 (none), got {num_virtual_coils}"
        )
    if num_virtual_coils == -1 or c == 1:
        return np.eye(c, dtype=np.complex64)
    k = kspace.reshape(c, -1).astype(np.complex128)
    energy, vectors = np.linalg.eigh(k @ k.conj().T)  # ascending
    energy, vectors = energy[::-1].clip(min=0), vectors[:, ::-1]
    if num_virtual_coils > 0:
        v = min(num_virtual_coils, c)
    else:
        share = np.cumsum(energy) / max(energy.sum(), 1e-300)
        v = max(int(np.searchsorted(share, COIL_ENERGY) + 1), MIN_VIRTUAL_COILS)
    if v >= c:  # nothing to drop: keep the measured coils (a rotation would only cost time)
        return np.eye(c, dtype=np.complex64)
    return np.ascontiguousarray(vectors[:, :v]).astype(np.complex64)


def calibration_misfit(
    kspace: np.ndarray, maps: np.ndarray, sampled: np.ndarray, sigma: float, iters: int = 100
) -> float:
    """How well maps times an image predict the fully sampled centre, in units of what noise leaves.

    The image that best explains the calibration rectangle alone, ``argmin_x ||M_cal F(S x) - y_cal||^2``
    (conjugate gradients from 0), leaves a residual; white noise of std ``sigma`` alone would leave about
    ``sigma^2 (C - 1)`` per calibration position (one of the C coil values per position is fitted). The
    ratio is about 1 for maps that explain the data and grows with the signal they cannot explain (NaN
    for noiseless data, ``sigma = 0``).
    """
    c, h, w = kspace.shape
    top, bottom, left, right = calibration_region(sampled)
    ch, cw = h // 2, w // 2
    region = torch.zeros(h, w)
    region[ch - top : ch + bottom + 1, cw - left : cw + right + 1] = 1.0
    s = torch.from_numpy(maps.astype(np.complex64))[None]
    y = torch.from_numpy(kspace.astype(np.complex64))[None] * region
    rhs = sense_adjoint(y, s, region)
    normal = SenseNormal(s, region)
    x = conjugate_gradient(normal, rhs, torch.zeros_like(rhs), iters, tol=1e-4)
    misfit = float((sense_forward(x, s, region) - y).abs().pow(2).sum())
    expected = sigma**2 * (c - 1) * float(region.sum())
    return misfit / expected if expected > 0 else float("nan")


def prepare_slice(
    kspace,
    mask,
    maps=None,
    noise_scan: Optional[np.ndarray] = None,
    noise_std: Optional[float] = None,
    warn_misfit: bool = True,
    estimate_maps: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None,
    fov_rows: Optional[int] = None,
    num_virtual_coils: int = -1,
    refine_maps: int = 0,
) -> CoilData:
    """Noise model, prewhitening and maps for one slice (see the module docstring).

    Args:
        kspace: measured k-space ``(H, W)`` or ``(C, H, W)`` (numpy or torch, complex); entries off the mask
            are ignored. One coil without maps is single-coil data.
        mask: sampling mask broadcastable to ``(H, W)``.
        maps: stored sensitivity maps ``(C, H, W)`` of the (unwhitened) coils, or None to estimate them.
        noise_scan: ``(N, C)`` complex noise samples, or None.
        noise_std: complex noise std overriding the noise scan and the estimate (0: noiseless data;
            None: not given).
        warn_misfit: warn (:class:`MapsWarning`) when the maps do not explain the calibration data.
        estimate_maps: ``(whitened k-space (C, H, W), sampled (H, W)) -> maps`` instead of this package's
            ESPIRiT (e.g. ``mri.bart.ecalib``); the noise estimate is then not refined by the maps.
        fov_rows: crop the readout (rows) to this many rows first (:func:`improved_diffusion.mri.fov.
            readout_crop`; stored maps are cropped in the image domain); None keeps the grid.
        num_virtual_coils: coil compression after prewhitening (:func:`compress_coils`): > 0 that many
            virtual coils, 0 automatic, -1 none.
        refine_maps: outer iterations of the joint refinement of the maps with the image on all measured
            data (:func:`improved_diffusion.mri.jsense.refine_maps`); 0 = off.

    Returns:
        :class:`CoilData`.
    """
    kspace = _numpy(kspace).astype(np.complex64)
    if kspace.ndim == 3 and kspace.shape[0] == 1 and maps is None:
        kspace = kspace[0]
    if kspace.ndim not in (2, 3):
        raise ValueError(f"kspace must be (H, W) or (C, H, W), got shape {kspace.shape}")
    mask = np.asarray(_numpy(mask), dtype=np.float32)
    if fov_rows is not None and fov_rows != kspace.shape[-2]:
        kspace, mask, maps = _crop_fov(kspace, mask, maps, fov_rows)
    sampled = sampled_pattern(kspace if kspace.ndim == 3 else kspace[None], mask)
    kspace = kspace * sampled
    if not np.isfinite(kspace).all():
        raise ValueError("k-space holds NaN or inf values")
    if not kspace.any():
        raise ValueError("k-space is all zero where it is sampled")
    noise = noise_model(kspace, sampled, noise_scan, noise_std)
    if kspace.ndim == 2:
        return CoilData(kspace, mask, None, noise.sigma, noise.source, np.ones(kspace.shape, np.float32))
    num_coils = kspace.shape[0]
    whiten = noise.whitening()
    kspace = np.einsum("cd,dhw->chw", whiten, kspace).astype(np.complex64)
    # Virtual coils: y <- U^H W y, and their maps U^H W S; `unmix` takes them back to the measured coils.
    basis = compress_coils(kspace, num_virtual_coils)
    to_virtual = basis.conj().T @ whiten
    unmix = np.linalg.inv(whiten) @ basis
    if basis.shape[1] < num_coils:
        kspace = np.einsum("vc,chw->vhw", basis.conj().T, kspace).astype(np.complex64)
    sigma = noise.sigma
    if maps is None and estimate_maps is not None:
        maps = check_maps(_numpy(estimate_maps(kspace, sampled)), kspace.shape)
        misfit = calibration_misfit(kspace, maps, sampled, sigma)
    elif maps is None:
        maps = estimate_sens_maps(kspace, mask=sampled, noise_std=sigma)
        misfit = calibration_misfit(kspace, maps, sampled, sigma)
        # The estimate from the data is an upper bound; so is the calibration residual that no image
        # through the maps explains, and it is often tighter: move to it (and to the maps its threshold
        # gives) while it keeps falling.
        for _ in range(SIGMA_REFINEMENTS if noise.source == "data" else 0):
            if not misfit <= 0.95:
                break
            sigma *= float(np.sqrt(misfit))
            maps = estimate_sens_maps(kspace, mask=sampled, noise_std=sigma)
            misfit = calibration_misfit(kspace, maps, sampled, sigma)
    else:
        maps = check_maps(_numpy(maps), (num_coils,) + kspace.shape[1:])
        maps = check_maps(np.einsum("cd,dhw->chw", to_virtual, maps), kspace.shape)
        misfit = calibration_misfit(kspace, maps, sampled, sigma)
    if refine_maps > 0:
        maps = jsense.refine_maps(kspace, sampled, maps, sigma, refine_maps).maps
        misfit = calibration_misfit(kspace, maps, sampled, sigma)
    unwhitened = np.einsum("cd,dhw->chw", unmix, maps)
    norm = np.sqrt((np.abs(unwhitened) ** 2).sum(axis=0))
    intensity = np.where((np.abs(maps) > 0).any(axis=0), norm, 1.0).astype(np.float32)
    if warn_misfit and misfit > MISFIT_WARN:
        warnings.warn(
            f"the sensitivity maps leave {misfit:.1f}x the noise-level misfit on the calibration data "
            "(maps do not explain the data: check the calibration region, or refine the maps)",
            MapsWarning,
            stacklevel=2,
        )
    return CoilData(kspace, mask, maps, sigma, noise.source, intensity, misfit, num_coils)


def _crop_fov(kspace: np.ndarray, mask: np.ndarray, maps, rows: int):
    """Readout crop of k-space ``(..., H, W)``, of a 2-D mask and of stored maps (image domain)."""
    shape = kspace.shape[-2:]
    if not readout_complete(mask, shape):
        raise ValueError(
            f"the mask undersamples the readout (rows), so the readout cannot be cropped to {rows} rows "
            "(use fov_rows -1 to keep the full grid)"
        )
    kspace = readout_crop(torch.from_numpy(kspace), rows).numpy()
    if mask.ndim == 2 and mask.shape[0] == shape[0]:
        mask = mask[(shape[0] - rows) // 2 :][:rows]
    if maps is not None:
        maps = crop_rows(torch.as_tensor(_numpy(maps)), rows).numpy()
    return kspace, mask, maps


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)
