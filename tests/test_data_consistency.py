"""Data consistency: operator adjointness, projection/replacement exactness, CG, bounding and the hooks."""

import numpy as np
import pytest
import torch

from improved_diffusion.data_consistency import (
    CG_ITERS,
    CG_TOL,
    FINAL_LOG10_LAMBDA_MIN,
    DiffusionDataConsistency,
    MeasurementOperator,
    bound_x0,
    final_data_consistency,
    prior_weight,
    prox_data,
    replace,
)
from improved_diffusion.mri.fftc import channels_to_complex, complex_to_channels, fft2c
from improved_diffusion.mri.solvers import conjugate_gradient


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


def test_single_coil_exact_projection_keeps_unsampled_kspace():
    op, x_true, gen = _problem(False)
    x_hat = _crandn(2, *op.image_shape, gen=gen)
    out = prox_data(x_hat, op, 0.0)
    assert op.residual(out).max() < 1e-4
    unsampled = (1 - op.mask[0, 0]).bool().expand(op.image_shape)
    assert torch.allclose(fft2c(out)[:, unsampled], fft2c(x_hat)[:, unsampled], atol=1e-5)


def test_single_coil_prox_matches_closed_form():
    op, _, gen = _problem(False)
    x_hat = _crandn(1, *op.image_shape, gen=gen)
    lam = 0.5
    out = fft2c(prox_data(x_hat, op, lam))
    k_hat = fft2c(x_hat)
    sampled = op.mask[0, 0].bool().expand(op.image_shape)
    want = (op.y[0, 0] + lam * k_hat[0]) / (1 + lam)
    assert torch.allclose(out[0][sampled], want[sampled], atol=1e-5)


def _dense(op):
    """The dense matrix of A (rows: coils x H x W k-space entries, columns: H x W pixels), complex128."""
    h, w = op.image_shape
    eye = torch.eye(h * w, dtype=torch.complex64).reshape(h * w, h, w)
    return op.forward(eye).reshape(h * w, -1).T.to(torch.complex128)


@pytest.mark.parametrize("multicoil", [False, True])
def test_noise_weighted_prox_matches_dense_solve(multicoil):
    """argmin ||Ax - y||^2 / sigma^2 + ||x - x_hat||^2 / r^2 against a dense solve of its normal equations."""
    op, x_true, gen = _problem(multicoil, h=8, w=7)
    x_hat = x_true + 0.3 * _crandn(2, *op.image_shape, gen=gen)
    sigma, r = 0.1, 0.4
    lam = sigma**2 / r**2
    a = _dense(op)
    y = op.y.reshape(1, -1).T.to(torch.complex128)
    normal = a.conj().T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype)
    for b in range(2):
        rhs = a.conj().T @ y + lam * x_hat[b].reshape(-1, 1).to(torch.complex128)
        want = torch.linalg.solve(normal, rhs).reshape(op.image_shape)
        got = prox_data(x_hat[b : b + 1], op, lam, tol=1e-6, max_iters=500)[0]
        assert torch.allclose(got.to(torch.complex128), want, atol=1e-4), (got - want).abs().max()


def test_default_multicoil_prox_is_converged():
    """The default CG stopping rule solves the proximal step, not an early-stopped version of it: 10x more
    iterations and a 10x tighter tolerance move the solution by < 1e-3 of its norm (the old rule, 1e-3 and 100
    iterations, moved it by 3e-3 here)."""
    op, x_true, gen = _problem(True, h=32, w=29)
    x_hat = x_true + 0.3 * _crandn(1, *op.image_shape, gen=gen)
    lam = 1e-2
    default = prox_data(x_hat, op, lam)
    tighter = prox_data(x_hat, op, lam, tol=CG_TOL / 10, max_iters=10 * CG_ITERS)
    assert (default - tighter).norm() < 1e-3 * tighter.norm()


def test_prior_weight_follows_the_step_noise_level():
    assert prior_weight(0.0, 0.5, 1.0) == 0.0  # noiseless data: exact consistency
    assert prior_weight(0.1, 1.0, 1.0) == float("inf")  # a clean estimate is kept
    # lambda = sigma^2 / (2 zeta^2 (1 - abar) / abar)
    assert prior_weight(0.1, 0.8, 0.5) == pytest.approx(0.01 / (2 * 0.25 * 0.2 / 0.8))
    assert prior_weight(0.1, 0.9, 1.0) > prior_weight(0.1, 0.5, 1.0)  # less noise: trust x0 more


@pytest.mark.parametrize("multicoil", [False, True])
def test_final_dc_fits_to_the_noise_level(multicoil):
    """The discrepancy principle: the residual of the output is sigma sqrt(N), not less, not more."""
    op0, x_true, gen = _problem(multicoil, h=24, w=21)
    sigma = 0.05
    noise = sigma / np.sqrt(2) * _crandn(*op0.y.shape, gen=gen) * op0.mask
    op = MeasurementOperator(op0.y + noise, op0.mask, None if op0.single_coil else op0.maps, sigma=sigma)
    assert float(op.noise_ratio(x_true[None])[0]) == pytest.approx(1.0, abs=0.15)  # the truth fits so well
    far = x_true + 0.5 * _crandn(2, *op.image_shape, gen=gen)  # too far: pulled in to the noise level
    out, lam = final_data_consistency(far, op)
    assert torch.allclose(op.noise_ratio(out).double(), torch.ones(2, dtype=torch.float64), atol=0.02)
    assert (lam > 0).all() and torch.isfinite(lam).all()
    exact = prox_data(far, op, 0.0, tol=1e-8, max_iters=500)  # exact interpolation overfits the noise
    assert (op.noise_ratio(exact) < 0.9).all()
    kept, lam = final_data_consistency(exact, op)  # already within the noise level: kept as it is
    assert torch.equal(kept, exact) and torch.isinf(lam).all()


