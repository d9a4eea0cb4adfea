"""Test-time adaptation of the prior to one scan's own measurements (AdaDiff-style).

Güngör et al. 2023, "Adaptive diffusion priors for accelerated MRI reconstruction" (Medical Image Analysis
88:102872) adapt a trained diffusion prior to each test scan: after a first reconstruction, the network's
parameters are fine-tuned so that its denoised estimates agree with the measured k-space, then the scan is
reconstructed again with the adapted prior. Here only a small part of the network adapts (the GroupNorm
scales and shifts, and/or the output block), so a few steps cost little and the prior cannot forget what it
learned; :func:`adapted_prior` restores every parameter afterwards.

The loss of one step, for the first-pass reconstruction ``x_ref`` (normalized units) and the slice's
measurement operator ``A`` (noise std ``sigma``, N measured samples)::

    t ~ U{0, ..., t_max},  x_t = q_sample(x_ref, t),  x̂0 = pred_xstart(model, x_t, t)
    loss = ‖A x̂0 − y‖² / (sigma² N)        (‖A x̂0 − y‖² / ‖y‖² for noiseless data)

It is 1 for an x̂0 that fits the data to the noise level; the adaptation stops there (fitting tighter would
fit the noise), or after ``steps``.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence

import torch

from .data_consistency import MeasurementOperator
from .mri.fftc import channels_to_complex, complex_to_channels

ADAPT_PARAMS = ("norm", "out")


@dataclass
class AdaptationLog:
    """What one adaptation did: the loss of every step (noise-level units), and the parameter count."""

    losses: List[float] = field(default_factory=list)
    num_params: int = 0


def select_parameters(model: torch.nn.Module, parts: Sequence[str]) -> List[torch.nn.Parameter]:
    """The parameters of ``model`` that adapt: ``norm`` (every GroupNorm's affine), ``out`` (``model.out``).

    Raises:
        ValueError: for an unknown part, or when the model has none of the parts.
    """
    unknown = [p for p in parts if p not in ADAPT_PARAMS]
    if unknown or not parts:
        raise ValueError(f"adapt parts must be a non-empty subset of {ADAPT_PARAMS}, got {list(parts)}")
    chosen: List[torch.nn.Parameter] = []
    if "norm" in parts:
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm) and module.affine:
                chosen += [module.weight, module.bias]
    if "out" in parts and isinstance(getattr(model, "out", None), torch.nn.Module):
        chosen += [p for p in model.out.parameters() if all(p is not q for q in chosen)]
    if not chosen:
        raise ValueError(f"the model has no parameters in {list(parts)}")
    return chosen


def data_loss(op: MeasurementOperator, x0: torch.Tensor) -> torch.Tensor:
    """``‖A x0 − y‖² / (sigma² N)`` averaged over the batch (relative to ``‖y‖²`` for noiseless data)."""
    misfit = (op.forward(x0) - op.y).abs().pow(2).sum(dim=(-3, -2, -1))
    if op.sigma > 0:
        return (misfit / (op.sigma**2 * op.num_measurements)).mean()
    return (misfit / op.y.abs().pow(2).sum(dim=(-3, -2, -1)).clamp_min(1e-30)).mean()


@contextlib.contextmanager
def adapted_prior(
    model: torch.nn.Module,
    diffusion,
    op: MeasurementOperator,
    x_ref: torch.Tensor,
    steps: int,
    t_max: int,
    lr: float = 1e-3,
    parts: Sequence[str] = ("norm",),
    batch_size: int = 2,
    seed: int = 0,
) -> Iterator[AdaptationLog]:
    """Fine-tune part of ``model`` on one scan for the duration of a ``with`` block, then restore it.

    Args:
        model: the network (a torch module; ``diffusion`` wraps it for respaced timesteps).
        diffusion: the (respaced) diffusion the reconstruction samples with.
        op: the slice's measurement operator, in the network's normalized units.
        x_ref: ``(H, W)`` complex first-pass reconstruction, normalized units.
        steps: Adam steps at most (0: no adaptation).
        t_max: largest step index drawn (the reconstruction's start step).
        lr: Adam learning rate.
        parts: which parameters adapt (:func:`select_parameters`).
        batch_size: noise draws per step.
        seed: seed of the draws (a forked RNG; the global stream is left as it was).

    Yields:
        An :class:`AdaptationLog`, filled when the block is entered.
    """
    params = select_parameters(model, parts)
    saved = [p.detach().clone() for p in params]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    log = AdaptationLog(num_params=sum(p.numel() for p in params))
    device = x_ref.device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        opt = torch.optim.Adam(params, lr=lr)
        x_start = complex_to_channels(x_ref[None]).expand(batch_size, -1, -1, -1).float()
        fork = [device] if device.type == "cuda" else []
        with torch.enable_grad(), torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            for _ in range(steps):
                t = torch.randint(0, t_max + 1, (batch_size,), device=device)
                x_t = diffusion.q_sample(x_start, t)
                out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False)
                loss = data_loss(op, channels_to_complex(out["pred_xstart"].float()))
                log.losses.append(float(loss.detach()))
                if loss.item() <= 1.0 and op.sigma > 0:
                    break  # x̂0 fits the data to the noise level: tighter would fit the noise
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
        yield log
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
