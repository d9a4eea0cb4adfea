"""Gaussian diffusion: forward process, reverse sampling (ancestral and DDIM), training losses, bits/dim.

Follows Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (improved DDPM: cosine schedule, learned
variances, hybrid loss) with the API of OpenAI's improved-diffusion. Schedule arrays are numpy float64;
per-timestep values are gathered into torch tensors on the device of the timesteps.

The single reverse steps (``p_sample``, ``ddim_sample``) are here; the loops that drive them, with the
MRI additions ``start_t`` and ``step_fn`` (docs/engine.md), are :mod:`improved_diffusion.sampling`, mixed
into :class:`GaussianDiffusion`.
"""

import enum
import math
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .sampling import DenoisedFn, Model, SamplingLoops


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """A beta schedule by name ("linear" or "cosine"): float64 array of length ``num_diffusion_timesteps``.

    The linear schedule (Ho et al.) is scaled so that any number of steps spans the same noise range as
    the 1000-step original. The cosine schedule is eq. 17 of Nichol & Dhariwal with s = 0.008.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(
                f"diffusion_steps: the linear schedule needs more than 20 steps (its last beta is "
                f"20 / steps), got {num_diffusion_timesteps}; use more steps or noise_schedule='cosine'"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(
        f"noise_schedule: unknown beta schedule {schedule_name!r} (expected 'linear' or 'cosine')"
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretize a continuous alpha_bar(t), t in [0, 1], into betas: 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i).

    Betas are clipped at ``max_beta`` to avoid the singularity at t = 1.
    """
    n = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the model predicts for the mean."""

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # the model outputs log-variance directly
    FIXED_SMALL = enum.auto()  # the posterior variance beta_tilde_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta_tilde_1 at t=0, as upstream)
    LEARNED_RANGE = enum.auto()  # the model interpolates between beta_tilde_t and beta_t in log space


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the VLB term for learned variances)
    RESCALED_MSE = enum.auto()  # MSE plus the VLB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VLB times num_timesteps (an estimate of the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather ``arr[timesteps]`` as float32 on the timesteps' device, broadcast to ``broadcast_shape``.

    Args:
        arr: 1-D numpy array indexed by timestep.
        timesteps: (B,) integer tensor.
        broadcast_shape: target shape (B, ...).
    """
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(*broadcast_shape)


