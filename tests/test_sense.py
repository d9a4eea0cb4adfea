"""SENSE operators: adjoint dot tests, normal operator, coil combination, map normalization."""

import pytest
import torch

from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.mri.sense import (
    coil_combine,
    normalize_maps,
    rss,
    sense_adjoint,
    sense_forward,
    sense_normal,
    sensitivity_support,
    single_coil_maps,
)
from improved_diffusion.mri.subsample import EquispacedMaskFractionFunc, PoissonMaskFunc, RandomMaskFunc

TOL = {torch.complex128: 1e-10, torch.complex64: 1e-5}


def _randn(shape, dtype, gen):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def _inner(a, b):
    return (a.conj() * b).sum()


def _masks(height, width):
    return [
        None,
        RandomMaskFunc([0.1], [4])((height, width), seed=0)[0],
        EquispacedMaskFractionFunc([0.1], [3])((height, width), seed=1)[0],
        PoissonMaskFunc([0.1], [3])((height, width), seed=2)[0],
        torch.rand(height, width, generator=torch.Generator().manual_seed(5)),  # non-binary weights
    ]


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("coils", [1, 4])
@pytest.mark.parametrize("size", [(16, 16), (15, 22)])
def test_adjoint_dot_test(dtype, coils, size):
    gen = torch.Generator().manual_seed(0)
    batch, (height, width) = 2, size
    maps = single_coil_maps((batch, height, width), dtype) if coils == 1 else None
    if maps is None:
        maps = normalize_maps(_randn((batch, coils, height, width), dtype, gen))
    for mask in _masks(height, width):
        x = _randn((batch, height, width), dtype, gen)
        y = _randn((batch, coils, height, width), dtype, gen)
        lhs = _inner(sense_forward(x, maps, mask), y)
        rhs = _inner(x, sense_adjoint(y, maps, mask))
        assert abs(lhs - rhs) / abs(lhs) < TOL[dtype]
        # normal operator: A^H A x, Hermitian and positive semidefinite
        n = sense_normal(x, maps, mask)
        assert n.dtype == dtype and n.shape == x.shape
        assert torch.allclose(n, sense_adjoint(sense_forward(x, maps, mask), maps, mask))
        x2 = _randn((batch, height, width), dtype, gen)
        a, b = _inner(x2, n), _inner(sense_normal(x2, maps, mask), x)
        assert abs(a - b) / abs(a) < TOL[dtype] * 10
        assert _inner(x, n).real > 0


def test_fully_sampled_normalized_maps_are_isometric():
    gen = torch.Generator().manual_seed(1)
    maps = normalize_maps(_randn((1, 3, 12, 12), torch.complex128, gen))
    assert torch.allclose(rss(maps), torch.ones(1, 12, 12, dtype=torch.float64))
    x = _randn((1, 12, 12), torch.complex128, gen)
    assert torch.allclose(sense_normal(x, maps), x)
    k = sense_forward(x, maps)
    assert torch.allclose(coil_combine(ifft2c(k), maps), x)
    assert torch.allclose(k, fft2c(maps * x.unsqueeze(-3)))


def test_single_coil_is_plain_fft():
    gen = torch.Generator().manual_seed(2)
    x = _randn((3, 10, 9), torch.complex64, gen)
    maps = single_coil_maps(x.shape)
    assert maps.shape == (3, 1, 10, 9) and maps.dtype == torch.complex64
    mask = RandomMaskFunc([0.2], [2])((10, 9), seed=0)[0]
    y = sense_forward(x, maps, mask)
    assert torch.allclose(y[:, 0], fft2c(x) * mask)
    assert torch.allclose(sense_adjoint(y, maps, mask), ifft2c(y[:, 0] * mask))
    # maps without a batch dim broadcast over the batch
    assert torch.allclose(sense_forward(x, single_coil_maps((10, 9)), mask), y)


def test_normalize_maps_support_and_no_nan():
    maps = torch.zeros(2, 2, 6, 6, dtype=torch.complex64)
    maps[0, :, 1:5, 1:5] = torch.tensor([3.0 + 4.0j, 0.0]).view(2, 1, 1)
    out = normalize_maps(maps)
    assert torch.isfinite(out.real).all() and torch.isfinite(out.imag).all()
    assert torch.allclose(out[0, 0, 1:5, 1:5], torch.full((4, 4), 0.6 + 0.8j))
    assert (out[0, :, 0] == 0).all() and (out[1] == 0).all()
    assert sensitivity_support(maps)[0].sum() == 16 and not sensitivity_support(maps)[1].any()
    # scale invariance of the relative threshold
    assert torch.allclose(normalize_maps(maps * 1e-7), out)


def test_rss_and_dtypes_kept():
    coil = torch.tensor([[[3.0 + 0j]], [[0.0 + 4.0j]]], dtype=torch.complex128)
    assert rss(coil).item() == pytest.approx(5.0)
    x = torch.ones(1, 4, 4, dtype=torch.complex128)
    mask = torch.ones(4, 4, dtype=torch.float32)
    assert sense_forward(x, single_coil_maps((1, 4, 4), torch.complex128), mask).dtype == torch.complex128


def test_bad_inputs():
    x = torch.ones(1, 8, 8, dtype=torch.complex64)
    maps = single_coil_maps((1, 8, 8))
    with pytest.raises(ValueError, match="complex"):
        sense_forward(x.real, maps)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        sense_forward(torch.ones(1, 8, 7, dtype=torch.complex64), maps)
    with pytest.raises(ValueError, match="broadcast"):
        sense_forward(x, maps, torch.ones(1, 9))
    with pytest.raises(ValueError, match="coils"):
        sense_adjoint(torch.ones(1, 2, 8, 8, dtype=torch.complex64), maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    x = _randn((2, 16, 16), torch.complex64, gen)
    maps = normalize_maps(_randn((2, 4, 16, 16), torch.complex64, gen))
    mask = RandomMaskFunc([0.1], [4])((16, 16), seed=0)[0]
    cpu = sense_normal(x, maps, mask)
    gpu = sense_normal(x.cuda(), maps.cuda(), mask)  # mask on CPU is moved to the data's device
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


@pytest.mark.parametrize("w", [8, 9])
@pytest.mark.parametrize("kind", ["columns", "columns_2d", "rows_2d", "random_2d", "none"])
def test_sense_normal_operator_equals_sense_normal(w, kind):
    from improved_diffusion.mri.sense import SenseNormal

    g = torch.Generator().manual_seed(w)
    h, c = 10, 3

    def cplx(*shape):
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(
            torch.complex128
        )

    cols = (torch.rand(w, generator=g) < 0.5).double()
    masks = {
        "columns": cols,
        "columns_2d": cols.expand(h, w).clone(),
        "rows_2d": (torch.rand(h, 1, generator=g) < 0.5).double().expand(h, w).clone(),
        "random_2d": (torch.rand(h, w, generator=g) < 0.5).double(),
        "none": None,
    }
    maps, x = cplx(2, c, h, w), cplx(2, h, w)
    op = SenseNormal(maps, masks[kind])
    assert op.columns == kind.startswith("columns")
    assert torch.allclose(op(x), sense_normal(x, maps, masks[kind]), atol=1e-12)
