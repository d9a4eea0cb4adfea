"""Tests for ESPIRiT sensitivity maps: phantom accuracy, small calibration regions, the real 8-coil scan."""

import os
import warnings

import h5py
import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from improved_diffusion.mri.espirit import (
    CalibrationWarning,
    calibration_region,
    estimate_sens_maps,
    estimate_sens_maps_volume,
)
from improved_diffusion.mri.fftc import fft2c, ifft2c

N, COILS = 48, 6
REAL_SCAN = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "real_brain_8coil_poisson.h5"
)


@pytest.fixture(scope="module")
def phantom():
    """Shepp-Logan with a smooth phase, birdcage coils, k-space with a little noise."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    x = sigpy.shepp_logan((N, N)).astype(np.complex64) * np.exp(1j * (0.7 + xx - 0.5 * yy * yy))
    maps = sigpy.mri.birdcage_maps((COILS, N, N), r=1.5).astype(np.complex64)
    rng = np.random.default_rng(0)
    k = fft2c(torch.from_numpy(maps * x)).numpy()
    k = k + 1e-3 * np.abs(k).max() * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    return x.astype(np.complex64), maps, k.astype(np.complex64)


def _combine(maps, k):
    return (np.conj(maps) * ifft2c(torch.from_numpy(k)).numpy()).sum(0)


def _error_up_to_phase(est, ref):
    """Relative error after the best global phase."""
    phase = np.vdot(est, ref) / abs(np.vdot(est, ref))
    return np.linalg.norm(est * phase - ref) / np.linalg.norm(ref)


def _check_maps(maps, shape):
    assert maps.shape == shape and maps.dtype == np.complex64 and np.isfinite(maps).all()
    sumsq = (np.abs(maps) ** 2).sum(0)
    support = sumsq > 0
    np.testing.assert_allclose(sumsq[support], 1.0, rtol=1e-4)
    return support


def test_espirit_combined_image_matches_truth(phantom):
    x, true_maps, k = phantom
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fully sampled centre must not need the fallback
        maps = estimate_sens_maps(k)
    support = _check_maps(maps, k.shape)
    obj = np.abs(x) > 0
    assert support[obj].mean() > 0.99  # the whole object is inside the support
    # ESPIRiT maps carry coil 0's phase, so the combined image is ||S|| x exp(i angle S_0): remove that
    # phase and compare with the true coil-weighted image up to one global phase.
    norm = np.sqrt((np.abs(true_maps) ** 2).sum(0))
    combined = _combine(maps, k) * np.exp(-1j * np.angle(true_maps[0]))
    err = _error_up_to_phase(combined * obj, norm * x)
    mag_err = np.linalg.norm((np.abs(combined) - norm * np.abs(x)) * obj) / np.linalg.norm(norm * x)
    print(f"ESPIRiT combined-image relative error {err:.4f} (magnitude {mag_err:.4f})")
    assert err < 0.05 and mag_err < 0.05


def test_small_calibration_reduces_kernel(phantom):
    _, _, k = phantom
    mask = np.zeros((N, N), np.float32)
    mask[N // 2 - 5 : N // 2 + 5, N // 2 - 5 : N // 2 + 5] = 1  # a 10x10 calibration square
    mask[::3, ::2] = 1
    with pytest.warns(CalibrationWarning, match="using kernel 5x5"):
        maps = estimate_sens_maps(k * mask, mask=mask)
    _check_maps(maps, k.shape)


@pytest.mark.parametrize("num_cols", [5, 3, 2])
def test_few_centre_lines_use_the_whole_rectangle_or_fall_back_without_nans(phantom, num_cols):
    """5 or 3 centre columns: ESPIRiT on all rows x those columns (kernel 6x3); 2: the low-res fallback."""
    x, true_maps, k = phantom
    mask = np.zeros(N, np.float32)
    mask[N // 2 - num_cols // 2 : N // 2 - num_cols // 2 + num_cols] = 1
    mask[::4] = 1  # outer lines, as an equispaced mask
    mask_t = torch.from_numpy(mask)[None, None, :]  # PHYSICS' (1, 1, W) layout, as a torch tensor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = estimate_sens_maps(torch.from_numpy(k) * mask_t, mask=mask_t)
    fell_back = any("too small for ESPIRiT" in str(w.message) for w in caught)
    assert fell_back == (num_cols < 3)
    support = _check_maps(maps, k.shape)
    assert support[np.abs(x) > 0].mean() > 0.99
    norm = np.sqrt((np.abs(true_maps) ** 2).sum(0))
    err = _error_up_to_phase(np.abs(_combine(maps, k)), norm * np.abs(x))
    print(f"fallback ({num_cols} centre lines) combined-magnitude relative error {err:.4f}")
    assert err < 0.25


def test_calibration_region_and_errors():
    sampled = np.zeros((9, 12), bool)
    sampled[2:8, 5:8] = True  # rows 2..7, cols 5..7 around the centre (4, 6)
    sampled[4, :] = True  # a full centre row that must not widen the rectangle
    assert calibration_region(sampled) == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="centre is not sampled"):
        estimate_sens_maps(np.ones((2, 8, 8), np.complex64), mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="complex"):
        estimate_sens_maps(np.ones((2, 8, 8), np.float32))
    with pytest.warns(CalibrationWarning, match="all zero"):
        assert not estimate_sens_maps(np.zeros((2, 8, 8), np.complex64)).any()


def test_volume_helper(phantom):
    _, _, k = phantom
    vol = estimate_sens_maps_volume(np.stack([k, k]), max_calib=12, kernel_width=4)
    assert vol.shape == (2, *k.shape)
    np.testing.assert_allclose(vol[0], vol[1])


@pytest.mark.skipif(not os.path.exists(REAL_SCAN), reason="real scan not present (../shared/data)")
def test_real_8coil_scan_maps_are_plausible():
    with h5py.File(REAL_SCAN, "r") as f:
        k, mask = f["kspace"][0], f["mask"][()]
    maps = estimate_sens_maps(k, mask=mask)
    support = _check_maps(maps, k.shape)
    rss = np.sqrt((np.abs(ifft2c(torch.from_numpy(k)).numpy()) ** 2).sum(0))
    head = rss > 0.2 * rss.max()
    print(
        f"real scan: support {support.mean():.2f} of the FOV, {support[head].mean():.3f} of the bright head"
    )
    assert 0.3 < support.mean() < 0.95 and support[head].mean() > 0.98
