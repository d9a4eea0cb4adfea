"""reconstruct_slice: oracle and identity cases, every sampler x DC mode, K samples, start time t0."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import coil_maps, phantom, tiny_model_and_diffusion

from improved_diffusion.mri.fftc import complex_to_channels, fft2c
from improved_diffusion.reconstruction import (
    DEFAULT_T0,
    ReconOptions,
    reconstruct_slice,
    resolve_start_step,
)
from improved_diffusion.script_util import create_gaussian_diffusion
from improved_diffusion.transforms import scale_from_kspace

H, W, COILS = 16, 20, 3


def _mask(w=W):
    mask = torch.zeros(w)
    mask[::3] = 1
    mask[w // 2 - 2 : w // 2 + 2] = 1
    return mask


def _data(multicoil, full=False):
    x = torch.from_numpy(phantom(H, W))
    mask = torch.ones(W) if full else _mask()
    maps = torch.from_numpy(coil_maps(COILS, H, W)) if multicoil else None
    kspace = mask * (fft2c(maps * x) if multicoil else fft2c(x))
    return x, kspace, mask, maps


class _Oracle:
    """A fake x0-predicting network that always returns a fixed clean image (in normalized units)."""

    def __init__(self, image):
        self.x0 = complex_to_channels(image)[None]

    def __call__(self, x, t, **kwargs):
        return self.x0.expand(x.shape[0], -1, -1, -1).to(x.device)


def _oracle_diffusion(respacing="5"):
    return create_gaussian_diffusion(
        steps=20, noise_schedule="cosine", predict_xstart=True, timestep_respacing=respacing
    )


def tiny_recon_model():
    """The tiny UNet (seeded) on its 20-step diffusion respaced to 4 steps, in eval mode."""
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="4")
    return model.eval(), diffusion


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_recon_model()


@pytest.mark.parametrize("multicoil", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
@pytest.mark.parametrize("dc", ["project", "replace", "none"])
def test_oracle_denoiser_gives_ground_truth(multicoil, sampler, dc):
    x, kspace, mask, maps = _data(multicoil)
    scale = scale_from_kspace(kspace, maps)
    model = _Oracle(x / scale)
    opts = ReconOptions(dc=dc, sampler=sampler, num_samples=2, clip="none", t0="1.0")
    out = reconstruct_slice(
        kspace, mask, model, _oracle_diffusion(), maps=maps, options=opts, scale=scale, noise_std=0.0
    )
    assert torch.allclose(out.mean, x, atol=1e-4 * x.abs().max())
    if dc != "none":
        assert out.residual < 1e-4


def test_identity_zero_filled_passes_through():
    x, kspace, mask, _ = _data(False)
    zf = torch.fft.ifftshift(torch.fft.ifft2(torch.fft.fftshift(kspace), norm="ortho"))
    scale = scale_from_kspace(kspace)
    for dc in ("project", "replace"):
        opts = ReconOptions(dc=dc, sampler="ddim", clip="none")
        out = reconstruct_slice(
            kspace, mask, _Oracle(zf / scale), _oracle_diffusion(), options=opts, noise_std=0
        )
        assert torch.allclose(out.zero_filled, zf.abs(), atol=1e-5 * zf.abs().max())
        assert torch.allclose(out.mean, zf, atol=1e-4 * zf.abs().max())


@pytest.mark.parametrize("multicoil", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
@pytest.mark.parametrize("dc", ["project", "replace", "none"])
def test_every_sampler_and_dc_runs_on_a_tiny_model(tiny_model, multicoil, sampler, dc):
    model, diffusion = tiny_model
    _, kspace, mask, maps = _data(multicoil)
    opts = ReconOptions(dc=dc, sampler=sampler, num_samples=2, t0="1.0", cg_tol=1e-8, cg_iters=300)
    out = reconstruct_slice(kspace, mask, model, diffusion, maps=maps, options=opts, noise_std=0.0)
    assert out.mean.shape == (H, W) and out.mean.is_complex()
    assert out.std.shape == (H, W) and not out.std.is_complex()
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.std).all()
    assert out.nfe == diffusion.num_timesteps and out.num_samples == 2
    if dc != "none":
        assert out.residual < 1e-4  # consistent measurements: the final DC is exact


def test_std_is_zero_on_fully_sampled_input(tiny_model):
    model, diffusion = tiny_model
    for multicoil in (False, True):
        x, kspace, mask, maps = _data(multicoil, full=True)
        opts = ReconOptions(num_samples=3, sampler="ancestral", cg_tol=1e-8, cg_iters=300)
        out = reconstruct_slice(kspace, mask, model, diffusion, maps=maps, options=opts, noise_std=0.0)
        assert out.std.shape == (H, W)
        assert out.std.max() < 1e-3 * x.abs().max()
        assert torch.allclose(out.mean, x, atol=1e-3 * x.abs().max())


def test_samples_differ_on_undersampled_input_and_seed_is_reproducible(tiny_model):
    model, diffusion = tiny_model
    _, kspace, mask, _ = _data(False)
    opts = ReconOptions(num_samples=3, sampler="ancestral", seed=7, batch_size=2, t0="1.0")
    a = reconstruct_slice(kspace, mask, model, diffusion, options=opts)
    b = reconstruct_slice(kspace, mask, model, diffusion, options=opts)
    assert torch.equal(a.mean, b.mean) and a.std.max() > 0
    assert a.nfe == diffusion.num_timesteps  # per sample, though the K samples ran in 2 batches


@pytest.mark.parametrize("multicoil", [False, True])
def test_noisy_data_are_fitted_no_tighter_than_needed(tiny_model, multicoil):
    """With the noise known, the output fits the data at most to the noise level; the exact fit
    (noise_std = 0) interpolates the noise. (Whether that costs accuracy needs a real prior: the
    benchmarks measure it.)"""
    model, diffusion = tiny_model
    x, kspace, mask, maps = _data(multicoil)
    gen = torch.Generator().manual_seed(0)
    sigma = 0.5 * float(kspace.abs().max()) / np.sqrt(H * W)
    noise = torch.complex(torch.randn(kspace.shape, generator=gen), torch.randn(kspace.shape, generator=gen))
    noisy = kspace + mask * sigma / np.sqrt(2) * noise
    opts = ReconOptions(num_samples=2, cg_tol=1e-6, cg_iters=300)
    out = reconstruct_slice(noisy, mask, model, diffusion, maps=maps, options=opts, noise_std=sigma)
    assert out.noise_source == "given" and out.noise_std == pytest.approx(sigma)
    assert out.noise_ratio <= 1.05
    exact = reconstruct_slice(noisy, mask, model, diffusion, maps=maps, options=opts, noise_std=0.0)
    assert exact.residual < out.residual


def test_start_time_t0(tiny_model):
    model, diffusion = tiny_model  # 20 base steps respaced to 4: timestep_map [0, 6, 13, 19]
    assert list(diffusion.timestep_map) == [0, 6, 13, 19]
    assert resolve_start_step(diffusion, t0="1.0") == 3
    assert resolve_start_step(diffusion, t0=1.0) == 3
    assert resolve_start_step(diffusion, t0="0.5") == 1  # base step round(10) - 1 = 9: nearest kept is 6
    assert resolve_start_step(diffusion, t0=0.35) == 1  # base 6, kept exactly
    assert resolve_start_step(diffusion, t0=0.5, start_step=None) == 1
    assert resolve_start_step(diffusion, start_step=13) == 2
    assert resolve_start_step(diffusion, start_step=10) == 2  # 10 is 4 from 6 and 3 from 13
    assert resolve_start_step(diffusion, start_step=0) == 0
    assert resolve_start_step(diffusion) == resolve_start_step(diffusion, t0=DEFAULT_T0)  # the default
    for bad in ("1.5", "0.0", "-0.1", "abc", 2.0):
        with pytest.raises(ValueError, match="t0 must be a fraction"):
            resolve_start_step(diffusion, t0=bad)
    for old_int in ("1", "200", 1, "0"):  # former integer steps: refused, pointing to start_step
        with pytest.raises(ValueError, match="use --start_step"):
            resolve_start_step(diffusion, t0=old_int)
    for bad in (20, -1, 2.5):
        with pytest.raises(ValueError, match="start_step"):
            resolve_start_step(diffusion, start_step=bad)
    with pytest.raises(ValueError, match="not both"):
        resolve_start_step(diffusion, t0=0.5, start_step=9)
    with pytest.raises(ValueError, match="not both"):
        ReconOptions(t0=0.5, start_step=9).validate()
    _, kspace, mask, _ = _data(False)
    out = reconstruct_slice(kspace, mask, model, diffusion, options=ReconOptions(t0="0.5"))
    assert out.nfe == 2 and out.start_step == 1 and out.base_start_step == 6
    out = reconstruct_slice(kspace, mask, model, diffusion, options=ReconOptions(start_step=13))
    assert out.nfe == 3 and out.base_start_step == 13


def test_same_t0_same_base_start_across_respacings():
    """A start step that two respacings share is where both start; t0 lands on the nearest kept step."""
    full = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    ddim50 = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim50")
    assert full.timestep_map[resolve_start_step(full, t0=0.2)] == 199
    assert ddim50.timestep_map[resolve_start_step(ddim50, t0=0.2)] == 200  # stride 20: nearest to 199
    for d in (full, ddim50):
        assert d.timestep_map[resolve_start_step(d, start_step=200)] == 200
        assert resolve_start_step(d, t0=1.0) == d.num_timesteps - 1  # pure noise
    # the default start of the recommended recipe: base step 180 of ddim50 (10 steps), as recorded
    assert ddim50.timestep_map[resolve_start_step(ddim50)] == 180 and resolve_start_step(ddim50) == 9


def test_bad_options_and_inputs(tiny_model):
    model, diffusion = tiny_model
    _, kspace, mask, maps = _data(True)
    with pytest.raises(ValueError, match="dc must be"):
        reconstruct_slice(kspace, mask, model, diffusion, maps=maps, options=ReconOptions(dc="bogus"))
    with pytest.raises(ValueError, match="sens_maps.*does not match"):
        reconstruct_slice(kspace, mask, model, diffusion, maps=maps[:2])
    with pytest.raises(ValueError, match="NaN"):
        reconstruct_slice(kspace, mask, model, diffusion, maps=maps * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        reconstruct_slice(kspace * float("nan"), mask, model, diffusion, maps=maps)
    with pytest.raises(ValueError, match="all zero"):
        reconstruct_slice(kspace * 0, mask, model, diffusion, maps=maps)
    with pytest.raises(ValueError, match="mask"):
        reconstruct_slice(kspace, torch.ones(W + 1), model, diffusion, maps=maps, scale=1.0)
    with pytest.raises(ValueError, match="complex"):
        reconstruct_slice(kspace.abs(), mask, model, diffusion, maps=maps)
    assert np.isfinite(reconstruct_slice(kspace, mask, model, diffusion, maps=maps).residual)


def test_multicoil_output_is_zero_outside_the_maps_support(tiny_model):
    """Where no coil sees the object the data say nothing; the output is 0 there (as SENSE's), not the prior's
    guess, and the samples are unchanged on the support."""
    model, diffusion = tiny_model
    x, _, mask, maps = _data(True)
    yy, xx = np.mgrid[:H, :W]
    inside = torch.from_numpy((yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (H / 2.5) ** 2)
    maps = maps * inside
    kspace = mask * fft2c(maps * x)
    opts = ReconOptions(num_samples=2, t0="1.0", cg_tol=1e-8, cg_iters=300)
    out = reconstruct_slice(kspace, mask, model, diffusion, maps=maps, options=opts, noise_std=0.0)
    for image in (out.mean, out.magnitude, out.std):
        assert torch.all(image[~inside] == 0)
    assert out.magnitude[inside].min() > 0 and out.std[inside].max() > 0
    opts = replace(opts, zero_outside_maps=False)
    kept = reconstruct_slice(kspace, mask, model, diffusion, maps=maps, options=opts, noise_std=0.0)
    assert kept.magnitude[~inside].min() > 0  # the prior's values, which the data do not constrain
    assert torch.allclose(kept.mean[inside], out.mean[inside])