def test_final_dc_does_not_chase_a_noise_level_the_maps_cannot_reach():
    """Data from other maps (model error): the fit stops at the noise-gain bound λ = 1e-2 instead of
    inverting the small singular values, and stays closer to the truth than the exact fit."""
    op0, x_true, gen = _problem(True, h=24, w=21)
    other = _smooth_maps(4, 24, 21, gen)  # the coils the data really came from
    sigma = 0.05
    y = op0.mask * (fft2c(other * x_true) + sigma / np.sqrt(2) * _crandn(4, 24, 21, gen=gen))
    op = MeasurementOperator(y, op0.mask, op0.maps, sigma=sigma)
    out, lam = final_data_consistency(x_true[None], op)
    assert lam.item() == pytest.approx(10.0**FINAL_LOG10_LAMBDA_MIN) and op.noise_ratio(out).item() > 1.0
    loose = prox_data(x_true[None], op, 1e-6, tol=1e-8, max_iters=500)
    assert (out - x_true).abs().norm() < (loose - x_true).abs().norm()


def test_noiseless_final_dc_is_exact():
    op, _, gen = _problem(True)
    x = _crandn(2, *op.image_shape, gen=gen)
    out, lam = final_data_consistency(x, op, tol=1e-8, max_iters=300)
    assert op.residual(out).max() < 1e-4 and (lam == 0).all()


def test_identity_dc_of_zero_filled_reproduces_zero_filled():
    op, _, _ = _problem(False)
    zf = op.zero_filled()
    assert torch.allclose(prox_data(zf, op, 0.0), zf, atol=1e-6)
    assert torch.allclose(final_data_consistency(zf, op)[0], zf, atol=1e-6)


def test_multicoil_prox_converges_more_iterations_change_nothing():
    op, x_true, gen = _problem(True)
    x_hat = x_true + 0.5 * _crandn(2, *op.image_shape, gen=gen)
    default = prox_data(x_hat, op, 0.01)
    more = prox_data(x_hat, op, 0.01, tol=1e-5, max_iters=1000)
    assert (default - more).abs().max() < 1e-2 * x_true.abs().max()
    exact = prox_data(x_hat, op, 0.0, tol=1e-8, max_iters=300)
    assert op.residual(exact).max() < 1e-4


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


def test_replace_adds_only_the_missing_noise_and_weighs_noisier_data():
    op0, x_true, gen = _problem(False)
    x = _crandn(1, *op0.image_shape, gen=gen)
    noise = _crandn(1, *op0.image_shape, gen=gen)
    # Measurement noise sigma^2 / 2 per channel already covers part of the step's 1 - abar.
    op = MeasurementOperator(op0.y, op0.mask, sigma=0.4)
    ab = 0.8
    out = fft2c(replace(x, op, ab, noise=noise))[0]
    m = op.mask[0, 0]
    top_up = 1 - ab - ab * 0.4**2 / 2
    want = (1 - m) * fft2c(x)[0] + m * (np.sqrt(ab) * op.y[0, 0] + np.sqrt(top_up) * fft2c(noise)[0])
    assert torch.allclose(out, want, atol=1e-5)
    # Late in the chain the data are noisier than the sample: a weighted step, no added noise.
    ab, zeta = 0.99, 0.5
    lam = (ab * 0.4**2 / 2 - (1 - ab)) / (zeta**2 * (1 - ab))
    out = fft2c(replace(x, op, ab, prior_scale=zeta, noise=noise))[0]
    k = fft2c(x)[0]
    want = k + m * (np.sqrt(ab) * op.y[0, 0] - k) / (1 + lam)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.equal(replace(x, op, 1.0), x)  # the clean end: left to the final DC


def test_hooks_project_and_replace():
    op, x_true, gen = _problem(False)
    acp = np.array([0.95, 0.9, 0.5])
    acp_prev = np.array([1.0, 0.95, 0.9])
    x0 = 0.1 * complex_to_channels(_crandn(2, *op.image_shape, gen=gen))
    t = torch.tensor([1, 1])
    dc = DiffusionDataConsistency(op, "project", acp, acp_prev, clip="none")
    assert op.residual(channels_to_complex(dc.denoised_fn(x0, t))).max() < 1e-4  # noiseless: exact
    assert torch.equal(dc.step_fn(x0, 1), x0)
    dc = DiffusionDataConsistency(op, "replace", acp, acp_prev, clip="none")
    assert torch.equal(dc.denoised_fn(x0, t), x0)
    assert op.residual(channels_to_complex(dc.step_fn(x0, 0))).max() < 1e-5  # t=0: noise-free
    assert op.residual(channels_to_complex(dc.step_fn(x0, 2))).min() > 1e-2  # ᾱ=0.9: noisy
    with pytest.raises(ValueError, match="data consistency mode"):
        DiffusionDataConsistency(op, "bogus", acp, acp_prev)


def test_operator_rejects_bad_shapes():
    k = torch.zeros(4, 8, 6, dtype=torch.complex64)
    with pytest.raises(ValueError, match="mask"):
        MeasurementOperator(k, torch.ones(5))
    with pytest.raises(ValueError, match="sensitivity maps"):
        MeasurementOperator(k, torch.ones(6), torch.ones(3, 8, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="needs sensitivity maps"):
        MeasurementOperator(k, torch.ones(6))
