"""Metrics: known pairs and equality with fastmri.evaluate (skimage SSIM) on the same arrays."""

import numpy as np
import pytest
import torch

from improved_diffusion.mri.metrics import mse, nmse, psnr, ssim, volume_metrics

fastmri_evaluate = pytest.importorskip("fastmri.evaluate")


def _pair(rng, dtype, shape=(3, 32, 29)):
    scale = 10 ** rng.uniform(-5, 2)  # fastMRI magnitudes are ~1e-4; demo data ~1
    gt = np.abs(rng.standard_normal(shape)).cumsum(-1) * scale
    pred = np.abs(gt + scale * rng.uniform(0.01, 3) * rng.standard_normal(shape))
    return gt.astype(dtype), pred.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_equal_to_fastmri_evaluate(dtype):
    rng = np.random.default_rng(0)
    for _ in range(10):
        gt, pred = _pair(rng, dtype)
        assert nmse(gt, pred) == pytest.approx(float(fastmri_evaluate.nmse(gt, pred)), rel=1e-6, abs=1e-6)
        assert psnr(gt, pred) == pytest.approx(float(fastmri_evaluate.psnr(gt, pred)), abs=1e-6)
        assert ssim(gt, pred) == pytest.approx(fastmri_evaluate.ssim(gt, pred).item(), abs=1e-6)
        assert mse(gt, pred) == pytest.approx(float(fastmri_evaluate.mse(gt, pred)), rel=1e-6)
        maxval = float(gt.max()) * 1.3
        assert psnr(gt, pred, maxval) == pytest.approx(
            float(fastmri_evaluate.psnr(gt, pred, maxval)), abs=1e-6
        )
        assert ssim(gt, pred, maxval) == pytest.approx(
            fastmri_evaluate.ssim(gt, pred, maxval).item(), abs=1e-6
        )
    # odd sizes and the smallest allowed slice
    for shape in [(1, 7, 7), (2, 9, 16)]:
        gt, pred = _pair(rng, dtype, shape)
        assert ssim(gt, pred) == pytest.approx(fastmri_evaluate.ssim(gt, pred).item(), abs=1e-6)


def test_known_pairs():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0, 2, size=(2, 16, 16))
    gt[0, 0, 0] = 4.0  # volume max
    assert nmse(gt, gt) == 0.0
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert psnr(gt, gt) == float("inf")
    pred = gt + 0.1  # MSE exactly 0.01 -> PSNR = 10 log10(16 / 0.01)
    assert mse(gt, pred) == pytest.approx(0.01)
    assert psnr(gt, pred) == pytest.approx(10 * np.log10(16 / 0.01))
    assert nmse(gt, 2 * gt) == pytest.approx(1.0)
    assert nmse(gt, np.zeros_like(gt)) == pytest.approx(1.0)
    assert ssim(gt, np.zeros_like(gt)) < 0.1
    out = volume_metrics(gt, pred)
    assert set(out) == {"nmse", "psnr", "ssim"} and all(isinstance(v, float) for v in out.values())
    # a single slice is a one-slice volume; torch tensors are accepted
    assert ssim(gt[0], pred[0]) == pytest.approx(ssim(gt[:1], pred[:1]))
    assert psnr(torch.from_numpy(gt), torch.from_numpy(pred)) == pytest.approx(psnr(gt, pred))


def test_ssim_uses_volume_max_not_slice_max():
    rng = np.random.default_rng(2)
    gt = rng.uniform(0, 1, size=(2, 16, 16))
    gt[1] *= 10
    pred = gt + 0.05 * rng.standard_normal(gt.shape)
    per_slice_max = np.mean([ssim(g[None], p[None]) for g, p in zip(gt, pred)])
    assert ssim(gt, pred) != pytest.approx(per_slice_max)
    assert ssim(gt, pred) == pytest.approx(
        np.mean([ssim(g[None], p[None], gt.max()) for g, p in zip(gt, pred)])
    )


def test_bad_inputs():
    a = np.ones((2, 16, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        nmse(a, np.ones((2, 16, 15)))
    with pytest.raises(ValueError, match="complex"):
        psnr(a, a.astype(np.complex64))
    with pytest.raises(ValueError, match="7x7"):
        ssim(np.ones((1, 6, 6)), np.ones((1, 6, 6)))
    with pytest.raises(ValueError, match="maxval"):
        psnr(np.zeros((1, 8, 8)), np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="volume"):
        ssim(np.ones((1, 1, 8, 8)), np.ones((1, 1, 8, 8)))
