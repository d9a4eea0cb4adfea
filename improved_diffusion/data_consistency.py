"""Data consistency (DC) for diffusion sampling: keep every sample consistent with noisy measured k-space.

Everything here works in the model's normalized units (image / scale, measurements / scale) on complex
images ``(B, H, W)``; the sampler sees real 2-channel tensors ``(B, 2, H, W)`` (real, imaginary).

The measurement model is ``y = A x + n`` with ``A x = M · F(S_c · x)`` (SENSE, Pruessmann et al. 1999)
for multi-coil data with sensitivity maps ``S`` and ``A x = M · F x`` for single-coil data, ``F`` the
centred orthonormal FFT, ``M`` the binary mask, and white complex noise of std ``sigma`` per sample (coils
prewhitened by :func:`improved_diffusion.mri.coils.prepare_slice`). Every DC step is a proximal step of the
noise-weighted data term,

    ``argmin_x ‖A x − y‖² / sigma² + ‖x − x̂‖² / r²``, i.e. ``(A^H A + λ I) x = A^H y + λ x̂`` with
    ``λ = sigma² / r²``,

where ``r`` is the error scale of the estimate ``x̂`` it starts from. At step t the prior's x̂0 is taken to
be off by ``r_t = prior_scale · sqrt(2) · σ̄_t`` per complex pixel, ``σ̄_t = sqrt((1 − ᾱ_t) / ᾱ_t)`` the
noise level of ``x_t / sqrt(ᾱ_t)`` (the choice of DiffPIR, Zhu et al. 2023, "Denoising diffusion models for
plug-and-play image restoration": ``ρ_t ∝ σ_n² / σ̄_t²``); ``prior_scale`` is chosen on training data.
Single-coil data have the closed form ``k ← k̂ + M (y − k̂) / (1 + λ)`` in k-space; multi-coil data run
conjugate gradients to a tolerance (:func:`prox_data`). With ``sigma = 0`` this is the exact projection.

The two modes plug into the samplers of :mod:`improved_diffusion.gaussian_diffusion` through their hooks,
so every sampler (ancestral with learned variances, respaced, DDIM) gets them without a copy of the loop:

* ``project`` (``denoised_fn`` hook, on x̂0 before the step; cf. Chung & Ye 2022): x̂0 is bounded, then
  replaced by the proximal step above.
* ``replace`` (``step_fn`` hook, on x_{t−1} after the step; Song et al. 2022): the measured k-space of
  x_{t−1} is moved to the measurements brought to its noise level, ``y_t = sqrt(ᾱ) y + s · A ε``: the
  measurements already carry noise of variance ``ᾱ sigma²``, so only ``s² = 1 − ᾱ − ᾱ sigma² / 2`` (per
  channel) is added. Late in the chain, where the measurement noise exceeds the step's noise, the excess
  ``v = ᾱ sigma² / 2 − (1 − ᾱ)`` weighs them against the sample: ``x ← x + A^H(y_t − A x) / (1 + λ)``
  with ``λ = v / (ᾱ r²)``. (For single-coil data this is the exact weighted replacement; for multi-coil
  data a per-coil replacement followed by the coil combination on the maps' support.)

:func:`final_data_consistency` ends every sample with the discrepancy principle (Morozov): the proximal
step from the sample with the ``λ`` at which ``‖A x − y‖ = sigma · sqrt(number of measured samples)``, so
the output fits the data to the noise level and no tighter (exact interpolation of noisy data amplifies
the noise through SENSE's small singular values; for the same reason λ stays ≥ 1e-2, see
``FINAL_LOG10_LAMBDA_MIN``). :meth:`MeasurementOperator.noise_ratio` reports
``‖A x − y‖ / (sigma sqrt(N))``, which then sits at 1.
"""

from typing import Optional, Tuple

import numpy as np
import torch

from .mri.fftc import channels_to_complex, complex_to_channels, fft2c, ifft2c
from .mri.sense import SenseNormal, sense_adjoint, sense_forward, single_coil_maps
from .mri.solvers import conjugate_gradient

DC_MODES = ("project", "replace", "none")
CLIP_MODES = ("magnitude", "channel", "none")
# The multi-coil CG solves run to convergence: their normal-equation residual falls by CG_TOL. A looser
# tolerance stops early and regularizes through the iteration count. On the demo 8x slices, 1e-3 scored
# 1 dB above the converged solves; docs/results.md, "Stability".
CG_TOL = 1e-4
CG_ITERS = 300


