"""Joint map refinement (mri/jsense.py): misfit on all data falls, maps approach the truth, normalized."""

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from improved_diffusion.mri import jsense
from improved_diffusion.mri.coils import prepare_slice
from improved_diffusion.mri.fftc import fft2c
from improved_diffusion.mri.sense import normalize_maps

N, COILS, ACS, R = 64, 8, 4, 4


@pytest.fixture(scope="module")
def phantom():
    """Shepp-Logan with a smooth phase, normalized birdcage maps on an elliptic support, noisy k-space
    on 4x equispaced columns with only 4 calibration columns, and maps with a smooth error per coil."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    x = sigpy.shepp_logan((N, N)).astype(np.complex64) * np.exp(1j * (0.5 + xx - 0.3 * yy * yy))
    support = (xx / 0.78) ** 2 + (yy / 0.98) ** 2 <= 1
    maps = sigpy.mri.birdcage_maps((COILS, N, N), r=1.5).astype(np.complex64) * support
    maps = normalize_maps(torch.from_numpy(maps)).numpy()
    k = fft2c(torch.from_numpy(maps * x)).numpy()
    sigma = 0.01 * float(np.abs(k).max()) / N
    k = k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / np.sqrt(2)
    cols = np.zeros(N, bool)
    cols[::R] = True
    cols[N // 2 - ACS // 2 : N // 2 - ACS // 2 + ACS] = True
    sampled = np.broadcast_to(cols, (N, N)).copy()
    # The maps' error: a smooth complex factor per coil (magnitude and phase tilts across the FOV).
    basis = np.stack([xx, yy, 1j * xx, 1j * yy])
    tilt = [0.3 * np.tensordot(rng.standard_normal(4), basis, axes=1) for _ in range(COILS)]
    wrong = normalize_maps(torch.from_numpy((maps * np.exp(np.stack(tilt))).astype(np.complex64))).numpy()
    return dict(
        x=x,
        maps=maps,
        kspace=(k * sampled).astype(np.complex64),
        sampled=sampled,
        sigma=sigma,
        wrong=wrong,
        cols=cols.astype(np.float32),
    )


def _subspace_error(maps, true, region):
    """RMS over ``region`` of ``1 - |<S, T>|^2 / (|S|^2 |T|^2)`` per pixel: 0 where the coil profiles
    agree up to a complex factor (the part of the maps that the image cannot absorb)."""
    inner = np.abs((maps.conj() * true).sum(0)) ** 2
    norms = (np.abs(maps) ** 2).sum(0) * (np.abs(true) ** 2).sum(0)
    err = 1 - inner / np.where(norms > 0, norms, 1)
    return float(np.sqrt(np.mean(np.where(norms > 0, err, 1)[region])))


def _image_error(image, x):
    """Relative error of the magnitude after the best real gain (maps fix the image only up to that)."""
    a, b = np.abs(image), np.abs(x)
    gain = (a * b).sum() / (a * a).sum()
    return float(np.linalg.norm(gain * a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def refined(phantom):
    p = phantom
    return (
        jsense.refine_maps(p["kspace"], p["sampled"], p["wrong"], p["sigma"], 0),
        jsense.refine_maps(p["kspace"], p["sampled"], p["wrong"], p["sigma"], 3),
    )


def test_refinement_lowers_the_all_data_misfit(refined):
    before, after = refined
    assert len(before.misfits) == 1 and before.best == 0
    assert after.misfits[0] == pytest.approx(before.misfits[0])
    assert len(after.misfits) > 1
    assert all(b < a for a, b in zip(after.misfits, after.misfits[1:]))
    assert after.misfits[after.best] < 0.2 * after.misfits[0]


def test_refined_maps_approach_the_true_maps_and_the_image_improves(phantom, refined):
    before, after = refined
    region = np.abs(phantom["x"]) > 0
    assert _subspace_error(after.maps, phantom["maps"], region) < 0.7 * _subspace_error(
        before.maps, phantom["maps"], region
    )
    assert _image_error(after.image, phantom["x"]) < 0.8 * _image_error(before.image, phantom["x"])


def test_refined_maps_stay_normalized_on_the_initial_support(phantom, refined):
    _, after = refined
    norm = (np.abs(after.maps) ** 2).sum(0)
    support = (np.abs(phantom["wrong"]) > 0).any(0)
    assert np.isfinite(after.maps).all()
    np.testing.assert_allclose(norm[support], 1.0, atol=1e-4)
    assert not after.maps[:, ~support].any()


def test_correct_maps_change_little(phantom):
    """At this low noise the image's small Tikhonov bias exceeds the noise (misfit about 5 with the true
    maps), so refinement runs; it keeps the true coil profiles."""
    p = phantom
    out = jsense.refine_maps(p["kspace"], p["sampled"], p["maps"], p["sigma"], 3)
    region = np.abs(p["x"]) > 0
    assert out.misfits[out.best] <= out.misfits[0]
    assert _subspace_error(out.maps, p["maps"], region) < 0.02


def test_prepare_slice_refines_stored_maps(phantom):
    p = phantom
    kw = dict(maps=p["wrong"], noise_std=p["sigma"], warn_misfit=False)
    plain = prepare_slice(p["kspace"], p["cols"], **kw)
    refined = prepare_slice(p["kspace"], p["cols"], refine_maps=2, **kw)
    assert refined.calib_misfit < 0.5 * plain.calib_misfit
    norm = (np.abs(refined.maps) ** 2).sum(0)
    np.testing.assert_allclose(norm[norm > 0], 1.0, atol=1e-4)


def test_bad_arguments(phantom):
    p = phantom
    with pytest.raises(ValueError, match="iters"):
        jsense.refine_maps(p["kspace"], p["sampled"], p["maps"], p["sigma"], -1)
    with pytest.raises(ValueError, match="block"):
        jsense.refine_maps(p["kspace"], p["sampled"], p["maps"], p["sigma"], 1, block=0)


def test_recon_options_reject_negative_refine_maps():
    from improved_diffusion.reconstruction import ReconOptions

    with pytest.raises(ValueError, match="refine_maps"):
        ReconOptions(refine_maps=-1).validate()
