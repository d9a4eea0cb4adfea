"""Posterior sampling reconstruction of one undersampled slice with a diffusion prior.

:func:`reconstruct_slice` draws K samples of the image given the measured k-space, batched, with data
consistency (:mod:`improved_diffusion.data_consistency`) plugged into any sampler through the diffusion's
``denoised_fn`` / ``step_fn`` hooks, and returns their complex mean and the per-pixel standard deviation of
their magnitude (an uncertainty map).

Units: the network works on ``image / scale`` with ``scale = fastmri_data.scale_from_kspace`` computed
from the measured k-space (the same scale the model was trained with); measurements are divided by the
same scale and the outputs multiplied back, so results are in the input k-space's intensity units.

Start time ``t0`` (Chung et al. 2022, "Come-closer-diffuse-faster"): instead of starting the reverse chain
from pure noise at ``t = T``, start from the zero-filled (data-consistent) image noised to step ``t0``
with ``q_sample``; on a short-trained prior this worked far better than ``t = T`` (docs/results.md).

Measurements first go through :func:`improved_diffusion.mri.coils.prepare_slice` (noise model, coil
prewhitening, maps), so data consistency knows the noise level it must fit to.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from .data_consistency import CLIP_MODES, DC_MODES, DiffusionDataConsistency, MeasurementOperator
from .mri.coils import prepare_slice
from .mri.fftc import channels_to_complex, complex_to_channels

SAMPLERS = ("ddim", "ancestral")
# The recommended respacing (10 network evaluations per sample from t0 = 0.2); scripts/image_sample.py
# loads the diffusion with it by default.
RECOMMENDED_RESPACING = "ddim50"


@dataclass
class ReconOptions:
    """Options of :func:`reconstruct_slice` (the CLI flags of scripts/image_sample.py have the same names).

    The defaults are the recommended recipe: DDIM with eta 1 on the ``ddim50`` respacing, from t0 = 0.2
    (10 network evaluations per sample), K = 4, noise-aware projection and the discrepancy-principle final
    step (docs/reconstruction.md; settings chosen on training volumes, docs/results.md).

    Attributes:
        dc: data consistency: ``project`` (x̂0 made consistent before each step), ``replace`` (noisy
            measurements put into x_{t−1} after each step) or ``none``.
        sampler: ``ddim`` (deterministic for eta = 0) or ``ancestral`` (p_sample, uses learned variances).
        t0: start time: a fraction in (0, 1] of the chain, written with a decimal point ("0.2", "1.0"), or
            an integer step of the base diffusion ("200"). ``1.0`` = from pure noise at t = T.
        num_samples: K posterior samples per slice.
        batch_size: samples per network batch (0 = all K at once).
        prior_scale: error of the prior's x̂0 relative to the step's noise level; sets the weight of the
            measurements in every DC step (data_consistency module docstring).
        cg_tol: the multi-coil conjugate-gradient solves stop when their residual has fallen by this factor.
        cg_iters: their iteration cap.
        final_dc: end every sample with the discrepancy-principle DC (not with ``dc=none``).
        clip: bound on x̂0 before DC: ``magnitude``, ``channel`` or ``none``.
        clip_value: the bound, in normalized units.
        eta: DDIM eta.
        seed: seed of the sampling noise (global torch RNG inside a forked RNG state).
        refine_maps: outer iterations of the joint map refinement on all measured data before sampling
            (:mod:`improved_diffusion.mri.jsense`; multi-coil only, estimated or stored maps alike); 0 = off,
            the default: on the held-out 8-coil data it changed nothing or lowered PSNR (docs/results.md).
    """

    dc: str = "project"
    sampler: str = "ddim"
    t0: Union[str, float, int] = "0.2"
    num_samples: int = 4
    batch_size: int = 0
    prior_scale: float = 0.7
    cg_tol: float = 1e-3
    cg_iters: int = 100
    final_dc: bool = True
    clip: str = "magnitude"
    clip_value: float = 1.0
    eta: float = 1.0
    seed: int = 0
    refine_maps: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.dc not in DC_MODES:
            raise ValueError(f"dc must be one of {DC_MODES}, got {self.dc!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {self.clip!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")
        if not self.prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0, got {self.prior_scale}")
        if not self.cg_tol > 0 or self.cg_iters < 1:
            raise ValueError("cg_tol must be > 0 and cg_iters >= 1")
        if not self.clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {self.clip_value}")
        if self.refine_maps < 0:
            raise ValueError(f"refine_maps must be >= 0, got {self.refine_maps}")


@dataclass
class ReconResult:
    """Output of :func:`reconstruct_slice` (tensors on the CPU, in the input's intensity units).

    Attributes:
        mean: complex posterior mean ``(H, W)`` (coil-combined with the whitened coils' maps).
        magnitude: ``|mean|`` as a root-sum-of-squares of the unwhitened coil images ``(H, W)`` (fastMRI's
            multi-coil target; ``|mean|`` for single-coil data).
        std: per-pixel standard deviation of the samples' magnitudes ``(H, W)``, same units (0 for K = 1).
        zero_filled: the zero-filled magnitude ``(H, W)``, same units.
        num_samples: K.
        nfe: network evaluations per sample (one per reverse step; samples are batched).
        start_step: the reverse chain's first step index (in the possibly respaced diffusion).
        scale: the intensity scale the network saw the data divided by.
        residual: relative data residual ``‖A mean − y‖ / ‖y‖`` of the mean.
        noise_std: complex noise std of one (whitened) k-space sample that DC used.
        noise_source: where it came from: ``given``, ``noise_scan`` or ``data``.
        noise_ratio: ``‖A mean − y‖ / (noise_std sqrt(N))`` (about 1: fits to the noise level).
        calib_misfit: how far the maps are from explaining the calibration data (1: to the noise level).
    """

    mean: torch.Tensor
    magnitude: torch.Tensor
    std: torch.Tensor
    zero_filled: torch.Tensor
    num_samples: int
    nfe: int
    start_step: int
    scale: float
    residual: float
    noise_std: float = float("nan")
    noise_source: str = ""
    noise_ratio: float = float("nan")
    calib_misfit: float = float("nan")


def resolve_start_step(t0: Union[str, float, int], diffusion) -> int:
    """Map a start time to this diffusion's (possibly respaced) step index.

    Args:
        t0: a fraction in (0, 1] (a float, or a string with a decimal point) of the base chain, or an
            integer step ``0 <= t0 < T`` of the base diffusion (an int, or a string without a point).
        diffusion: a GaussianDiffusion or SpacedDiffusion.

    Returns:
        The largest step index whose base timestep is <= the requested one.
    """
    timestep_map = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    base_steps = int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
    text = str(t0).strip()
    try:
        if isinstance(t0, float) or "." in text or "e" in text.lower():
            frac = float(text)
            if not 0.0 < frac <= 1.0:
                raise ValueError
            base_t = max(int(math.ceil(frac * base_steps)) - 1, 0)
        else:
            base_t = int(text)
            if not 0 <= base_t < base_steps:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"t0 must be a fraction in (0, 1] written with a point (e.g. 0.2) or an integer step in "
            f"[0, {base_steps - 1}], got {t0!r}"
        ) from None
    return max(i for i, s in enumerate(timestep_map) if s <= base_t)


class _CountingModel:
    """Counts the network evaluations (calls on a batch) of the wrapped model."""

    def __init__(self, model: Callable[..., torch.Tensor]):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self.model(*args, **kwargs)


def _model_device(model, fallback: torch.device) -> torch.device:
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return fallback


@torch.no_grad()
def reconstruct_slice(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    model: Callable[..., torch.Tensor],
    diffusion,
    maps: Optional[torch.Tensor] = None,
    options: Optional[ReconOptions] = None,
    scale: Optional[float] = None,
    noise_std: Optional[float] = None,
    noise_scan: Optional[np.ndarray] = None,
) -> ReconResult:
    """Reconstruct one slice from undersampled k-space with K posterior samples.

    Args:
        kspace: measured k-space, complex, ``(H, W)`` single-coil or ``(C, H, W)`` multi-coil (entries off
            the mask are ignored).
        mask: sampling mask broadcastable to the k-space: column mask ``(W,)``/``(1, W)`` or 2-D ``(H, W)``.
        model: the denoising network ``model(x (B, 2, H, W), t (B,)) -> (B, 2 or 4, H, W)``.
        diffusion: the (respaced) diffusion to sample with.
        maps: sensitivity maps ``(C, H, W)`` of the coils as measured; estimated (ESPIRiT on the whole
            fully sampled centre of the prewhitened data) when None.
        options: :class:`ReconOptions` (defaults when None).
        scale: intensity scale; ``fastmri_data.scale_from_kspace`` of the measured k-space when None.
        noise_std: complex noise std of a k-space sample, overriding ``noise_scan`` and the estimate (0:
            noiseless data).
        noise_scan: ``(N, C)`` noise samples of the coils, or None (then the noise is estimated).

    Returns:
        :class:`ReconResult`.
    """
    options = options or ReconOptions()
    options.validate()
    kspace = torch.as_tensor(kspace)
    if not torch.is_complex(kspace) or kspace.dim() not in (2, 3):
        raise ValueError(
            f"kspace must be complex (H, W) or (C, H, W), got {kspace.dtype} {tuple(kspace.shape)}"
        )
    data = prepare_slice(
        kspace, mask, maps, noise_scan=noise_scan, noise_std=noise_std, refine_maps=options.refine_maps
    )
    kspace = torch.from_numpy(data.kspace)
    maps = None if data.maps is None else torch.from_numpy(data.maps)
    if scale is None:
        from .fastmri_data import scale_from_kspace

        scale = float(scale_from_kspace(kspace, maps))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"intensity scale must be finite and > 0, got {scale}")

    device = _model_device(model, kspace.device)
    kspace = kspace.to(device=device, dtype=torch.complex64)
    maps = None if maps is None else maps.to(device=device, dtype=torch.complex64)
    mask = torch.as_tensor(mask).to(device)
    op = MeasurementOperator(kspace / scale, mask, maps, sigma=data.sigma / scale)
    dc = DiffusionDataConsistency(
        op,
        options.dc,
        diffusion.alphas_cumprod,
        diffusion.alphas_cumprod_prev,
        prior_scale=options.prior_scale,
        cg_tol=options.cg_tol,
        cg_iters=options.cg_iters,
        clip=options.clip,
        clip_value=options.clip_value,
    )
    start_t = resolve_start_step(options.t0, diffusion)
    zero_filled = op.zero_filled()  # (1, H, W); consistent by construction for single-coil
    h, w = op.image_shape
    counter = _CountingModel(model)
    batch = options.batch_size or options.num_samples
    samples = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(options.seed)
        done = 0
        while done < options.num_samples:
            n = min(batch, options.num_samples - done)
            shape = (n, 2, h, w)
            if start_t == diffusion.num_timesteps - 1:
                noise = torch.randn(*shape, device=device)  # the full chain, from pure noise
            else:
                x_init = complex_to_channels(zero_filled).expand(shape)
                t = torch.full((n,), start_t, device=device, dtype=torch.long)
                noise = diffusion.q_sample(x_init, t)
            loop = diffusion.ddim_sample_loop if options.sampler == "ddim" else diffusion.p_sample_loop
            extra = {"eta": options.eta} if options.sampler == "ddim" else {}
            out = loop(
                counter,
                shape,
                noise=noise,
                clip_denoised=False,  # bounding is done by dc.denoised_fn, before the projection
                denoised_fn=dc.denoised_fn,
                device=device,
                progress=False,
                start_t=start_t,
                step_fn=dc.step_fn,
                **extra,
            )
            x = channels_to_complex(out.float())
            if options.final_dc:
                x, _ = dc.final(x)
            samples.append(x)
            done += n
    num_chunks = math.ceil(options.num_samples / batch)
    x = torch.cat(samples)
    intensity = torch.from_numpy(data.intensity).to(device)
    mean = x.mean(dim=0)
    magnitudes = x.abs() * intensity
    std = magnitudes.std(dim=0, unbiased=False) if x.shape[0] > 1 else torch.zeros(h, w, device=device)
    residual = float(op.residual(mean[None])[0])
    return ReconResult(
        mean=(mean * scale).cpu(),
        magnitude=(mean.abs() * intensity * scale).cpu(),
        std=(std * scale).cpu(),
        zero_filled=(zero_filled[0].abs() * intensity * scale).cpu(),
        num_samples=options.num_samples,
        nfe=counter.calls // num_chunks,
        start_step=start_t,
        scale=scale,
        residual=residual,
        noise_std=data.sigma,
        noise_source=data.noise_source,
        noise_ratio=float(op.noise_ratio(mean[None])[0]),
        calib_misfit=data.calib_misfit,
    )