class GaussianDiffusion(SamplingLoops):
    """Utilities for training and sampling diffusion models.

    Args:
        betas: 1-D float64 numpy array of betas, one per diffusion step, in (0, 1].
        model_mean_type: what the model output represents.
        model_var_type: how the variance is obtained.
        loss_type: the training loss.
        rescale_timesteps: if True, the model sees timesteps scaled to [0, 1000) regardless of the
            number of steps (as in the original DDPM).
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(
                f"GaussianDiffusion: betas must be a non-empty 1-D array, got shape {betas.shape}"
            )
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError(
                "GaussianDiffusion: every beta must lie in (0, 1) (beta = 1 destroys all signal)"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; take the log of the t=1 value there to stay finite.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0); each broadcast to x_start's shape (B, ...)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

        Args:
            x_start: (B, ...) clean data.
            t: (B,) step indices.
            noise: optional (B, ...) standard normal noise.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"q_sample: noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
            )
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0), each (B, ...)."""
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"q_posterior_mean_variance: x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ"
            )
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and the predicted x_0.

        Args:
            model: called as ``model(x, scaled_t, **model_kwargs)``.
            x: (B, C, ...) the noisy input at step t.
            t: (B,) step indices.
            clip_denoised: clip the predicted x_0 to [-1, 1].
            denoised_fn: ``denoised_fn(x0, t)`` applied to the predicted x_0 before clipping (e.g. data
                consistency); unlike upstream it also gets the step ``t`` (B,), whose noise level DC needs.
            model_kwargs: extra keyword arguments for the model (e.g. class labels ``y``).

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart", each (B, C, ...).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"p_mean_variance: t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"p_mean_variance: a learned-variance model must output {2 * C} channels for {C} input "
                    f"channels, got shape {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # model output in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"p_mean_variance: model output {tuple(model_output.shape)} != x {tuple(x.shape)} "
                    "for a fixed-variance diffusion (was the model built with learn_sigma?)"
                )
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, but the posterior variance at t=0 for a better decoder log-likelihood
                # (a one-step chain has no t=1 value: keep beta_0 there).
                fixed_var = self.betas.copy()
                if self.num_timesteps > 1:
                    fixed_var[0] = self.posterior_variance[1]
                variance_arr, log_variance_arr = fixed_var, np.log(fixed_var)
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                variance_arr, log_variance_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                raise ValueError(f"p_mean_variance: unsupported model_var_type {self.model_var_type}")
            model_variance = _extract_into_tensor(variance_arr, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance_arr, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0, t)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise ValueError(f"p_mean_variance: unsupported model_mean_type {self.model_mean_type}")

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        # Invert the posterior mean: mean = coef1 * x0 + coef2 * x_t.
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------ ancestral step (loops: sampling.py)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Sample x_{t-1} ~ p(x_{t-1} | x_t). Returns {"sample": (B, ...), "pred_xstart": (B, ...)}."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # no noise at the last step
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ DDIM steps

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); eta=0 is deterministic.

        Returns {"sample": (B, ...), "pred_xstart": (B, ...)}.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Re-derive eps from the (possibly clipped / corrected) x_0 so both stay consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred + nonzero_mask * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """One deterministic reverse-ODE step x_t -> x_{t+1} (DDIM inversion); only eta=0 is defined."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample: eta must be 0.0 (the reverse ODE is deterministic)")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ losses and likelihood

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """One VLB term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the
        discretized decoder NLL at t = 0. Returns {"output": (B,), "pred_xstart": (B, ...)}."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Training losses for one batch.

        With a learned variance and an MSE loss type this is the hybrid objective
        L_simple + lambda * L_vlb, where the VLB term sees the predicted mean through a stop-gradient
        (it only trains the variance) and lambda = num_timesteps / 1000 for RESCALED_MSE (1 for MSE).

        Args:
            model: the denoiser.
            x_start: (B, C, ...) clean data.
            t: (B,) step indices.
            model_kwargs: extra keyword arguments for the model.
            noise: optional (B, C, ...) noise for q_sample.

        Returns:
            dict of (B,) tensors: "loss" always; "mse" and "vb" when they apply.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: Dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise ValueError(f"training_losses: unsupported loss_type {self.loss_type}")
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"training_losses: a learned-variance model must output {2 * C} channels, "
                    f"got shape {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # Stop-gradient on the mean: the VLB term only trains the variance (L_simple trains the mean).
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, **kwargs: frozen_out, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Upstream divides by 1000 because the MSE term is not scaled by the number of steps.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        else:
            raise ValueError(f"training_losses: unsupported model_mean_type {self.model_mean_type}")
        if model_output.shape != target.shape:
            raise ValueError(
                f"training_losses: model output {tuple(model_output.shape)} != target {tuple(target.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (B,). Not trainable; measures the schedule."""
        batch_size = x_start.shape[0]
        t = torch.full((batch_size,), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
        progress: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """The full VLB in bits per dim, plus per-step terms.

        Args:
            model: the denoiser.
            x_start: (B, C, ...) data in [-1, 1].
            clip_denoised: clip predicted x_0 in the VLB terms.
            model_kwargs: extra keyword arguments for the model.
            progress: show a tqdm progress bar.

        Returns:
            dict with "total_bpd" (B,), "prior_bpd" (B,), and "vb", "xstart_mse", "mse" of shape (B, T).
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            indices = tqdm(indices, desc="bpd")
        for i in indices:
            t = torch.full((batch_size,), i, device=device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        # Lists were filled from t = T-1 down to 0; store them indexed by t.
        vb_t = torch.stack(vb[::-1], dim=1)
        xstart_mse_t = torch.stack(xstart_mse[::-1], dim=1)
        mse_t = torch.stack(mse[::-1], dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb_t.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": xstart_mse_t,
            "mse": mse_t,
        }
