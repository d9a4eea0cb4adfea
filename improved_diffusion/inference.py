"""A trained prior, ready to reconstruct: :func:`load_model` and the one-call :func:`reconstruct`.

The notebook entry point (notebooks/quickstart.ipynb); the scripts use the same :func:`load_model`::

    import improved_diffusion
    recon = improved_diffusion.reconstruct(kspace, mask)  # the committed demo model
    recon.magnitude, recon.std                            # (H, W) tensors

Model and diffusion options always come from the checkpoint's config.json (written at training time), so
a model cannot be rebuilt with options it was not trained with.
"""

import dataclasses
import os
import pickle
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import dist_util
from .reconstruction import RECOMMENDED_RESPACING, ReconOptions, ReconResult, reconstruct_slice
from .respace import SpacedDiffusion
from .script_util import create_model_and_diffusion, load_config, model_options_from_config
from .unet import UNetModel

# The committed demo model (README "Train" has the command that made it): the default everywhere, so the
# quick start reconstructs the demo data without training first.
DEMO_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo", "ema_0.999_007000.pt"
)


def load_model(
    model_path: str = DEMO_MODEL,
    timestep_respacing: str = RECOMMENDED_RESPACING,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[UNetModel, SpacedDiffusion, Dict[str, Any]]:
    """A checkpoint's model (eval mode, on ``device``) and its diffusion respaced for sampling.

    Args:
        model_path: checkpoint ``.pt`` with the config.json of its training run beside it.
        timestep_respacing: steps to sample over (``"ddim50"``, ``"250"``, ``""`` = all training steps).
        device: where the model goes.

    Returns:
        ``(model, diffusion, config)``: config is the training run's config.json.

    Raises:
        ValueError: in one line: no such checkpoint, no config.json beside it, a config without the model
            keys or unsuitable for reconstruction, an unreadable checkpoint, weights that do not match.
    """
    if not model_path:
        raise ValueError("--model_path is required (a checkpoint .pt with config.json beside it)")
    if not os.path.isfile(model_path):
        raise ValueError(f"--model_path {model_path}: no such file")
    try:
        config = load_config(model_path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    options = model_options_from_config(config, model_path)  # configs older than a model flag included
    if int(options["in_channels"]) != 2:
        raise ValueError(
            f"{model_path}: config has in_channels={options['in_channels']}, but reconstruction feeds "
            "complex images as 2 channels (real, imaginary)"
        )
    if options["class_cond"]:
        raise ValueError(f"{model_path}: class-conditional models are not supported for reconstruction")
    options["timestep_respacing"] = timestep_respacing
    model, diffusion = create_model_and_diffusion(**options)
    try:
        state = dist_util.load_state_dict(model_path, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{model_path}: cannot load the checkpoint: {first}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{model_path}: weights do not match the model built from its config.json ({first[0]} "
            f"{first[1].strip() if len(first) > 1 else ''})"
        ) from None
    model.to(torch.device(device))
    model.eval()
    return model, diffusion, config


# load_model's results by (path, respacing, device), so repeated reconstruct() calls load once
_CACHE: Dict[Tuple[str, str, str], Tuple[UNetModel, SpacedDiffusion, Dict[str, Any]]] = {}


def reconstruct(
    kspace: Union[np.ndarray, torch.Tensor],
    mask: Union[np.ndarray, torch.Tensor],
    maps: Optional[Union[np.ndarray, torch.Tensor]] = None,
    model_path: str = DEMO_MODEL,
    timestep_respacing: str = RECOMMENDED_RESPACING,
    device: Union[str, torch.device] = "cpu",
    noise_std: Optional[float] = None,
    **options: Any,
) -> ReconResult:
    """Reconstruct one slice with a trained prior, in one call (loads and caches the model).

    Args:
        kspace: measured k-space ``(H, W)`` single-coil or ``(C, H, W)`` multi-coil, complex (entries off
            the mask are ignored).
        mask: sampling mask broadcastable to it: columns ``(W,)`` or 2-D ``(H, W)``.
        maps: sensitivity maps ``(C, H, W)``, or None (ESPIRiT from the sampled centre).
        model_path, timestep_respacing, device: see :func:`load_model`.
        noise_std: complex noise std of a k-space sample (None: estimated from the data; 0: noiseless).
        **options: fields of :class:`~improved_diffusion.reconstruction.ReconOptions` (``num_samples``,
            ``t0`` or ``start_step``, ``dc``, ``seed``, ...); the rest keep the recommended recipe.

    Returns:
        :class:`~improved_diffusion.reconstruction.ReconResult` (``magnitude``, ``std``, ``zero_filled``,
        ``mean`` as ``(H, W)`` CPU tensors in the input's units).
    """
    known = {f.name for f in dataclasses.fields(ReconOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"reconstruct: unknown options {unknown} (ReconOptions has {sorted(known)})")
    key = (os.path.abspath(model_path), timestep_respacing, str(device))
    if key not in _CACHE:
        _CACHE[key] = load_model(model_path, timestep_respacing, device)
    model, diffusion, _ = _CACHE[key]
    as_tensor = lambda a: None if a is None else torch.as_tensor(a)  # noqa: E731
    return reconstruct_slice(
        as_tensor(kspace),
        as_tensor(mask),
        model,
        diffusion,
        maps=as_tensor(maps),
        options=ReconOptions(**options),
        noise_std=noise_std,
    )
