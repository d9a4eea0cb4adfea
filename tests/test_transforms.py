"""Tests for improved_diffusion.transforms: the slice image and the intensity-scale rule."""

import numpy as np
import pytest
import torch
from test_fastmri_data import _maps, _phantom

from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.mri.subsample import create_mask_for_mask_type
from improved_diffusion.transforms import sampled_center_block, scale_from_kspace, slice_to_image


def test_scale_of_fully_sampled_kspace_is_twice_the_image_peak():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(_phantom(rng, 24, 32))
    maps = torch.from_numpy(_maps(4, 24, 32))
    assert scale_from_kspace(fft2c(img)) == pytest.approx(2 * float(img.abs().max()), rel=1e-5)
    coil = maps * img
    rss = coil.abs().pow(2).sum(0).sqrt()
    assert scale_from_kspace(fft2c(coil)) == pytest.approx(2 * float(rss.max()), rel=1e-5)


@pytest.mark.parametrize(
    "name, cf, acc, size",
    [("random", 0.08, 4, (32, 32)), ("equispaced", 0.04, 8, (24, 128)), ("poisson", 0.08, 4, (64, 64))],
)
def test_scale_of_masked_kspace_uses_its_fully_sampled_centre(name, cf, acc, size):
    rng = np.random.default_rng(1)
    img = torch.from_numpy(_phantom(rng, *size))
    for kspace in (fft2c(img), fft2c(torch.from_numpy(_maps(4, *size)) * img)):
        mask, _ = create_mask_for_mask_type(name, [cf], [acc])(kspace.shape, seed=3)
        masked = kspace * mask
        sampled = (masked != 0).reshape(-1, *size).any(0)
        rows, cols = sampled_center_block(sampled)
        assert sampled[rows, cols].all()
        if name != "poisson":  # column masks: every row of the ACS columns
            assert (rows.start, rows.stop) == (0, size[0])
            assert cols.stop - cols.start >= 3
        low = torch.zeros_like(kspace)
        low[..., rows, cols] = kspace[..., rows, cols]
        peak = ifft2c(low).abs().pow(2).reshape(-1, *size).sum(0).sqrt().max()
        assert scale_from_kspace(masked) == pytest.approx(2 * float(peak), rel=1e-5)
        # the blurred centre peaks lower than the image: never a larger scale than the full data's
        assert scale_from_kspace(masked) <= scale_from_kspace(kspace) * 1.1


def test_scale_rejects_partly_sampled_block_and_handles_zero():
    k = fft2c(torch.from_numpy(_phantom(np.random.default_rng(2), 16, 16)))
    k[..., 8 + 1] = 0  # one of the three central columns missing
    with pytest.raises(ValueError, match="partly sampled"):
        scale_from_kspace(k)
    assert scale_from_kspace(torch.zeros(8, 8, dtype=torch.complex64)) == 1.0


def test_slice_to_image_multicoil_without_maps_says_prepare():
    with pytest.raises(ValueError, match="prepare_fastmri"):
        slice_to_image(torch.zeros(2, 8, 8, dtype=torch.complex64))