class MeasurementOperator:
    """The forward model ``A`` of one slice (or a batch of slices) and its measurements.

    Args:
        kspace: measured k-space, complex, ``(H, W)`` or ``(C, H, W)`` for one slice, or ``(B, C, H, W)``;
            entries off the mask are ignored (the mask is applied here).
        mask: sampling mask, real, broadcastable to ``(B, C, H, W)`` -- e.g. ``(W,)``, ``(1, W)``, ``(H, W)``.
        maps: coil sensitivity maps ``(C, H, W)`` or ``(B, C, H, W)``, or None for single-coil data.
        sigma: complex noise std of one measured sample, ``E|n|² = sigma²`` (0: noiseless data).

    Images ``x`` are ``(B, H, W)`` complex; k-space is ``(B, C, H, W)`` (``C = 1`` for single-coil).
    A batch dimension of 1 in ``kspace``/``maps`` broadcasts over the K samples of one slice.
    """

    def __init__(
        self,
        kspace: torch.Tensor,
        mask: torch.Tensor,
        maps: Optional[torch.Tensor] = None,
        sigma: float = 0.0,
    ):
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if not torch.is_complex(kspace):
            raise ValueError(f"kspace must be complex, got dtype {kspace.dtype}")
        if kspace.dim() == 2:
            if maps is not None:
                raise ValueError("single-coil kspace (H, W) given together with sensitivity maps")
            kspace = kspace[None]
        if kspace.dim() == 3:
            kspace = kspace[None]
        if kspace.dim() != 4:
            raise ValueError(f"kspace must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(kspace.shape)}")
        h, w = kspace.shape[-2:]
        mask = torch.as_tensor(mask, device=kspace.device).real.to(kspace.real.dtype)
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got shape {tuple(mask.shape)}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        try:
            torch.broadcast_shapes(mask.shape, kspace.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to k-space {tuple(kspace.shape)}"
            ) from None
        if maps is not None:
            if maps.dim() == 3:
                maps = maps[None]
            if maps.shape[-3:] != kspace.shape[-3:]:
                raise ValueError(
                    f"sensitivity maps {tuple(maps.shape[-3:])} do not match k-space (coils, H, W) "
                    f"{tuple(kspace.shape[-3:])}"
                )
            maps = maps.to(device=kspace.device, dtype=kspace.dtype)
        elif kspace.shape[-3] != 1:
            raise ValueError(f"multi-coil kspace with {kspace.shape[-3]} coils needs sensitivity maps")
        self.mask = mask
        self.single_coil = maps is None
        # Single-coil data use one all-ones map, so the same SENSE operators serve both cases.
        self.maps = single_coil_maps(kspace.shape[-2:], kspace.dtype, kspace.device) if maps is None else maps
        self.y = mask * kspace
        self._normal = SenseNormal(self.maps, mask)  # set up once for the CG solves
        self._adjoint_y = None
        self.image_shape = (h, w)
        self.sigma = float(sigma)
        # Measured complex samples per batch element (coils x sampled points).
        sampled = (mask[:1] != 0).to(kspace.real.dtype)
        self.num_measurements = float(sampled.expand((1,) + self.y.shape[-3:]).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: image ``(B, H, W)`` -> masked k-space ``(B, C, H, W)``."""
        return sense_forward(x, self.maps, self.mask)

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """``A^H k``: k-space ``(B, C, H, W)`` -> image ``(B, H, W)``."""
        return sense_adjoint(k, self.maps, self.mask)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x`` on images ``(B, H, W)``."""
        return self._normal(x)

    def adjoint_y(self) -> torch.Tensor:
        """``A^H y`` ``(B, H, W)``, computed once (every proximal step's right-hand side needs it)."""
        if self._adjoint_y is None:
            self._adjoint_y = self.adjoint(self.y)
        return self._adjoint_y

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Relative data residual ``‖A x − y‖ / ‖y‖`` per batch element, shape ``(B,)``."""
        return self.residual_norm(x) / torch.linalg.vector_norm(self.y, dim=(-3, -2, -1)).clamp_min(1e-30)

    def residual_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``‖A x − y‖`` per batch element, shape ``(B,)``."""
        return torch.linalg.vector_norm(self.forward(x) - self.y, dim=(-3, -2, -1))

    @property
    def noise_residual(self) -> float:
        """``sigma · sqrt(N)``: the residual ``‖A x − y‖`` of the true image, N measured samples."""
        return self.sigma * float(np.sqrt(self.num_measurements))

    def noise_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """``‖A x − y‖ / (sigma sqrt(N))`` per batch element (NaN for noiseless data)."""
        if self.sigma == 0:
            return torch.full((x.shape[0],), float("nan"))
        return self.residual_norm(x) / self.noise_residual

    def zero_filled(self) -> torch.Tensor:
        """``A^H y``: the zero-filled (single-coil) or coil-combined zero-filled image, ``(B, H, W)``."""
        return self.adjoint_y()


def prior_weight(sigma: float, alpha_bar: float, prior_scale: float) -> float:
    """``λ = sigma² / r²`` of the proximal step on an estimate at noise level ᾱ (module docstring).

    ``r² = 2 prior_scale² (1 − ᾱ) / ᾱ`` is the complex per-pixel error variance of the prior's x̂0; λ = 0
    for noiseless data (exact consistency), ``inf`` where the estimate is exact (ᾱ = 1: keep it).
    """
    if sigma == 0:
        return 0.0
    r2 = 2.0 * prior_scale**2 * (1.0 - alpha_bar) / alpha_bar
    return float("inf") if r2 <= 0 else sigma**2 / r2


def prox_data(
    x_hat: torch.Tensor,
    op: MeasurementOperator,
    lam,
    tol: float = CG_TOL,
    max_iters: int = CG_ITERS,
) -> torch.Tensor:
    """``argmin_x ‖A x − y‖² + λ‖x − x̂‖²`` for complex images ``(B, H, W)``.

    Args:
        x_hat: the estimate, complex ``(B, H, W)``.
        op: the measurement operator.
        lam: λ ≥ 0, a float or a ``(B,)`` tensor (one per image); ``inf`` returns x̂.
        tol: conjugate gradients (multi-coil) stop when the residual of the normal equations has fallen
            by this factor.
        max_iters: and at the latest after this many iterations (single-coil data are solved exactly).
    """
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1, 1)
    if bool((lam < 0).any()):
        raise ValueError(f"the proximal weight must be >= 0, got {lam.flatten().tolist()}")
    finite = torch.isfinite(lam)
    if not bool(finite.any()):
        return x_hat
    lam_f = torch.where(finite, lam, torch.zeros_like(lam)).to(device=x_hat.device, dtype=x_hat.real.dtype)
    if op.single_coil:
        k = fft2c(x_hat)
        k = k + op.mask[..., 0, :, :] * (op.y[..., 0, :, :] - k) / (1.0 + lam_f)
        out = ifft2c(k)
    else:
        rhs = op.adjoint_y() + lam_f * x_hat
        out = conjugate_gradient(lambda v: op.normal(v) + lam_f * v, rhs, x_hat, max_iters, tol=tol)
    return torch.where(finite.to(x_hat.device), out, x_hat)


