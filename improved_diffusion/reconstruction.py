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
with ``q_sample``; on a short-trained prior this worked far better than ``t = T`` (see FINDINGS).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .data_consistency import CLIP_MODES, DC_MODES, DiffusionDataConsistency, MeasurementOperator
from .mri.fftc import channels_to_complex, complex_to_channels

SAMPLERS = ("ddim", "ancestral")


@dataclass
class ReconOptions:
    """Options of :func:`reconstruct_slice` (the CLI flags of scripts/image_sample.py have the same names).

    Attributes:
        dc: data consistency: ``project`` (x̂0 made consistent before each step), ``replace`` (noisy
            measurements put into x_{t−1} after each step) or ``none``.
        sampler: ``ddim`` (deterministic for eta = 0) or ``ancestral`` (p_sample, uses learned variances).
        t0: start time: a fraction in (0, 1] of the chain, written with a decimal point ("0.2", "1.0"), or
            an integer step of the base diffusion ("200"). ``1.0`` = from pure noise at t = T.
        num_samples: K posterior samples per slice.
        batch_size: samples per network batch (0 = all K at once).
        gamma: proximity weight of ``project`` (0 = exact projection for single-coil).
        cg_iters: CG iterations of ``project`` for multi-coil data.
        final_dc: apply the exact final data consistency to every sample (not with ``dc=none``).
        final_cg_iters: CG iterations of the multi-coil final data consistency.
        clip: bound on x̂0 before DC: ``magnitude``, ``channel`` or ``none``.
        clip_value: the bound, in normalized units.
        eta: DDIM eta.
        seed: seed of the sampling noise (global torch RNG inside a forked RNG state).
    """

    dc: str = "project"
    sampler: str = "ddim"
    t0: Union[str, float, int] = "1.0"
    num_samples: int = 1
    batch_size: int = 0
    gamma: float = 0.0
    cg_iters: int = 5
    final_dc: bool = True
    final_cg_iters: int = 30
    clip: str = "magnitude"
    clip_value: float = 1.0
    eta: float = 0.0
    seed: int = 0

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
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.cg_iters < 0 or self.final_cg_iters < 0:
            raise ValueError("cg_iters and final_cg_iters must be >= 0")
        if not self.clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {self.clip_value}")


@dataclass
class ReconResult:
    """Output of :func:`reconstruct_slice` (tensors on the CPU, in the input's intensity units).

    Attributes:
        mean: complex posterior mean ``(H, W)``.
        std: per-pixel standard deviation of the samples' magnitudes ``(H, W)`` (0 for K = 1).
        zero_filled: the zero-filled (coil-combined for multi-coil) image ``(H, W)``, complex.
        num_samples: K.
        nfe: network evaluations per sample (one per reverse step; samples are batched).
        start_step: the reverse chain's first step index (in the possibly respaced diffusion).
        scale: the intensity scale the network saw the data divided by.
        residual: relative data residual ``‖A mean − y‖ / ‖y‖`` of the mean.
    """

    mean: torch.Tensor
    std: torch.Tensor
    zero_filled: torch.Tensor
    num_samples: int
    nfe: int
    start_step: int
    scale: float
    residual: float


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
) -> ReconResult:
    """Reconstruct one slice from undersampled k-space with K posterior samples.

    Args:
        kspace: measured k-space, complex, ``(H, W)`` single-coil or ``(C, H, W)`` multi-coil (entries off
            the mask are ignored).
        mask: sampling mask broadcastable to the k-space: column mask ``(W,)``/``(1, W)`` or 2-D ``(H, W)``.
        model: the denoising network ``model(x (B, 2, H, W), t (B,)) -> (B, 2 or 4, H, W)``.
        diffusion: the (respaced) diffusion to sample with.
        maps: sensitivity maps ``(C, H, W)`` for multi-coil data; estimated with
            ``mri.espirit.estimate_sens_maps`` from the sampled centre when None.
        options: :class:`ReconOptions` (defaults when None).
        scale: intensity scale; ``fastmri_data.scale_from_kspace`` of the measured k-space when None.

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
    mask = torch.as_tensor(mask)
    multicoil = kspace.dim() == 3 and (kspace.shape[0] > 1 or maps is not None)
    if kspace.dim() == 3 and not multicoil:
        kspace = kspace[0]  # one coil without maps: single-coil data
    if multicoil and maps is None:
        from .recon_io import estimate_maps  # lazy: sigpy import costs seconds

        maps = estimate_maps(kspace, mask)
    if scale is None:
        from .fastmri_data import scale_from_kspace

        scale = float(scale_from_kspace(kspace * mask, maps))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"intensity scale must be finite and > 0, got {scale}")

    device = _model_device(model, kspace.device)
    kspace = kspace.to(device=device, dtype=torch.complex64)
    maps = None if maps is None else torch.as_tensor(maps).to(device=device, dtype=torch.complex64)
    op = MeasurementOperator(kspace / scale, mask.to(device), maps if multicoil else None)
    dc = DiffusionDataConsistency(
        op,
        options.dc,
        diffusion.alphas_cumprod_prev,
        gamma=options.gamma,
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
                x = dc.final(x, options.final_cg_iters)
            samples.append(x)
            done += n
    num_chunks = math.ceil(options.num_samples / batch)
    x = torch.cat(samples)
    mean = x.mean(dim=0)
    std = x.abs().std(dim=0, unbiased=False) if x.shape[0] > 1 else torch.zeros(h, w, device=device)
    residual = float(op.residual(mean[None])[0]) if op.y.abs().max() > 0 else 0.0
    return ReconResult(
        mean=(mean * scale).cpu(),
        std=(std * scale).cpu(),
        zero_filled=(zero_filled[0] * scale).cpu(),
        num_samples=options.num_samples,
        nfe=counter.calls // num_chunks,
        start_step=start_t,
        scale=scale,
        residual=residual,
    )
