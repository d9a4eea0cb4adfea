"""fastMRI-shaped files end to end: readout-oversampled k-space, ismrmrd_header, targets of another size.

Tiny versions of fastMRI's variety (sizes divided by 20): knee 640x368 with a 320x320 reconSpace, brain
640x320 and 768x396, a file narrower than its target (fastMRI crops to (W, W)), 16 and 20 coils, and a
noise-only edge slice. The model must see the same pixel grid in training and reconstruction, outputs
must have fastMRI's crop, and fastMRI's own evaluate must agree with the project's metrics.
"""

import argparse
import os
import pathlib

import h5py
import numpy as np
import pytest
import torch
from test_recon_scripts import baseline_recon, image_sample, write_checkpoint

from improved_diffusion.fastmri_data import FastMRISliceDataset, check_file
from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.recon_inputs import MaskSpec, open_volume
from improved_diffusion.reconstruction import ReconOptions, reconstruct_slice
from improved_diffusion.script_util import create_model_and_diffusion, load_config
from improved_diffusion.transforms import scale_from_kspace

HEADER = (
    '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>{}</x><y>{}</y><z>1</z></matrixSize></encodedSpace>"
    "<reconSpace><matrixSize><x>{}</x><y>{}</y><z>1</z></matrixSize></reconSpace>"
    "</encoding></ismrmrdHeader>"
)
# name: (k-space (rows, cols), header reconSpace, target, coils); fastMRI's sizes / 20.
VARIETY = {
    "knee_640x368.h5": ((32, 18), (16, 16), (16, 16), 15),
    "brain_640x320.h5": ((32, 16), (16, 16), (16, 16), 16),
    "brain_768x396.h5": ((38, 20), (19, 19), (16, 16), 20),
    "narrow.h5": ((32, 14), (16, 16), (16, 16), 16),
}
MASK_ARGS = ["--mask_type", "equispaced", "--accelerations", "2", "--center_fractions", "0.3"]


def _coil_maps(coils, rows, cols):
    yy, xx = np.meshgrid(np.arange(rows) - rows / 2, np.arange(cols) - cols / 2, indexing="ij")
    angles = 2 * np.pi * np.arange(coils) / coils
    maps = np.stack(
        [
            np.exp(
                -((yy - 0.3 * rows * np.sin(a)) ** 2 + (xx - 0.5 * cols * np.cos(a)) ** 2) / (0.4 * rows) ** 2
            )
            * np.exp(1j * (0.3 * c + 0.05 * xx))
            for c, a in enumerate(angles)
        ]
    )
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64)


def write_fastmri_like(path, shape, recon, target, coils, slices=2, noise=1e-3, seed=0):
    """A multi-coil file shaped like fastMRI's: the object fits in the central ``recon[0]`` rows of a
    readout-oversampled grid; slice 0 is a noise-only edge slice; ``sens_maps`` are the true maps;
    ``reconstruction_rss`` is the RSS of the noisy coil images, center-cropped (zero-padded where the
    image is narrower than the target)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.meshgrid(np.arange(rows) - rows / 2, np.arange(cols) - cols / 2, indexing="ij")
    obj = ((yy / (0.45 * recon[0])) ** 2 + (xx / (0.45 * cols)) ** 2 < 1) * (1 + 0.4 * np.cos(xx / 2))
    maps = _coil_maps(coils, rows, cols)
    kspace, rss = [], []
    for s in range(slices):
        img = (0.0 if s == 0 else 1.0) * obj * np.exp(0.5j * yy / rows)
        k = fft2c(torch.from_numpy((maps * img).astype(np.complex64))).numpy()
        k = k + noise / np.sqrt(2) * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        kspace.append(k.astype(np.complex64))
        full = np.sqrt((np.abs(ifft2c(torch.from_numpy(kspace[-1])).numpy()) ** 2).sum(0))
        out = np.zeros(target, np.float32)
        th, tw = target[0], min(target[1], cols)
        top, left, pad = (rows - th) // 2, (cols - tw) // 2, (target[1] - tw) // 2
        out[:, pad : pad + tw] = full[top : top + th, left : left + tw]
        rss.append(out)
    with h5py.File(path, "w") as f:
        f["kspace"] = np.stack(kspace)
        f["sens_maps"] = np.broadcast_to(maps, (slices,) + maps.shape).copy()
        f["reconstruction_rss"] = np.stack(rss)
        f["ismrmrd_header"] = HEADER.format(rows, cols, *recon)


@pytest.fixture(scope="module")
def variety(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_size")
    data = root / "data"
    data.mkdir()
    for i, (name, (shape, recon, target, coils)) in enumerate(VARIETY.items()):
        write_fastmri_like(str(data / name), shape, recon, target, coils, seed=i)
    return {"root": root, "data": data, "ckpt": write_checkpoint(root / "ckpt")}


class ShapeRecorder(torch.nn.Module):
    """The model, recording the input shapes it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.shapes = []

    def forward(self, x, t, **kwargs):
        self.shapes.append(tuple(x.shape))
        return self.model(x, t, **kwargs)


