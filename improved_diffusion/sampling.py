"""The sampling loops of :class:`~improved_diffusion.gaussian_diffusion.GaussianDiffusion`.

One loop, :meth:`SamplingLoops.sample_loop_progressive`, runs the reverse chain with any per-step function
(the diffusion's ``p_sample`` or ``ddim_sample``, or another with their signature). Upstream's four public
loops (``p_sample_loop``, ``ddim_sample_loop`` and their ``*_progressive`` variants) are thin wrappers
around it with upstream's names and signatures; the single steps stay with the diffusion process.

Additions for MRI reconstruction (docs/engine.md, "Sampling API and the MRI hooks"): every loop takes
``start_t`` (start the reverse chain at an intermediate step from a given ``noise`` = x_{start_t}) and
``step_fn`` (called as ``x = step_fn(x_prev, t)`` after each reverse step, e.g. for data consistency).
"""

import collections
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

Model = Callable[..., torch.Tensor]
StepFn = Callable[[torch.Tensor, int], torch.Tensor]
DenoisedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x0, t) -> x0
# One reverse step: (x_t (B, ...), t (B,) long) -> {"sample": x_{t-1}, "pred_xstart": x_0}.
SampleStep = Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]


def _model_device(model: Model, noise: Optional[torch.Tensor]) -> torch.device:
    """The device of the model's parameters; else the noise's device; else CPU."""
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    if noise is not None:
        return noise.device
    return torch.device("cpu")


def _final_sample(steps: Iterator[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """The "sample" of the last step of a progressive loop (every loop takes at least one step)."""
    return collections.deque(steps, maxlen=1)[0]["sample"]  # keeps only the last step's tensors


class SamplingLoops:
    """The sampling loops, mixed into :class:`~improved_diffusion.gaussian_diffusion.GaussianDiffusion`.

    The host class provides ``num_timesteps`` and the single steps ``p_sample`` and ``ddim_sample``.
    """

    num_timesteps: int

    def sample_loop_progressive(
        self,
        sample_step: SampleStep,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        start_t: Optional[int] = None,
        step_fn: Optional[StepFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Run the reverse chain at step indices start_t, ..., 0 with ``sample_step``; yield each step's dict.

        Args:
            sample_step: one reverse step, called under ``torch.no_grad()`` as ``sample_step(x, t)`` with
                x (B, ...) and t (B,) long, returning at least {"sample", "pred_xstart"}; e.g.
                ``functools.partial(diffusion.p_sample, model)``.
            model: the denoiser; only used here to find the default device.
            shape, noise, device, progress, start_t, step_fn: as in :meth:`p_sample_loop`.

        Yields:
            ``sample_step``'s dict after every step; its "sample" is ``step_fn``'s output when one is given.
        """
        shape = tuple(int(s) for s in shape)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"sampling loop: noise shape {tuple(noise.shape)} != shape {shape}")
        if start_t is None:
            start_t = self.num_timesteps - 1
        if isinstance(start_t, bool) or int(start_t) != start_t or not 0 <= start_t < self.num_timesteps:
            raise ValueError(
                f"sampling loop: start_t must be an integer in [0, {self.num_timesteps - 1}] "
                f"(this diffusion's possibly respaced step indices), got {start_t!r}"
            )
        start_t = int(start_t)
        device = torch.device(device) if device is not None else _model_device(model, noise)
        img = noise.to(device) if noise is not None else torch.randn(*shape, device=device)

        indices = list(range(start_t, -1, -1))
        if progress:
            indices = tqdm(indices, desc="sampling")
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = sample_step(img, t)
            if step_fn is not None:
                out["sample"] = step_fn(out["sample"], i)
                if not isinstance(out["sample"], torch.Tensor) or tuple(out["sample"].shape) != shape:
                    raise ValueError(f"sampling loop: step_fn must return a tensor of shape {shape}")
            yield out
            img = out["sample"]

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        start_t: Optional[int] = None,
        step_fn: Optional[StepFn] = None,
    ) -> torch.Tensor:
        """Generate samples with ancestral sampling; returns the final x_0 estimate, shape ``shape``.

        Args:
            model: the denoiser.
            shape: (B, C, H, W) output shape.
            noise: optional x at step ``start_t`` (default: standard normal noise at the last step).
            clip_denoised: clip the predicted x_0 to [-1, 1].
            denoised_fn: applied to the predicted x_0 before clipping, at every step.
            model_kwargs: extra keyword arguments for the model.
            device: where to sample; default the model parameters' device.
            progress: show a tqdm progress bar.
            start_t: step index (0 <= start_t < num_timesteps) to start from; default num_timesteps - 1.
            step_fn: called as ``x = step_fn(x_prev, t)`` after the reverse step at index t.
        """
        return _final_sample(
            self.p_sample_loop_progressive(
                model,
                shape,
                noise=noise,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                model_kwargs=model_kwargs,
                device=device,
                progress=progress,
                start_t=start_t,
                step_fn=step_fn,
            )
        )

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        start_t: Optional[int] = None,
        step_fn: Optional[StepFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like :meth:`p_sample_loop`, but yield {"sample", "pred_xstart"} after every step.

        "sample" is the output of ``step_fn`` when one is given.
        """
        step = functools.partial(
            self.p_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        return self.sample_loop_progressive(step, model, shape, noise, device, progress, start_t, step_fn)

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        eta: float = 0.0,
        start_t: Optional[int] = None,
        step_fn: Optional[StepFn] = None,
    ) -> torch.Tensor:
        """Generate samples with DDIM; same arguments as :meth:`p_sample_loop` plus ``eta``."""
        return _final_sample(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                noise=noise,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                model_kwargs=model_kwargs,
                device=device,
                progress=progress,
                eta=eta,
                start_t=start_t,
                step_fn=step_fn,
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        eta: float = 0.0,
        start_t: Optional[int] = None,
        step_fn: Optional[StepFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like :meth:`ddim_sample_loop`, but yield {"sample", "pred_xstart"} after every step."""
        step = functools.partial(
            self.ddim_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )
        return self.sample_loop_progressive(step, model, shape, noise, device, progress, start_t, step_fn)
