"""Measurement noise: its standard deviation, the coil noise covariance, and prewhitening.

Convention: ``sigma`` is the standard deviation of the complex noise of one k-space sample,
``E|n|^2 = sigma^2`` (so each of the real and imaginary parts has ``sigma / sqrt(2)``). With the orthonormal
centred FFT the same ``sigma`` is the noise of one image pixel.

Where the noise comes from, in order of preference (:func:`noise_covariance`):

1. a noise scan: samples ``(N, C)`` acquired with the RF off, as ISMRMRD raw data carries; the covariance
   is their sample covariance;
2. the data themselves (:func:`estimate_noise_covariance`), robustly:

   * column masks (the readout is fully sampled): inverse FFT along the readout to hybrid space (readout
     position x, phase encode), where two estimates are taken and the lower one is kept, since signal
     only adds energy to either:

     - the background: readout positions outside the object hold only noise in every measured column.
       Rank the positions by their energy in every other measured column and read the noise off the
       other columns at the ``BACKGROUND_FRACTION`` least energetic positions (independent halves, so
       the ranking does not bias the estimate low). The outer ``1 / EDGE_DIVISOR`` of the readout on
       each side is left out: receivers' anti-aliasing filters attenuate the noise there;
     - the second differences along the readout of the outer half of the measured columns (the phase
       encodes with the least signal): Donoho's MAD estimator ("De-noising by soft-thresholding", IEEE
       TIT 1995) on the fully sampled direction, for objects that fill the readout field of view.

     Both read the noise power off a median (``|n|^2`` of complex Gaussian noise is exponential, median
     ``sigma^2 ln 2``). The second differences alone were 1.8x (8 coils) to 3.9x (single-coil) too high on
     the demo data (image SNR about 100); figures in docs/reconstruction.md ("Noise");
   * 2-D masks: the same median on the outermost 20 % (by radius) of the measured k-space samples, where
     real scans hold almost only noise.

   The coil covariance is ``D R D`` with per-coil scales ``D`` from the medians and the correlation ``R``
   from the same samples after dropping the 20 % with most energy (signal).

Prewhitening (Pruessmann et al. 2001; Roemer et al. 1990): with ``Psi = L L^H`` (Cholesky), ``W = s L^{-1}``
turns coil noise into independent noise of equal variance ``s^2`` on every coil; ``s^2`` is the mean of
``diag(Psi)``, so uncorrelated equal-variance coils are left unchanged.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Share of the measured samples (outermost by radius) used on 2-D masks.
OUTER_FRACTION = 0.2
# Samples with the most energy dropped before the correlation is taken.
TRIM_FRACTION = 0.2
# Column masks: share of the readout positions taken as background, and the readout edges left out
# (1 / EDGE_DIVISOR of the positions on each side).
BACKGROUND_FRACTION = 0.125
EDGE_DIVISOR = 16
# An estimated std below this fraction of max|k| is float32 rounding of noiseless data (a measured scan's
# noise is 1e-5 to 1e-2 of its k-space peak): such data are treated as noiseless (sigma = 0).
NOISELESS_RELATIVE = 1e-6


@dataclass
class NoiseModel:
    """Coil noise of one scan.

    Attributes:
        covariance: ``(C, C)`` complex noise covariance of the coils (``(1, 1)`` for single-coil data).
        source: ``"noise_scan"``, ``"data"`` or ``"given"``.
    """

    covariance: np.ndarray
    source: str

    @property
    def sigma(self) -> float:
        """Mean per-coil complex noise std, ``sqrt(mean diag(Psi))``."""
        return float(np.sqrt(np.real(np.trace(self.covariance)) / self.covariance.shape[0]))

    def whitening(self) -> np.ndarray:
        """``(C, C)`` matrix ``W = sigma L^{-1}`` with ``Psi = L L^H``: ``W Psi W^H = sigma^2 I``
        (the identity for noiseless data)."""
        psi = np.asarray(self.covariance, dtype=np.complex128)
        if self.sigma == 0:
            return np.eye(len(psi), dtype=np.complex128)
        # A tiny ridge keeps the Cholesky factor defined for a (numerically) singular estimate.
        ridge = 1e-9 * np.real(np.trace(psi)) / len(psi)
        lower = np.linalg.cholesky(psi + ridge * np.eye(len(psi)))
        return self.sigma * np.linalg.inv(lower)


def covariance_from_noise_scan(noise: np.ndarray) -> np.ndarray:
    """Sample covariance ``(C, C)`` of a noise scan ``(N, C)`` (or ``(C, N)`` when ``C < N`` is on dim 0)."""
    noise = np.asarray(noise)
    if noise.ndim == 1:
        noise = noise[:, None]
    if noise.ndim != 2 or not np.iscomplexobj(noise):
        raise ValueError(f"a noise scan must be complex (samples, coils), got {noise.dtype} {noise.shape}")
    if noise.shape[0] < 2:
        raise ValueError(f"a noise scan needs at least 2 samples, got shape {noise.shape}")
    noise = noise - noise.mean(axis=0, keepdims=True)
    return (noise.T @ noise.conj()) / (noise.shape[0] - 1)


def _robust_covariance(samples: np.ndarray) -> np.ndarray:
    """``(C, C)`` covariance of complex noise samples ``(N, C)`` contaminated by some signal."""
    power = np.median(np.abs(samples) ** 2, axis=0) / np.log(2.0)  # per coil, E|n|^2
    scale = np.sqrt(np.maximum(power, np.finfo(np.float64).tiny))
    if samples.shape[1] == 1:
        return np.diag(power).astype(np.complex128)
    energy = (np.abs(samples / scale) ** 2).sum(axis=1)
    keep = samples[energy <= np.quantile(energy, 1.0 - TRIM_FRACTION)]
    cov = keep.T @ keep.conj() / len(keep)
    d = np.sqrt(np.real(np.diag(cov)))
    corr = cov / np.outer(d, d)
    return corr * np.outer(scale, scale)


def _column_mask(sampled: np.ndarray) -> bool:
    """True when every sampled column is sampled in every row (Cartesian phase-encode columns)."""
    cols = sampled.any(axis=0)
    return bool(sampled[:, cols].all())


def _noiseless_below_rounding(cov: np.ndarray, kspace: np.ndarray) -> np.ndarray:
    """``cov``, or zeros where its std is below ``NOISELESS_RELATIVE * max|k|``: the rounding of noiseless
    (simulated) single-precision data, which no solver here resolves, rather than noise."""
    sigma = np.sqrt(max(float(np.real(np.trace(cov))) / len(cov), 0.0))
    return np.zeros_like(cov) if sigma < NOISELESS_RELATIVE * float(np.abs(kspace).max()) else cov


def _background_samples(hybrid: np.ndarray) -> Optional[np.ndarray]:
    """``(N, C)`` hybrid-space samples at the readout positions with the least signal (module docstring).

    Args:
        hybrid: ``(C, H, n)`` measured columns after the inverse FFT along the readout.

    Returns:
        The samples, or None with fewer than 2 measured columns.
    """
    c, h, n = hybrid.shape
    if n < 2:
        return None
    edge = h // EDGE_DIVISOR
    inner = hybrid[:, edge : h - edge]
    rank, measure = inner[..., 0::2], inner[..., 1::2]
    energy = (np.abs(rank) ** 2).sum(axis=(0, 2))
    rows = np.argsort(energy)[: max(2, int(round(BACKGROUND_FRACTION * inner.shape[1])))]
    return measure[:, rows].reshape(c, -1).T


def estimate_noise_covariance(kspace: np.ndarray, sampled: Optional[np.ndarray] = None) -> np.ndarray:
    """Robust coil noise covariance ``(C, C)`` from measured k-space (see the module docstring).

    Args:
        kspace: ``(C, H, W)`` or ``(H, W)`` complex k-space (centred, readout along H).
        sampled: ``(H, W)`` bool pattern of measured samples; None means non-zero samples.

    Returns:
        ``(C, C)`` complex128 Hermitian covariance (``(1, 1)`` for single-coil data).
    """
    kspace = np.asarray(kspace)
    if kspace.ndim == 2:
        kspace = kspace[None]
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex (C, H, W) or (H, W), got {kspace.dtype} {kspace.shape}")
    if sampled is None:
        sampled = np.any(kspace != 0, axis=0)
    sampled = np.broadcast_to(np.asarray(sampled, dtype=bool), kspace.shape[-2:])
    if not sampled.any():
        raise ValueError("no sampled k-space point to estimate the noise from")
    h, w = kspace.shape[-2:]
    if _column_mask(sampled) and h >= 8:
        cols = np.flatnonzero(sampled.any(axis=0))
        hybrid = np.fft.fftshift(
            np.fft.ifft(np.fft.ifftshift(kspace[..., cols], axes=-2), axis=-2, norm="ortho"), axes=-2
        )
        outer = hybrid[..., np.abs(cols - w // 2) >= np.median(np.abs(cols - w // 2))]
        # Second differences along the readout, non-overlapping triplets so the samples are independent.
        d2 = (outer[:, 2:] - 2 * outer[:, 1:-1] + outer[:, :-2])[:, ::3] / np.sqrt(6.0)
        estimates = [_robust_covariance(d2.reshape(kspace.shape[0], -1).T.astype(np.complex128))]
        background = _background_samples(hybrid)
        if background is not None:
            estimates.append(_robust_covariance(background.astype(np.complex128)))
        cov = min(estimates, key=lambda e: float(np.real(np.trace(e))))
    else:
        yy, xx = np.meshgrid(
            (np.arange(h) - h // 2) / max(h / 2, 1), (np.arange(w) - w // 2) / max(w / 2, 1), indexing="ij"
        )
        radius = np.hypot(yy, xx)[sampled]
        outer = radius >= np.quantile(radius, 1.0 - OUTER_FRACTION)
        cov = _robust_covariance(kspace[:, sampled][:, outer].T.astype(np.complex128))
    return _noiseless_below_rounding(cov, kspace)


def noise_model(
    kspace: np.ndarray,
    sampled: Optional[np.ndarray] = None,
    noise_scan: Optional[np.ndarray] = None,
    noise_std: Optional[float] = None,
) -> NoiseModel:
    """The noise of one slice: a given std, else the noise scan, else an estimate from the data.

    Args:
        kspace: ``(C, H, W)`` or ``(H, W)`` complex measured k-space.
        sampled: ``(H, W)`` bool pattern of measured samples.
        noise_scan: ``(N, C)`` complex noise samples, or None.
        noise_std: complex noise std to use (white, equal on every coil), overriding everything; 0 means
            noiseless data, None (or < 0) not given.
    """
    num_coils = 1 if np.ndim(kspace) == 2 else int(np.shape(kspace)[0])
    if noise_std is not None and noise_std >= 0:
        return NoiseModel(np.eye(num_coils, dtype=np.complex128) * float(noise_std) ** 2, "given")
    if noise_scan is not None:
        cov = covariance_from_noise_scan(noise_scan)
        if cov.shape != (num_coils, num_coils):
            raise ValueError(f"noise scan has {cov.shape[0]} coils, k-space has {num_coils}")
        return NoiseModel(cov, "noise_scan")
    return NoiseModel(estimate_noise_covariance(kspace, sampled), "data")