def test_training_and_reconstruction_see_the_same_pixels_and_scale(variety):
    path = str(variety["data"] / "knee_640x368.h5")
    (rows, cols), recon, _, _ = VARIETY["knee_640x368.h5"]
    info = check_file(path, crop_size=(recon[0], cols))
    # Training crop (rows, W): exactly the reconstruction grid; (rows, rows): its central columns.
    x_full, kw = FastMRISliceDataset([info], crop_size=(recon[0], cols))[1]
    x_square, kw_square = FastMRISliceDataset([info], crop_size=recon)[1]
    assert x_full.shape == (2, recon[0], cols) and x_square.shape == (2,) + recon
    left = (cols - recon[1]) // 2
    assert torch.equal(x_square, x_full[:, :, left : left + recon[1]])
    assert kw["scale"] == kw_square["scale"]

    with h5py.File(path, "r") as f:
        kspace = torch.from_numpy(f["kspace"][1])
        maps = f["sens_maps"][1]
    volume = open_volume(path, MaskSpec())
    assert volume.recon_rows == recon[0] and volume.target_shape == recon
    cfg = load_config(variety["ckpt"])
    model, diffusion = create_model_and_diffusion(**{**cfg, "timestep_respacing": "4"})
    model.load_state_dict(torch.load(variety["ckpt"], map_location="cpu"))
    recorder = ShapeRecorder(model.eval())
    options = ReconOptions(t0="0.5", num_samples=2, num_virtual_coils=-1)
    # Fully sampled and noiseless (σ = 0): the zero-filled image is the training image.
    r = reconstruct_slice(
        kspace, torch.ones(cols), recorder, diffusion, maps=maps, options=options, noise_std=0.0,
        recon_rows=volume.recon_rows,
    )  # fmt: skip
    assert set(recorder.shapes) == {(2, 2, recon[0], cols)}
    assert r.mean.shape == (recon[0], cols)
    assert r.scale == pytest.approx(float(kw["scale"]), rel=1e-5)
    image = torch.complex(x_full[0], x_full[1]) * kw["scale"]
    assert torch.allclose(r.mean, image, atol=1e-4 * float(image.abs().max()))
    # the scale is twice the image peak, and the object lies inside the FOV: the full grid gives the same
    assert scale_from_kspace(kspace) == pytest.approx(r.scale, rel=1e-3)


def _run_sample(variety, out, *extra):
    args = [
        "--model_path", variety["ckpt"], "--input", str(variety["data"]), "--output_dir", str(out),
        *MASK_ARGS, "--timestep_respacing", "4", "--t0", "0.5", "--num_samples", "2",
        "--progress", "False", "--png", "False", "--cg_iters", "20", *extra,
    ]  # fmt: skip
    assert image_sample.main(args) == 0


@pytest.fixture(scope="module")
def sampled(variety):
    out = variety["root"] / "diffusion"
    _run_sample(variety, out)
    return out


def test_variety_outputs_have_fastmri_crops(variety, sampled):
    for name, (shape, recon, target, _) in VARIETY.items():
        crop = (shape[1], shape[1]) if shape[1] < target[1] else target  # fastMRI's FLAIR 203 rule
        with h5py.File(sampled / name, "r") as f:
            assert f["reconstruction"].shape == (2,) + crop, name
            assert f["reconstruction_complex"].shape == (2, recon[0], shape[1]), name
            assert np.isfinite(f["reconstruction"][()]).all()
            assert int(f.attrs["fov_rows"]) == 0
        rows = [r for r in _csv(sampled / "metrics" / name.replace(".h5", ".csv")) if r["slice"] != "volume"]
        assert len(rows) == 2 and all(np.isfinite(float(r["ssim"])) for r in rows), name


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_baselines_get_the_same_crop(variety, sampled, tmp_path):
    out = tmp_path / "zf"
    args = ["--method", "zero_filled", "--input", str(variety["data"]), "--output_dir", str(out), *MASK_ARGS]
    assert baseline_recon.main(args + ["--png", "False", "--progress", "False"]) == 0
    for name in VARIETY:
        with h5py.File(out / name, "r") as f, h5py.File(sampled / name, "r") as g:
            assert f["reconstruction"].shape == g["reconstruction"].shape
            assert f["reconstruction_complex"].shape == g["reconstruction_complex"].shape


def test_fastmri_evaluate_agrees_with_the_project_metrics(variety, sampled, tmp_path):
    fastmri_evaluate = pytest.importorskip("fastmri.evaluate")
    square = [n for n, (shape, _, target, _) in VARIETY.items() if shape[1] >= target[1]]
    targets = tmp_path / "targets"
    targets.mkdir()
    rows = {r["file"]: r for r in _csv(sampled / "metrics.csv")}
    for name in square:
        os.symlink(variety["data"] / name, targets / name)
        # fastMRI's evaluate reads the target and our output and crops both itself.
        args = argparse.Namespace(
            target_path=pathlib.Path(targets), predictions_path=pathlib.Path(sampled), acquisition=None,
            acceleration=None,
        )  # fmt: skip
        means = fastmri_evaluate.evaluate(args, "reconstruction_rss").means()
        os.remove(targets / name)
        assert means["PSNR"] == pytest.approx(float(rows[name]["psnr"]), abs=1e-4), name
        assert means["SSIM"] == pytest.approx(float(rows[name]["ssim"]), abs=1e-4), name
        assert means["NMSE"] == pytest.approx(float(rows[name]["nmse"]), rel=1e-4, abs=1e-6), name


def test_readout_crop_is_refused_for_masks_that_undersample_the_readout(variety, tmp_path, capsys):
    args = [
        "--model_path", variety["ckpt"], "--input", str(variety["data"] / "knee_640x368.h5"),
        "--output_dir", str(tmp_path / "out"), "--mask_type", "poisson", "--accelerations", "2",
        "--center_fractions", "0.3", "--timestep_respacing", "4", "--progress", "False",
    ]  # fmt: skip
    assert image_sample.main(args) == 2
    assert "undersamples the readout" in capsys.readouterr().err
    assert not (tmp_path / "out" / "knee_640x368.h5").exists()
