"""Data consistency: operator adjointness, projection/replacement exactness, CG, bounding and the hooks."""

import numpy as np
import pytest
import torch

from improved_diffusion.data_consistency import (
    DiffusionDataConsistency,
    MeasurementOperator,
    bound_x0,
    conjugate_gradient,
    final_data_consistency,
    project,
    replace,
)
from improved_diffusion.mri.fftc import channels_to_complex, complex_to_channels, fft2c


def _crandn(*shape, gen):
    return torch.complex(torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen))


def _smooth_maps(coils, h, w, gen):
    """Smooth random maps normalized to sum_c |S_c|^2 = 1 everywhere (as normalize_maps does)."""
    low = _crandn(coils, 4, 4, gen=gen)
    maps = torch.nn.functional.interpolate(
        torch.view_as_real(low).permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False
    )
    maps = torch.complex(maps[:, 0], maps[:, 1]) + 0.3
    return maps / torch.sqrt((maps.abs() ** 2).sum(0, keepdim=True))


def _column_mask(w, gen, frac=0.35):
    mask = (torch.rand(w, generator=gen) < frac).float()
    mask[w // 2 - 2 : w // 2 + 2] = 1.0
    return mask


def _problem(multicoil, h=20, w=17, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_true = _crandn(h, w, gen=gen)
    mask = _column_mask(w, gen)
    if multicoil:
        maps = _smooth_maps(4, h, w, gen)
        kspace = mask * fft2c(maps * x_true)
        return MeasurementOperator(kspace, mask, maps), x_true, gen
    return MeasurementOperator(mask * fft2c(x_true), mask), x_true, gen


@pytest.mark.parametrize("multicoil", [False, True])
def test_operator_adjoint_dot_test(multicoil):
    op, _, gen = _problem(multicoil)
    x = _crandn(3, *op.image_shape, gen=gen)
    k = _crandn(3, op.y.shape[1], *op.image_shape, gen=gen)
    lhs = (op.forward(x).conj() * k).sum()
    rhs = (x.conj() * op.adjoint(k)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-3)


def test_single_coil_project_is_exact_and_keeps_unsampled_kspace():
    op, x_true, gen = _problem(False)
    x_hat = _crandn(2, *op.image_shape, gen=gen)
    out = project(x_hat, op, gamma=0.0)
    assert op.residual(out).max() < 1e-4
    unsampled = (1 - op.mask[0, 0]).bool().expand(op.image_shape)
    assert torch.allclose(fft2c(out)[:, unsampled], fft2c(x_hat)[:, unsampled], atol=1e-5)


def test_single_coil_project_with_gamma_matches_closed_form():
    op, _, gen = _problem(False)
    x_hat = _crandn(1, *op.image_shape, gen=gen)
    gamma = 0.5
    out = fft2c(project(x_hat, op, gamma=gamma))
    k_hat = fft2c(x_hat)
    sampled = op.mask[0, 0].bool().expand(op.image_shape)
    want = (op.y[0, 0] + gamma * k_hat[0]) / (1 + gamma)
    assert torch.allclose(out[0][sampled], want[sampled], atol=1e-5)


def test_identity_dc_of_zero_filled_reproduces_zero_filled():
    op, _, _ = _problem(False)
    zf = op.zero_filled()
    assert torch.allclose(project(zf, op), zf, atol=1e-6)
    assert torch.allclose(final_data_consistency(zf, op), zf, atol=1e-6)


def test_multicoil_project_and_final_are_consistent():
    op, x_true, gen = _problem(True)
    x_hat = x_true + 0.5 * _crandn(2, *op.image_shape, gen=gen)
    before = op.residual(x_hat)
    few = project(x_hat, op, gamma=0.01, cg_iters=5)
    assert (op.residual(few) < 0.2 * before).all()
    exact = project(x_hat, op, gamma=0.0, cg_iters=100)
    assert op.residual(exact).max() < 1e-4
    final = final_data_consistency(few, op, cg_iters=100)
    assert final.dtype == few.dtype
    assert op.residual(final).max() < 1e-4


def test_conjugate_gradient_matches_dense_solve():
    gen = torch.Generator().manual_seed(3)
    n = 6
    a = _crandn(n * 2, n, gen=gen)
    mat = a.conj().T @ a + 0.1 * torch.eye(n, dtype=a.dtype)
    b = _crandn(2, 1, n, gen=gen)

    def normal(v):  # (B, 1, n) images with H = 1
        return (mat @ v[:, 0, :, None])[:, None, :, 0]

    x = conjugate_gradient(normal, b, torch.zeros_like(b), num_iters=3 * n)
    want = torch.linalg.solve(mat, b[:, 0, :, None])[:, None, :, 0]
    assert torch.allclose(x, want, atol=1e-4)


@pytest.mark.parametrize("multicoil", [False, True])
def test_replace_is_exact_when_clean_and_noisy_otherwise(multicoil):
    op, _, gen = _problem(multicoil)
    x = _crandn(2, *op.image_shape, gen=gen)
    clean = replace(x, op, alpha_bar=1.0)
    if multicoil:  # one step x + A^H(y - A x) is exact where A A^H restricted to the data is identity
        assert op.residual(clean).max() < op.residual(x).min()
    else:
        assert op.residual(clean).max() < 1e-5
    noisy = replace(x, op, alpha_bar=0.25, noise=_crandn(2, *op.image_shape, gen=gen))
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, clean)


def test_single_coil_replace_matches_kspace_formula():
    op, _, gen = _problem(False)
    x = _crandn(1, *op.image_shape, gen=gen)
    noise = _crandn(1, *op.image_shape, gen=gen)
    ab = 0.3
    out = fft2c(replace(x, op, ab, noise=noise))[0]
    m = op.mask[0, 0]
    want = (1 - m) * fft2c(x)[0] + m * (np.sqrt(ab) * op.y[0, 0] + np.sqrt(1 - ab) * fft2c(noise)[0])
    assert torch.allclose(out, want, atol=1e-5)


def test_bound_x0_modes():
    x = torch.tensor([3.0, 0.3, -4.0, 0.4]).reshape(1, 2, 1, 2)  # pixels 3-4i (|5|) and 0.3+0.4i (|0.5|)
    mag = channels_to_complex(bound_x0(x, "magnitude")).abs()
    assert torch.allclose(mag, torch.tensor([[[1.0, 0.5]]]))
    assert bound_x0(x, "channel").abs().max() <= 1.0
    assert torch.equal(bound_x0(x, "none"), x)
    with pytest.raises(ValueError, match="clip mode"):
        bound_x0(x, "bogus")


def test_hooks_project_and_replace():
    op, x_true, gen = _problem(False)
    acp = np.array([1.0, 0.9, 0.5])
    x0 = 0.1 * complex_to_channels(_crandn(2, *op.image_shape, gen=gen))
    dc = DiffusionDataConsistency(op, "project", acp, clip="none")
    assert op.residual(channels_to_complex(dc.denoised_fn(x0))).max() < 1e-4
    assert torch.equal(dc.step_fn(x0, 1), x0)
    dc = DiffusionDataConsistency(op, "replace", acp, clip="none")
    assert torch.equal(dc.denoised_fn(x0), x0)
    assert op.residual(channels_to_complex(dc.step_fn(x0, 0))).max() < 1e-5  # t=0: noise-free
    assert op.residual(channels_to_complex(dc.step_fn(x0, 2))).min() > 1e-2  # ᾱ=0.5: noisy
    with pytest.raises(ValueError, match="data consistency mode"):
        DiffusionDataConsistency(op, "bogus", acp)


def test_operator_rejects_bad_shapes():
    k = torch.zeros(4, 8, 6, dtype=torch.complex64)
    with pytest.raises(ValueError, match="mask"):
        MeasurementOperator(k, torch.ones(5))
    with pytest.raises(ValueError, match="sensitivity maps"):
        MeasurementOperator(k, torch.ones(6), torch.ones(3, 8, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="needs sensitivity maps"):
        MeasurementOperator(k, torch.ones(6))
