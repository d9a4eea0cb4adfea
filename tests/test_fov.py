"""mri/fov.py: the readout crop is the image crop, header parsing, fastMRI's output crop, FOV resolution."""

import numpy as np
import pytest
import torch

from improved_diffusion.mri.fftc import center_crop, fft2c, ifft2c
from improved_diffusion.mri.fov import (
    crop_rows,
    output_crop,
    readout_complete,
    readout_crop,
    recon_matrix,
    resolve_fov_rows,
)


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(
        torch.complex128
    )


@pytest.mark.parametrize("h, rows", [(16, 8), (15, 8), (16, 7), (13, 5), (12, 12)])
def test_readout_crop_is_the_image_crop(h, rows):
    k = _rand((3, h, 9))
    out = readout_crop(k, rows)
    assert out.shape == (3, rows, 9)
    assert torch.allclose(ifft2c(out), center_crop(ifft2c(k), (rows, 9)), atol=1e-12)


def test_readout_crop_keeps_white_noise_white_with_the_same_std():
    noise = _rand((64, 40, 12), seed=1) / np.sqrt(2)  # complex std 1
    out = readout_crop(noise, 20)
    assert abs(float(out.abs().pow(2).mean()) - 1.0) < 0.05
    # the columns stay independent of each other: a column mask stays exact
    mask = torch.zeros(12)
    mask[::2] = 1
    assert torch.equal(readout_crop(noise * mask, 20) == 0, (torch.zeros(64, 20, 12) + mask) == 0)


def test_readout_crop_rejects_bad_rows():
    with pytest.raises(ValueError, match="cannot crop"):
        readout_crop(_rand((8, 4)), 9)


def test_crop_rows_of_maps():
    maps = _rand((2, 10, 6))
    assert torch.equal(crop_rows(maps, 4), maps[:, 3:7])


HEADER = (
    '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize></encodedSpace>"
    "<reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize></reconSpace>"
    "</encoding></ismrmrdHeader>"
)


def test_recon_matrix_from_the_ismrmrd_header():
    assert recon_matrix(HEADER) == (320, 320)
    assert recon_matrix(HEADER.encode()) == (320, 320)
    assert recon_matrix(np.array(HEADER.encode())) == (320, 320)  # h5py's scalar dataset
    plain = HEADER.replace(' xmlns="http://www.ismrm.org/ISMRMRD"', "")
    assert recon_matrix(plain) == (320, 320)
    assert recon_matrix("<ismrmrdHeader><encoding/></ismrmrdHeader>") is None
    with pytest.raises(ValueError, match="not valid XML"):
        recon_matrix("<ismrmrdHeader>")
    with pytest.raises(ValueError, match="positive integer"):
        recon_matrix(HEADER.replace("<x>320</x>", "<x>-3</x>"))


def test_resolve_fov_rows():
    assert resolve_fov_rows(0, 320, 640) == 320  # the file's FOV
    assert resolve_fov_rows(0, None, 640) is None  # the file tells none
    assert resolve_fov_rows(-1, 320, 640) is None  # never crop
    assert resolve_fov_rows(200, 320, 640) == 200
    assert resolve_fov_rows(0, 640, 640) is None  # nothing to crop
    with pytest.raises(ValueError, match="more than"):
        resolve_fov_rows(0, 700, 640)
    with pytest.raises(ValueError, match="fov_rows"):
        resolve_fov_rows(-2, 320, 640)


def test_output_crop_follows_fastmri():
    assert output_crop((320, 320), (320, 368)) == (320, 320)
    assert output_crop((320, 320), (320, 260)) == (260, 260)  # fastMRI's FLAIR 203 rule
    with pytest.raises(ValueError, match="taller"):
        output_crop((320, 320), (300, 368))


def test_readout_complete():
    cols = np.array([1, 0, 1, 1], np.float32)
    assert readout_complete(cols, (5, 4))
    assert readout_complete(np.broadcast_to(cols, (5, 4)), (5, 4))
    poisson = np.ones((5, 4), np.float32)
    poisson[2, 1] = 0
    assert not readout_complete(poisson, (5, 4))


def test_crop_then_fft_round_trip_on_odd_and_even_grids():
    for h, w in [(10, 7), (9, 8)]:
        img = _rand((h, w), seed=3)
        img[: h // 4] = 0
        img[h - h // 4 :] = 0
        rows = h - 2 * (h // 4)
        k = readout_crop(fft2c(img), rows)
        assert torch.allclose(fft2c(center_crop(img, (rows, w))), k, atol=1e-12)
