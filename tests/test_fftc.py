"""Centered orthonormal FFTs: numpy agreement on odd/even sizes, round trips, channels, center_crop."""

import numpy as np
import pytest
import torch

from improved_diffusion.mri.fftc import center_crop, channels_to_complex, complex_to_channels, fft2c, ifft2c

SIZES = [(8, 8), (7, 9), (9, 6), (1, 5), (16, 15)]


def _np_fft2c(x: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _np_ifft2c(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _rand(shape, dtype=np.complex128, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("size", SIZES)
def test_matches_numpy_centered_fft(size):
    x = _rand((2, 3) + size)  # batched: leading dims are untouched
    assert np.allclose(fft2c(torch.from_numpy(x)).numpy(), _np_fft2c(x), atol=1e-12)
    assert np.allclose(ifft2c(torch.from_numpy(x)).numpy(), _np_ifft2c(x), atol=1e-12)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_round_trip_and_orthonormal(size, dtype):
    x = torch.from_numpy(_rand((3,) + size, seed=1)).to(dtype)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    k = fft2c(x)
    assert k.dtype == dtype and k.shape == x.shape
    assert torch.allclose(ifft2c(k), x, atol=tol) and torch.allclose(fft2c(ifft2c(x)), x, atol=tol)
    # Parseval: orthonormal scaling keeps the energy
    assert torch.allclose(k.abs().pow(2).sum(), x.abs().pow(2).sum(), rtol=tol)


def test_dc_at_centre_index():
    for h, w in SIZES:
        x = torch.ones(h, w, dtype=torch.complex128)
        k = fft2c(x)
        assert k[h // 2, w // 2].real == pytest.approx(np.sqrt(h * w))
        assert torch.count_nonzero(k.abs() > 1e-9) == 1


def test_channels_round_trip():
    x = torch.from_numpy(_rand((2, 5, 6), np.complex64))
    ch = complex_to_channels(x)
    assert ch.shape == (2, 2, 5, 6) and ch.dtype == torch.float32
    assert torch.equal(ch[:, 0], x.real) and torch.equal(ch[:, 1], x.imag)
    assert torch.equal(channels_to_complex(ch), x)
    with pytest.raises(ValueError):
        channels_to_complex(torch.zeros(2, 3, 5, 6))


def test_center_crop_matches_fastmri():
    transforms = pytest.importorskip("fastmri.data.transforms")
    for size in [(10, 11), (11, 10), (9, 9)]:
        x = torch.arange(2 * size[0] * size[1], dtype=torch.float32).reshape(2, *size)
        for crop in [(4, 5), (5, 4), (9, 9), (1, 1)]:
            assert torch.equal(center_crop(x, crop), transforms.center_crop(x, crop))
    with pytest.raises(ValueError):
        center_crop(torch.zeros(4, 4), (5, 2))


@pytest.mark.parametrize("n", [1, 6, 7, 16])
@pytest.mark.parametrize("dim", [-2, -1, 0])
def test_one_dimensional_centered_fft_matches_numpy(n, dim):
    from improved_diffusion.mri.fftc import fftc, ifftc

    shape = [3, 5, 4]
    shape[dim] = n
    x = _rand(tuple(shape), seed=2)
    want = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=dim), axis=dim, norm="ortho"), axes=dim)
    assert np.allclose(fftc(torch.from_numpy(x), dim=dim).numpy(), want, atol=1e-12)
    inv = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=dim), axis=dim, norm="ortho"), axes=dim)
    assert np.allclose(ifftc(torch.from_numpy(x), dim=dim).numpy(), inv, atol=1e-12)
