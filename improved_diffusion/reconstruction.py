"""Posterior sampling reconstruction of one undersampled slice with a diffusion prior.

:func:`reconstruct_slice` draws K samples of the image given the measured k-space, batched, with data
consistency (:mod:`improved_diffusion.data_consistency`) plugged into any sampler through the diffusion's
``denoised_fn`` / ``step_fn`` hooks, and returns their complex mean and the per-pixel standard deviation of
their magnitude (an uncertainty map).

Units: the network works on ``image / scale`` with ``scale = transforms.scale_from_kspace`` computed
from the measured k-space (the same scale the model was trained with); measurements are divided by the
same scale and the outputs multiplied back, so results are in the input k-space's intensity units.

Start (Chung et al. 2022, "Come-closer-diffuse-faster"): instead of starting the reverse chain from pure
noise at ``t = T``, start from the zero-filled (data-consistent) image noised to an intermediate step with
``q_sample``; on a short-trained prior this worked far better than ``t = T`` (docs/results.md). The start
is given as a fraction ``t0`` of the chain or as a step ``start_step`` of the base (e.g. 1000-step) chain,
and :func:`resolve_start_step` maps it onto the respaced steps the same way for every respacing.

Measurements first go through :func:`improved_diffusion.mri.coils.prepare_slice` (readout crop to the
reconstruction field of view, noise model, coil prewhitening and compression, maps), so data consistency
knows the noise level it must fit to and everything runs on the grid the model was trained on.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .adaptation import ADAPT_PARAMS, adapted_prior
from .data_consistency import (
    CG_ITERS,
    CG_TOL,
    CLIP_MODES,
    DC_MODES,
    DiffusionDataConsistency,
    MeasurementOperator,
)
from .mri.coils import prepare_slice
from .mri.fftc import channels_to_complex, complex_to_channels
from .mri.fov import resolve_fov_rows
from .mri.sense import sensitivity_support
from .transforms import scale_from_kspace

SAMPLERS = ("ddim", "ancestral")
# The recommended respacing (10 network evaluations per sample from DEFAULT_T0); scripts/image_sample.py
# loads the diffusion with it by default.
RECOMMENDED_RESPACING = "ddim50"
# The start fraction used when neither ``t0`` nor ``start_step`` is given: base step 179, on ddim50 its
# step 180, the start that every recorded result of the recommended recipe used (docs/results.md).
DEFAULT_T0 = 0.18
# Test-time adaptation steps that ``adapt_steps = -1`` (the default) gives single-coil data; multi-coil data
# get none. Held-out single-coil scans gained +0.28 / +0.39 dB at 4x / 8x and the template's own validation
# slices +0.01 dB; held-out 8-coil data -0.04 dB: the coils already pin the image down (docs/results.md).
SINGLE_COIL_ADAPT_STEPS = 20


# --help lines of the scripts' flags for the field-of-view and coil options (scripts/image_sample.py and
# scripts/baseline_recon.py share them).
OPTION_HELP = {
    "fov_rows": "readout rows of the reconstruction field of view, cropped exactly in k-space: > 0 that "
    "many, 0 the file's (ismrmrd_header reconSpace, else the target's rows), -1 the full k-space grid",
    "refine_maps": "outer iterations of the joint refinement of the maps with the image on all measured data "
    "(JSENSE-style, mri/jsense.py); 0 = off",
    "num_virtual_coils": "SVD coil compression after prewhitening: > 0 that many virtual coils, 0 the fewest "
    "holding 99%% of the k-space energy but at least 8, -1 none",
    "zero_outside_maps": "multi-coil: the output is 0 outside the maps' support, where no coil sees the "
    "object (as SENSE); False keeps the prior's values there (e.g. to score against a noisy RSS target's "
    "noise floor)",
}


@dataclass
class ReconOptions:
    """Options of :func:`reconstruct_slice` (the CLI flags of scripts/image_sample.py have the same names).

    The defaults are the recommended recipe: DDIM with eta 1 on the ``ddim50`` respacing, from t0 = 0.18
    (base step 180 of ddim50: 10 network evaluations per sample), K = 4, noise-aware projection, the
    discrepancy-principle final step and test-time adaptation of single-coil scans (docs/reconstruction.md;
    settings chosen on training volumes, docs/results.md).

    Attributes:
        dc: data consistency: ``project`` (x̂0 made consistent before each step), ``replace`` (noisy
            measurements put into x_{t−1} after each step) or ``none``.
        sampler: ``ddim`` (deterministic for eta = 0) or ``ancestral`` (p_sample, uses learned variances).
        t0: start time as a fraction in (0, 1] of the base chain (``1.0``: from pure noise at t = T); None
            means :data:`DEFAULT_T0` unless ``start_step`` is given. Strings need a decimal point ("0.2"),
            so an old integer step ("200") is refused instead of read as a fraction.
        start_step: the start as a step ``0 <= s < T`` of the base chain (e.g. 199); excludes ``t0``.
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
        adapt_steps: test-time adaptation of the prior to the scan (improved_diffusion.adaptation): at most
            this many Adam steps on the data misfit of x̂0, after a first one-sample pass; 0 = off; -1 (the
            default) = :data:`SINGLE_COIL_ADAPT_STEPS` for single-coil data and off for multi-coil data.
        adapt_lr: its learning rate.
        adapt_params: which parameters adapt: ``norm`` (GroupNorm scales/shifts), ``out`` (output block) or
            ``norm,out``.
        fov_rows: the readout (rows) is cropped to the reconstruction field of view before anything else
            (exact in k-space, docs/reconstruction.md): > 0 that many rows; 0 the file's FOV (the
            ``recon_rows`` the caller passes: ismrmrd_header reconSpace, else the target's rows); -1 never.
        num_virtual_coils: SVD coil compression after prewhitening: > 0 that many virtual coils, 0 the
            fewest holding 99% of the k-space energy but at least 8 (scans with <= 8 coils stay as they
            are), -1 none.
        refine_maps: outer iterations of the joint map refinement on all measured data before sampling
            (:mod:`improved_diffusion.mri.jsense`; multi-coil only, estimated or stored maps alike); 0 = off,
            the default: on the held-out 8-coil data it changed nothing or lowered PSNR (docs/results.md).
        zero_outside_maps: multi-coil: the samples are set to 0 outside the maps' support, where no coil sees
            the object and the data say nothing (SENSE's and BART's convention); False keeps the prior's
            values there (docs/reconstruction.md).
    """

    dc: str = "project"
    sampler: str = "ddim"
    t0: Optional[Union[str, float]] = None
    start_step: Optional[int] = None
    num_samples: int = 4
    batch_size: int = 0
    prior_scale: float = 0.7
    cg_tol: float = CG_TOL
    cg_iters: int = CG_ITERS
    final_dc: bool = True
    clip: str = "magnitude"
    clip_value: float = 1.0
    eta: float = 1.0
    seed: int = 0
    adapt_steps: int = -1
    adapt_lr: float = 1e-3
    adapt_params: str = "norm"
    fov_rows: int = 0
    num_virtual_coils: int = 0
    refine_maps: int = 0
    zero_outside_maps: bool = True

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
        if self.t0 is not None and self.start_step is not None:
            raise ValueError(f"give t0 ({self.t0}) or start_step ({self.start_step}), not both")
        if self.t0 is not None:
            parse_t0(self.t0)
        if self.adapt_steps < -1 or not self.adapt_lr > 0:
            raise ValueError("adapt_steps must be >= 0 or -1 (automatic), and adapt_lr > 0")
        parts = self.adapt_parts
        if not parts or any(p not in ADAPT_PARAMS for p in parts):
            raise ValueError(f"adapt_params: a comma list of {ADAPT_PARAMS}, got {self.adapt_params!r}")
        if self.fov_rows < -1:
            raise ValueError(f"fov_rows must be > 0, 0 (the file's FOV) or -1 (no crop), got {self.fov_rows}")
        if self.num_virtual_coils < -1:
            raise ValueError(
                f"num_virtual_coils must be > 0, 0 (automatic) or -1 (none), got {self.num_virtual_coils}"
            )
        if self.refine_maps < 0:
            raise ValueError(f"refine_maps must be >= 0, got {self.refine_maps}")

    def adapt_steps_for(self, single_coil: bool) -> int:
        """The adaptation steps of a scan: ``adapt_steps``, or for -1 the automatic choice (see there)."""
        if self.adapt_steps >= 0:
            return self.adapt_steps
        return SINGLE_COIL_ADAPT_STEPS if single_coil else 0

    @property
    def adapt_parts(self) -> Tuple[str, ...]:
        """``adapt_params`` as a tuple of names."""
        return tuple(p.strip() for p in str(self.adapt_params).split(",") if p.strip())


@dataclass
class ReconResult:
    """Output of :func:`reconstruct_slice` (tensors on the CPU, in the input's intensity units).

    All images are on the reconstruction grid ``(H, W)``: the k-space's, with the readout rows cropped to
    the field of view when :attr:`ReconOptions.fov_rows` asks for it.

    Attributes:
        mean: complex posterior mean ``(H, W)`` (coil-combined with the whitened coils' maps; multi-coil: 0
            outside the maps' support, where no coil sees the object).
        magnitude: ``|mean|`` as a root-sum-of-squares of the unwhitened coil images ``(H, W)`` (fastMRI's
            multi-coil target; ``|mean|`` for single-coil data).
        std: per-pixel standard deviation of the samples' magnitudes ``(H, W)``, same units (0 for K = 1).
        zero_filled: the zero-filled magnitude ``(H, W)``, same units.
        num_samples: K.
        nfe: network evaluations per sample (one per reverse step; samples are batched).
        start_step: the reverse chain's first step index (in the possibly respaced diffusion).
        base_start_step: that step's timestep in the base chain (the same for every respacing that has it).
        scale: the intensity scale the network saw the data divided by.
        residual: relative data residual ``‖A mean − y‖ / ‖y‖`` of the mean.
        noise_std: complex noise std of one (whitened) k-space sample that DC used.
        noise_source: where it came from: ``given``, ``noise_scan`` or ``data``.
        noise_ratio: ``‖A mean − y‖ / (noise_std sqrt(N))`` (about 1: fits to the noise level).
        calib_misfit: how far the maps are from explaining the calibration data (1: to the noise level).
        adapt_steps: the test-time adaptation steps this slice was given (0: none).
    """

    mean: torch.Tensor
    magnitude: torch.Tensor
    std: torch.Tensor
    zero_filled: torch.Tensor
    num_samples: int
    nfe: int
    start_step: int
    base_start_step: int
    scale: float
    residual: float
    noise_std: float = float("nan")
    noise_source: str = ""
    noise_ratio: float = float("nan")
    calib_misfit: float = float("nan")
    adapt_steps: int = 0


def parse_t0(t0: Union[str, float]) -> float:
    """A start fraction in (0, 1] from a float or a string with a decimal point ("0.2", "1.0", "2e-1").

    Raises:
        ValueError: for anything else, pointing integer-looking values to ``start_step`` (before, "200"
            meant base step 200; now it is refused rather than silently read as another start).
    """
    text = str(t0).strip()
    looks_int = isinstance(t0, int) or not any(c in text.lower() for c in ".e")
    try:
        frac = None if looks_int else float(text)
    except ValueError:
        frac = None
    if frac is None or not 0.0 < frac <= 1.0:
        hint = f"; for an integer step of the base chain use --start_step {text}" if looks_int else ""
        raise ValueError(
            f"t0 must be a fraction in (0, 1] written with a decimal point (e.g. 0.2, 1.0), got {t0!r}{hint}"
        )
    return frac


def resolve_start_step(
    diffusion, t0: Optional[Union[str, float]] = None, start_step: Optional[int] = None
) -> int:
    """The respaced step index at which the reverse chain starts.

    The rule: the requested base step is ``start_step``, or ``round(t0 * T) - 1`` for a fraction (t0 = 1:
    ``T - 1``, pure noise; t0 = 0.2 with T = 1000: 199), or that of :data:`DEFAULT_T0` when neither is
    given. The start is the respaced step whose base timestep is nearest to it (ties: the later one), so
    every respacing that contains the base step starts exactly there, and one that does not starts at most
    half its stride away (``ddim50`` with T = 1000 has 0, 20, ..., 980: t0 = 0.2 starts at 200; the full
    chain at 199; ``start_step 200`` starts both at 200). The base step used is reported as
    ``ReconResult.base_start_step``.

    Args:
        diffusion: a GaussianDiffusion or SpacedDiffusion.
        t0: a fraction in (0, 1] of the base chain (see :func:`parse_t0`).
        start_step: a step ``0 <= s < T`` of the base chain; excludes ``t0``.

    Raises:
        ValueError: both given, or either out of range.
    """
    timestep_map = [int(s) for s in getattr(diffusion, "timestep_map", range(diffusion.num_timesteps))]
    base_steps = int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
    if t0 is not None and start_step is not None:
        raise ValueError(f"give t0 ({t0}) or start_step ({start_step}), not both")
    if start_step is not None:
        if isinstance(start_step, bool) or int(start_step) != start_step:
            raise ValueError(f"start_step must be an integer step of the base chain, got {start_step!r}")
        if not 0 <= int(start_step) < base_steps:
            raise ValueError(
                f"start_step must be in [0, {base_steps - 1}] (the base chain), got {start_step}"
            )
        base_t = int(start_step)
    else:
        frac = parse_t0(DEFAULT_T0 if t0 is None else t0)
        base_t = min(max(int(round(frac * base_steps)) - 1, 0), base_steps - 1)
    # nearest base timestep; on a tie the later (noisier) step
    return min(range(len(timestep_map)), key=lambda i: (abs(timestep_map[i] - base_t), -i))


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
    recon_rows: Optional[int] = None,
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
        scale: intensity scale; ``transforms.scale_from_kspace`` of the measured k-space when None.
        noise_std: complex noise std of a k-space sample, overriding ``noise_scan`` and the estimate (0:
            noiseless data).
        noise_scan: ``(N, C)`` noise samples of the coils, or None (then the noise is estimated).
        recon_rows: rows of the file's reconstruction field of view (``ismrmrd_header`` reconSpace, else
            the target's); the readout is cropped to it when ``options.fov_rows`` is 0. None: no crop.

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
        kspace,
        mask,
        maps,
        noise_scan=noise_scan,
        noise_std=noise_std,
        fov_rows=resolve_fov_rows(options.fov_rows, recon_rows, kspace.shape[-2]),
        num_virtual_coils=options.num_virtual_coils,
        refine_maps=options.refine_maps,
    )
    kspace = torch.from_numpy(data.kspace)
    maps = None if data.maps is None else torch.from_numpy(data.maps)
    if scale is None:
        scale = float(scale_from_kspace(kspace, maps))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"intensity scale must be finite and > 0, got {scale}")

    device = _model_device(model, kspace.device)
    kspace = kspace.to(device=device, dtype=torch.complex64)
    maps = None if maps is None else maps.to(device=device, dtype=torch.complex64)
    mask = torch.from_numpy(data.mask).to(device)
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
    start_t = resolve_start_step(diffusion, t0=options.t0, start_step=options.start_step)
    zero_filled = op.zero_filled()  # (1, H, W); consistent by construction for single-coil
    h, w = op.image_shape
    counter = _CountingModel(model)
    batch = options.batch_size or options.num_samples
    fork_devices = [device] if device.type == "cuda" else []

    def draw(num: int, seed: int) -> torch.Tensor:
        """``num`` posterior samples ``(num, H, W)``, normalized units."""
        samples = []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            done = 0
            while done < num:
                n = min(batch, num - done)
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
        return torch.cat(samples)

    adapt_steps = options.adapt_steps_for(op.single_coil)
    if adapt_steps and not isinstance(model, torch.nn.Module):
        if options.adapt_steps > 0:
            raise ValueError("test-time adaptation (adapt_steps > 0) needs a torch.nn.Module model")
        adapt_steps = 0  # the automatic choice: a plain callable has no parameters to adapt
    if adapt_steps:
        x_ref = draw(1, options.seed + 1)[0]  # first pass: the unadapted prior's reconstruction
        counter.calls = 0  # nfe counts the sampling of the returned samples
        adapt = adapted_prior(
            model,
            diffusion,
            op,
            x_ref,
            adapt_steps,
            start_t,
            lr=options.adapt_lr,
            parts=options.adapt_parts,
            seed=options.seed,
        )
        with adapt:
            x = draw(options.num_samples, options.seed)
    else:
        x = draw(options.num_samples, options.seed)
    if options.zero_outside_maps and not op.single_coil:
        # Outside the maps' support no coil sees the object under the model: the data say nothing about x
        # there and only the prior's guess is left (a haze on held-out DWI, half the squared error).
        # SENSE and BART return 0 there, which is also the RSS target where no coil has signal.
        x = x * sensitivity_support(op.maps)
    num_chunks = math.ceil(options.num_samples / batch)
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
        base_start_step=int(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps))[start_t]),
        scale=scale,
        residual=residual,
        noise_std=data.sigma,
        noise_source=data.noise_source,
        noise_ratio=float(op.noise_ratio(mean[None])[0]),
        calib_misfit=data.calib_misfit,
        adapt_steps=adapt_steps,
    )