def replace(
    x_noisy: torch.Tensor,
    op: MeasurementOperator,
    alpha_bar: float,
    prior_scale: float = 1.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Move the measured k-space of a noisy image to the measurements brought to its noise level.

    Args:
        x_noisy: complex images ``(B, H, W)`` at noise level ``alpha_bar`` (ᾱ of the diffusion).
        op: the measurement operator (its ``sigma`` is the measurement noise).
        alpha_bar: ᾱ of ``x_noisy``'s noise level; 1 means clean.
        prior_scale: error scale of the sample relative to its noise level (module docstring).
        noise: complex image noise ``(B, H, W)`` with real and imaginary parts ~ N(0, 1), as the diffusion's
            two channels; drawn from torch's global RNG when None.

    Returns:
        complex images ``(B, H, W)``: ``x + A^H(y_t − A x) / (1 + λ)`` (module docstring).
    """
    meas_var = alpha_bar * op.sigma**2 / 2.0  # per channel, in x_{t-1}'s units
    top_up = 1.0 - alpha_bar - meas_var
    y_t = float(np.sqrt(alpha_bar)) * op.y
    if top_up > 0:
        if noise is None:
            noise = torch.complex(torch.randn_like(x_noisy.real), torch.randn_like(x_noisy.real))
        y_t = y_t + float(np.sqrt(top_up)) * op.forward(noise)
    lam = 0.0
    if top_up < 0:
        prior_var = prior_scale**2 * (1.0 - alpha_bar)  # ᾱ r² / 2 per channel, r² = 2 ζ² (1 − ᾱ) / ᾱ
        if prior_var <= 0:
            return x_noisy
        lam = -top_up / prior_var
    return x_noisy + op.adjoint(y_t - op.forward(x_noisy)) / (1.0 + lam)


# The final step's λ is at least 1e-2: its gain on the measurement noise along a singular value s of A,
# s / (s² + λ), then stays ≤ 1 / (2 sqrt(λ)) = 5. A sample that still misfits the data at that λ is one the
# maps cannot explain (calibration misfit > 1); fitting it further only amplifies noise (8x, 5 centre
# columns: salt-and-pepper grain, -10 to -15 dB on such slices), so the fit at λ = 1e-2 is kept.
FINAL_LOG10_LAMBDA_MIN = -2.0


def final_data_consistency(
    x: torch.Tensor,
    op: MeasurementOperator,
    tol: float = CG_TOL,
    max_iters: int = CG_ITERS,
    steps: int = 14,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The discrepancy principle on finished samples (complex images ``(B, H, W)``).

    Finds per image the proximal weight λ at which the solution of ``argmin ‖A x − y‖² + λ‖x − x_s‖²``
    (from the sample ``x_s``) has ``‖A x − y‖ = sigma sqrt(N)``. The residual grows with λ; a sample that
    already fits that well is kept (λ = inf). Single-coil data have it in closed form
    (``‖M(k − y)‖ = ‖M(k_s − y)‖ λ / (1 + λ)``); multi-coil data bisect ``log10 λ`` over [-2, 4] (the
    normal operator's eigenvalues are at most 1; below 1e-2 the step amplifies noise more than 5x, see
    ``FINAL_LOG10_LAMBDA_MIN``) in ``steps`` solves, in double precision, each warm-started; where the
    noise level is out of reach the fit at λ = 1e-2 is returned.
    Noiseless data (``sigma = 0``) get the exact fit (λ = 0).

    Returns:
        ``(x, λ)``: the images and the weights ``(B,)`` (float64).
    """
    target = op.noise_residual
    start = op.residual_norm(x).double().cpu()
    if op.single_coil:
        ratio = (target / start.clamp_min(1e-300)).clamp(max=1.0)
        lam = torch.where(ratio < 1, ratio / (1 - ratio), torch.full_like(ratio, float("inf")))
        return prox_data(x, op, lam), lam
    fits = start <= target
    if target > 0 and bool(fits.all()):
        return x, torch.full_like(start, float("inf"))
    op64 = MeasurementOperator(
        op.y.to(torch.complex128), op.mask.double(), op.maps.to(torch.complex128), sigma=op.sigma
    )
    if target == 0:
        lam = torch.zeros_like(start)
        return prox_data(x.to(torch.complex128), op64, lam, tol, max_iters).to(x.dtype), lam
    x64 = x.to(torch.complex128)
    lo = torch.full_like(start, FINAL_LOG10_LAMBDA_MIN)  # log10 λ: residual below target at lo, above at hi
    hi = torch.full_like(start, 4.0)
    best = x64
    found = torch.zeros_like(fits)
    for _ in range(steps):
        mid = (lo + hi) / 2
        sol = prox_data(x64, op64, 10.0**mid, tol, max_iters)
        above = op64.residual_norm(sol).cpu() > target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
        keep = (~above).to(sol.device).reshape(-1, 1, 1)  # the fit at or below the noise level so far
        best = torch.where(keep, sol, best)
        found = found | ~above
    if not bool((found | fits).all()):  # maps that cannot reach the noise level: the closest fit
        sol = prox_data(x64, op64, 10.0**lo, tol, max_iters)
        best = torch.where((found | fits).to(sol.device).reshape(-1, 1, 1), best, sol)
    lam = 10.0**lo
    lam = torch.where(fits, torch.full_like(lam, float("inf")), lam)
    best = torch.where(fits.to(best.device).reshape(-1, 1, 1), x64, best)
    return best.to(x.dtype), lam


def bound_x0(x0: torch.Tensor, mode: str = "magnitude", value: float = 1.0) -> torch.Tensor:
    """Bound a predicted clean image ``(B, 2, H, W)`` (real, imaginary channels).

    ``magnitude`` scales every complex pixel whose magnitude exceeds ``value`` down to it (phase kept);
    ``channel`` clamps each channel to ``[-value, value]`` (upstream improved-diffusion's clip);
    ``none`` leaves it. Bounding x̂0 before DC keeps ancestral sampling from diverging.
    """
    if mode == "none":
        return x0
    if mode == "channel":
        return x0.clamp(-value, value)
    if mode == "magnitude":
        mag = torch.sqrt(x0[:, 0:1] ** 2 + x0[:, 1:2] ** 2)
        return x0 * (value / mag.clamp_min(value))
    raise ValueError(f"unknown clip mode {mode!r}; choose one of {CLIP_MODES}")


class DiffusionDataConsistency:
    """The sampler hooks for one DC mode, in the model's normalized units.

    Args:
        op: measurement operator with measurements (and sigma) already divided by the intensity scale.
        mode: ``project``, ``replace`` or ``none`` (bounding x̂0 only).
        alphas_cumprod: the (respaced) diffusion's ``alphas_cumprod``; ``project`` reads ᾱ_t of step t.
        alphas_cumprod_prev: its ``alphas_cumprod_prev``; ``replace`` reads ᾱ_{t−1} of step t.
        prior_scale: error scale of the prior's estimates relative to the step's noise level.
        cg_tol, cg_iters: tolerance and iteration cap of the multi-coil proximal steps.
        clip: how x̂0 is bounded before DC (see :func:`bound_x0`); pass ``clip_denoised=False`` to the
            sampler, since the bound is applied here, before the projection.
        clip_value: the bound.

    Use as ``diffusion.p_sample_loop(..., clip_denoised=False, denoised_fn=dc.denoised_fn,
    step_fn=dc.step_fn)`` (or the ddim_sample_loop equivalent), then :meth:`final`.
    """

    def __init__(
        self,
        op: MeasurementOperator,
        mode: str,
        alphas_cumprod: np.ndarray,
        alphas_cumprod_prev: np.ndarray,
        prior_scale: float = 1.0,
        cg_tol: float = CG_TOL,
        cg_iters: int = CG_ITERS,
        clip: str = "magnitude",
        clip_value: float = 1.0,
    ):
        if mode not in DC_MODES:
            raise ValueError(f"unknown data consistency mode {mode!r}; choose one of {DC_MODES}")
        if clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip!r}; choose one of {CLIP_MODES}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0, got {prior_scale}")
        self.op = op
        self.mode = mode
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.alphas_cumprod_prev = np.asarray(alphas_cumprod_prev, dtype=np.float64)
        self.prior_scale = prior_scale
        self.cg_tol = cg_tol
        self.cg_iters = cg_iters
        self.clip = clip
        self.clip_value = clip_value

    def denoised_fn(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Bound x̂0 ``(B, 2, H, W)`` predicted at step ``t`` ``(B,)``; for ``project``, the proximal step."""
        x0 = bound_x0(x0, self.clip, self.clip_value)
        if self.mode != "project":
            return x0
        alpha_bar = float(self.alphas_cumprod[int(t.reshape(-1)[0])])
        lam = prior_weight(self.op.sigma, alpha_bar, self.prior_scale)
        x = prox_data(channels_to_complex(x0.float()), self.op, lam, self.cg_tol, self.cg_iters)
        return complex_to_channels(x).to(x0.dtype)

    def step_fn(self, x_prev: torch.Tensor, t: int) -> torch.Tensor:
        """For ``replace``: x_{t−1} ``(B, 2, H, W)`` after step index ``t`` -> moved to the measurements."""
        if self.mode != "replace":
            return x_prev
        alpha_bar = float(self.alphas_cumprod_prev[int(t)])
        x = replace(channels_to_complex(x_prev.float()), self.op, alpha_bar, self.prior_scale)
        return complex_to_channels(x).to(x_prev.dtype)

    def final(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The final DC (:func:`final_data_consistency`) on complex samples ``(B, H, W)``.

        Returns ``(x, λ)``; mode ``none`` returns the samples unchanged with λ = inf.
        """
        if self.mode == "none":
            return x, torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
        return final_data_consistency(x, self.op, self.cg_tol, self.cg_iters)
