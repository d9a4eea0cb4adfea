"""Improved denoising diffusion probabilistic models as priors for MRI reconstruction."""
