"""Improved denoising diffusion probabilistic models as priors for MRI reconstruction.

The notebook entry points, imported on first use (so ``import improved_diffusion.mri.fftc`` stays light)::

    model, diffusion, config = improved_diffusion.load_model(path, timestep_respacing="ddim50")
    recon = improved_diffusion.reconstruct(kspace, mask, model_path=path)
"""

__all__ = ["load_model", "reconstruct"]


def __getattr__(name: str):
    if name in __all__:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'improved_diffusion' has no attribute {name!r}")
