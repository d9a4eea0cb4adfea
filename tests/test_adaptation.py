"""Test-time adaptation: only the chosen parameters move, the model is restored, the data misfit falls."""

import pytest
import torch
from test_reconstruction import tiny_recon_model

from improved_diffusion.adaptation import adapted_prior, data_loss, select_parameters
from improved_diffusion.data_consistency import MeasurementOperator
from improved_diffusion.mri.fftc import fft2c
from improved_diffusion.reconstruction import SINGLE_COIL_ADAPT_STEPS, ReconOptions, reconstruct_slice

H = W = 16


def _tiny():
    model, diffusion = tiny_recon_model()
    with torch.no_grad():  # a trained network has no zero-initialized output layer (which blocks gradients)
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model.eval(), diffusion


def _scan(sigma=0.01):
    yy, xx = torch.meshgrid(torch.arange(float(H)), torch.arange(float(W)), indexing="ij")
    x = torch.polar(((yy - 8) ** 2 + (xx - 8) ** 2 < 30).float() * 0.5, 0.1 * xx).to(torch.complex64)
    mask = torch.zeros(W)
    mask[::2] = 1
    mask[6:10] = 1
    g = torch.Generator().manual_seed(1)
    noise = sigma * torch.complex(torch.randn(H, W, generator=g), torch.randn(H, W, generator=g)) / 2**0.5
    return x, mask * (fft2c(x) + noise), mask


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_chosen_parameters_adapt_and_everything_is_restored():
    model, diffusion = _tiny()
    x, kspace, mask = _scan()
    op = MeasurementOperator(kspace, mask, sigma=0.01)
    before = _state(model)
    chosen = {id(p) for p in select_parameters(model, ("norm",))}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert names and all(
        "norm" in n or "out.0" in n or "in_layers.0" in n or "out_layers.0" in n for n in names
    )
    with adapted_prior(model, diffusion, op, x, steps=5, t_max=1, lr=1e-2) as log:
        assert len(log.losses) >= 1 and log.num_params == sum(
            p.numel() for p in model.parameters() if id(p) in chosen
        )
        changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
        assert changed and changed <= names
        assert all(not p.requires_grad for p in model.parameters())
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored too


def test_adaptation_lowers_the_data_misfit():
    model, diffusion = _tiny()
    x, kspace, mask = _scan()
    op = MeasurementOperator(kspace, mask, sigma=0.01)
    with adapted_prior(model, diffusion, op, x, steps=30, t_max=0, lr=3e-2, parts=("norm", "out")) as log:
        pass
    assert min(log.losses[-5:]) < 0.8 * log.losses[0]


def test_data_loss_is_one_at_the_noise_level():
    x, kspace, mask = _scan(sigma=0.05)
    op = MeasurementOperator(kspace, mask, sigma=0.05)
    assert float(data_loss(op, x[None])) == pytest.approx(1.0, rel=0.25)


def test_reconstruct_slice_with_adaptation_leaves_the_model_unchanged():
    model, diffusion = _tiny()
    x, kspace, mask = _scan()
    before = _state(model)
    out = reconstruct_slice(
        kspace,
        mask,
        model,
        diffusion,
        options=ReconOptions(num_samples=2, t0="0.5", adapt_steps=3),
        noise_std=0.01,
    )
    assert out.magnitude.shape == (H, W) and torch.isfinite(out.magnitude).all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="adapt_params"):
        ReconOptions(adapt_params="weights").validate()


def test_the_default_adapts_single_coil_scans_only():
    options = ReconOptions()
    assert options.adapt_steps == -1
    assert options.adapt_steps_for(single_coil=True) == SINGLE_COIL_ADAPT_STEPS > 0
    assert options.adapt_steps_for(single_coil=False) == 0
    assert ReconOptions(adapt_steps=0).adapt_steps_for(single_coil=True) == 0
    with pytest.raises(ValueError, match="adapt_steps"):
        ReconOptions(adapt_steps=-2).validate()
    model, diffusion = _tiny()
    x, kspace, mask = _scan()
    single = reconstruct_slice(
        kspace, mask, model, diffusion, options=ReconOptions(num_samples=1, t0="0.5"), noise_std=0.01
    )
    assert single.adapt_steps == SINGLE_COIL_ADAPT_STEPS
    maps = torch.stack([torch.ones(H, W), torch.linspace(0.5, 1.5, W).expand(H, W)]).to(torch.complex64)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    coils = mask * fft2c(maps * x)
    multi = reconstruct_slice(
        coils,
        mask,
        model,
        diffusion,
        options=ReconOptions(num_samples=1, t0="0.5"),
        maps=maps,
        noise_std=0.01,
    )
    assert multi.adapt_steps == 0
