"""BART (the ``bart`` command line) as an outside reference: cfl files, FFT and SENSE conventions, ESPIRiT
subspaces against ours, and the project's L1-wavelet baseline against ``bart pics -l1``.

Everything that runs ``bart`` is skipped when it is not installed (CI installs it with apt when it can).
"""

import os
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
from tiny import load_module

from improved_diffusion.mri import bart
from improved_diffusion.mri.espirit import estimate_sens_maps
from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.mri.metrics import psnr
from improved_diffusion.mri.sense import coil_combine, sense_forward
from improved_diffusion.mri.subsample import create_mask_for_mask_type
from improved_diffusion.transforms import scale_from_kspace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_bart = pytest.mark.skipif(
    not bart.bart_available(), reason="the 'bart' command (BART) is not installed: apt-get install bart"
)
N, COILS = 128, 8


def _script(name):
    return load_module(f"scripts/{name}.py")


def _cplx(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture(scope="module")
def phantom():
    """Shepp-Logan with a smooth phase and 8 birdcage coils (maps normalized), fully sampled k-space."""
    import sigpy
    import sigpy.mri

    yy, xx = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    x = sigpy.shepp_logan((N, N)).astype(np.complex64) * np.exp(1j * (0.7 + xx - 0.5 * yy * yy))
    maps = sigpy.mri.birdcage_maps((COILS, N, N), r=1.5).astype(np.complex64)
    maps = maps / np.sqrt((np.abs(maps) ** 2).sum(0))
    k = fft2c(torch.from_numpy(maps * x)).numpy()
    rng = np.random.default_rng(0)
    noise = 0.02 * np.abs(k).std() * _cplx(rng, k.shape)
    return x.astype(np.complex64), maps.astype(np.complex64), (k + noise).astype(np.complex64)


# ------------------------------------------------------------------------------------ without bart


def test_cfl_round_trip_is_column_major(tmp_path):
    rng = np.random.default_rng(0)
    a = _cplx(rng, (3, 4, 1, 5, 2))
    name = str(tmp_path / "a")
    bart.write_cfl(name, a)
    assert open(name + ".hdr").read().splitlines() == ["# Dimensions", "3 4 1 5 2"]
    raw = np.fromfile(name + ".cfl", dtype="<c8")
    assert raw[1] == a[1, 0, 0, 0, 0] and raw[3] == a[0, 1, 0, 0, 0]  # the first dim runs fastest
    back = bart.read_cfl(name)
    assert back.dtype == np.complex64 and np.array_equal(back, a)
    bart.write_cfl(name, a[:, :, :, :1, :1])  # trailing singleton dims are dropped on reading
    assert bart.read_cfl(name).shape == (3, 4)
    k = _cplx(rng, (COILS, 6, 7))  # our (C, H, W) <-> BART's [H, W, 1, C]
    assert bart.to_bart_kspace(k).shape == (6, 7, 1, COILS)
    assert np.array_equal(bart.from_bart_coils(bart.to_bart_kspace(k)), k)
    assert bart.to_bart_kspace(k[0]).shape == (6, 7, 1, 1)


def test_missing_bart_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bart here
    assert not bart.bart_available()
    with pytest.raises(bart.BartError, match="bart is not installed") as err:
        bart.pics_l1(np.ones((8, 8), np.complex64), None, None, 0.01)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_baseline_recon_without_bart_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "out"
    args = ["--method", "bart_pics", "--input", str(tmp_path), "--output_dir", str(out)]
    assert _script("baseline_recon").main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --method bart_pics needs the 'bart' command")
    assert not out.exists()


def test_calibration_size_follows_bart():
    sampled = np.zeros((64, 64), bool)
    sampled[:, 30:35] = True  # 5 centre columns -2..2 around 32: BART's centring keeps 4 of them
    assert bart.calibration_size(sampled) == (24, 4)
    sampled[:, 26:38] = True
    assert bart.calibration_size(sampled) == (24, 12)
    assert bart.calibration_size(sampled, calsize=(8, 10)) == (8, 10)


# --------------------------------------------------------------------------------------- with bart


@needs_bart
def test_bart_fft_is_our_centred_orthonormal_fft():
    rng = np.random.default_rng(1)
    for shape in [(2, 16, 12), (2, 15, 13)]:  # even and odd sizes: the centre is n // 2 in both
        x = _cplx(rng, shape)
        t = torch.from_numpy(x)
        np.testing.assert_allclose(bart.fft2c(x), fft2c(t).numpy(), atol=1e-5)
        np.testing.assert_allclose(bart.fft2c(x, inverse=True), ifft2c(t).numpy(), atol=1e-5)


@needs_bart
def test_bart_failure_is_a_one_line_error():
    with pytest.raises(bart.BartError, match=r"bart fft failed \(exit") as err:
        bart.run_bart(["fft", "-u", "3", "missing", "out"], {}, ["out"])
    assert "\n" not in str(err.value)


@needs_bart
@pytest.mark.parametrize("shape", [(24, 20), (24, 18), (22, 18)])  # H/2, W/2 even/odd: pics' sign convention
def test_pics_fully_sampled_single_coil_is_ifft2c(shape):
    rng = np.random.default_rng(2)
    img = _cplx(rng, shape)  # H != W: a transposed layout would not even fit
    k = fft2c(torch.from_numpy(img)).numpy()
    out = bart.pics_l1(k, None, None, 0.0, iters=30)
    np.testing.assert_allclose(out, img, atol=1e-4)
    # without -w 1 BART divides the data by its own estimate and returns the image in those units
    auto = bart.pics_l1(k, None, None, 0.0, iters=30, scaling=None)
    assert abs(np.vdot(img, auto) / np.vdot(img, img) - 1) > 0.1


@needs_bart
def test_pics_refuses_odd_sizes():
    k = fft2c(torch.from_numpy(_cplx(np.random.default_rng(3), (16, 15)))).numpy()
    with pytest.raises(bart.BartError, match="odd image size"):
        bart.pics_l1(k, None, None, 0.0, iters=5)


@needs_bart
def test_pics_agrees_with_our_sense_model(phantom):
    x, maps, k = phantom
    y = fft2c(torch.from_numpy(maps * x)).numpy()  # noiseless, fully sampled
    out = bart.pics_l1(y, None, maps, 0.0, iters=10)
    ref = coil_combine(ifft2c(torch.from_numpy(y)), torch.from_numpy(maps)).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
    # undersampled (4x column mask): BART's image fits y under OUR forward model, at the same scale
    mask = create_mask_for_mask_type("random", [0.08], [4])((COILS, N, N), seed=0)[0].numpy().reshape(-1)
    out = bart.pics_l1(y * mask, mask, maps, 0.0, iters=100)
    pred = sense_forward(torch.from_numpy(out)[None], torch.from_numpy(maps)[None], torch.from_numpy(mask))
    rel = np.linalg.norm(pred[0].numpy() - y * mask) / np.linalg.norm(y * mask)
    assert rel < 0.02
    assert np.linalg.norm(2 * pred[0].numpy() - y * mask) / np.linalg.norm(y * mask) > 0.9  # scale matters


def _column_mask(num_acs, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(N, np.float32)
    mask[N // 2 - num_acs // 2 : N // 2 - num_acs // 2 + num_acs] = 1
    mask[rng.choice(N, N // 4, replace=False)] = 1
    mask[N // 2 - num_acs // 2 - 1] = mask[N // 2 - num_acs // 2 + num_acs] = (
        0  # exactly num_acs centre columns
    )
    return mask


def subspace_projection(a, b):
    """Mean over the joint support of |<a, b>| / (|a| |b|) per pixel (1: the same map up to a phase)."""
    na, nb = np.sqrt((np.abs(a) ** 2).sum(0)), np.sqrt((np.abs(b) ** 2).sum(0))
    joint = (na > 0) & (nb > 0)
    return float((np.abs((np.conj(a) * b).sum(0))[joint] / (na * nb)[joint]).mean()), int(joint.sum())


@needs_bart
@pytest.mark.parametrize("num_acs", [24, 10])
def test_our_espirit_maps_span_bart_ecalib_subspace(phantom, num_acs):
    """24 ACS columns: a 128x24 fully sampled centre; 10: fastMRI's 4x at 128 columns."""
    x, _, k = phantom
    mask = _column_mask(num_acs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = estimate_sens_maps(k * mask, mask=mask)
    theirs = bart.ecalib(k * mask, mask)
    proj, joint = subspace_projection(ours, theirs)
    print(f"ACS {num_acs}: mean |<s_ours, s_bart>| / (|s_ours||s_bart|) = {proj:.4f} on {joint} pixels")
    assert joint >= (np.abs(x) > 0).sum()  # the joint support covers the object
    assert proj >= 0.95


@needs_bart
def test_ecalib_reduces_the_kernel_for_few_centre_columns(phantom):
    _, maps, k = phantom
    mask = _column_mask(5)  # BART aborts with its default kernel 6 here
    with pytest.warns(bart.BartCalibrationWarning, match="using kernel 6x3"):
        theirs = bart.ecalib(k * mask, mask)
    assert np.isfinite(theirs).all()
    assert subspace_projection(theirs, maps)[0] > 0.95


def _normalized(k, mask):
    w = np.broadcast_to(mask, k.shape).astype(np.float32)
    scale = float(scale_from_kspace(torch.from_numpy(k * w)))
    return k * w / scale, scale


@needs_bart
@pytest.mark.parametrize("coils,lamda", [("multi", 3e-5), ("single", 1e-4)])
def test_l1_wavelet_within_half_a_db_of_bart_pics(phantom, coils, lamda):
    """Same data, maps, λ, same units: the project's sigpy L1-wavelet and ``bart pics -l1 -n`` (BART without
    its random wavelet shifts, i.e. the same FISTA problem). λ is small enough that the two wavelets do not
    separate the results (at larger λ they do: test_lambda_means_the_same_in_both); the intensity scale from
    the fully sampled centre is larger than the earlier 3x3-block one, so the same λ regularizes more, and the
    earlier 1e-4 / 3e-4 became 3e-5 / 1e-4."""
    baseline_recon = _script("baseline_recon")
    x, maps_true, k = phantom
    mask = create_mask_for_mask_type("random", [0.08], [4])((COILS, N, N), seed=0)[0].numpy().reshape(-1)
    if coils == "multi":
        k, target = k * mask, np.sqrt((np.abs(maps_true * x) ** 2).sum(0))
        maps = bart.ecalib(k, mask)
    else:
        k0 = fft2c(torch.from_numpy(x)).numpy()
        noise = 0.02 * np.abs(k0).std() * _cplx(np.random.default_rng(3), k0.shape)
        k, target, maps = (k0 + noise) * mask, np.abs(x), None
    # White noise of a known std: the baseline's prewhitening is then the identity, as BART sees the data.
    white = dict(noise_std=float(np.abs(k[..., mask > 0]).std()) * 1e-3)
    ours = baseline_recon.reconstruct_baseline(k, mask, maps, "l1_wavelet", lamda, **white)["image"]
    y, scale = _normalized(k if k.ndim == 3 else k[None], mask)
    theirs = bart.pics_l1(y, mask, maps, lamda, iters=100, cycle_spinning=False) * scale
    default = baseline_recon.reconstruct_baseline(k, mask, maps, "bart_pics", lamda, **white)["image"]
    p_ours, p_theirs, p_default = (psnr(target[None], np.abs(im)[None]) for im in (ours, theirs, default))
    print(
        f"{coils}-coil λ {lamda:g}: l1_wavelet {p_ours:.2f} dB, bart pics -n {p_theirs:.2f} dB, "
        f"bart pics with random shifts (the bart_pics baseline) {p_default:.2f} dB"
    )
    assert abs(p_ours - p_theirs) < 0.5
    assert p_default > p_ours - 0.5  # BART's cycle spinning does not hurt


@needs_bart
def test_lambda_means_the_same_in_both(phantom):
    """With the transform closest to BART's (Daubechies-2, 4 levels, periodic; found by trying levels) sigpy's
    FISTA and ``bart pics -l1 -n`` agree at every λ: the objective ½‖MFSx − y‖² + λ‖Ψx‖₁ and its units are the
    same, and what separates the project's l1_wavelet from BART at larger λ is the wavelet (and BART's
    random shifts), not λ."""
    import pywt
    import sigpy as sp
    import sigpy.mri

    x, maps_true, k = phantom
    mask = create_mask_for_mask_type("random", [0.08], [4])((COILS, N, N), seed=0)[0].numpy().reshape(-1)
    maps = bart.ecalib(k * mask, mask)
    y, scale = _normalized(k, mask)
    target = np.sqrt((np.abs(maps_true * x) ** 2).sum(0))
    _, slices = pywt.coeffs_to_array(pywt.wavedec2(np.zeros((N, N)), "db2", mode="periodization", level=4))

    class Db2(sp.linop.Linop):
        def __init__(self, inverse=False):
            self.inverse = inverse
            super().__init__((N, N), (N, N))

        def _apply(self, a):
            if self.inverse:
                coeffs = pywt.array_to_coeffs(a, slices, output_format="wavedec2")
                return pywt.waverec2(coeffs, "db2", mode="periodization").astype(a.dtype)
            return pywt.coeffs_to_array(pywt.wavedec2(a, "db2", mode="periodization", level=4))[0]

        def _adjoint_linop(self):
            return Db2(not self.inverse)

    weights = np.ascontiguousarray(np.broadcast_to(mask, k.shape).astype(np.float32))
    for lamda in (3e-4, 3e-3):
        proxg = sp.prox.UnitaryTransform(sp.prox.L1Reg((N, N), lamda), Db2())
        A = sigpy.mri.linop.Sense(maps, weights=weights)
        ours = sp.app.LinearLeastSquares(A, y, proxg=proxg, max_iter=100, show_pbar=False).run()
        theirs = bart.pics_l1(y, mask, maps, lamda, iters=100, cycle_spinning=False)
        p_ours, p_theirs = (psnr(target[None], np.abs(im * scale)[None]) for im in (np.asarray(ours), theirs))
        print(f"λ {lamda:g}: sigpy db2 {p_ours:.2f} dB, bart pics -n {p_theirs:.2f} dB")
        assert abs(p_ours - p_theirs) < 0.5


@needs_bart
def test_baseline_recon_bart_pics_end_to_end(tmp_path, phantom, capsys):
    x, maps, _ = phantom
    img = np.stack([x, 0.8 * x])[:, ::2, ::2]  # 64x64, 2 slices
    mps = maps[:, ::2, ::2] / np.sqrt((np.abs(maps[:, ::2, ::2]) ** 2).sum(0))
    data = tmp_path / "data"
    data.mkdir()
    with h5py.File(data / "mc.h5", "w") as f:
        f["kspace"] = fft2c(torch.from_numpy(mps[None] * img[:, None])).numpy()
        f["reconstruction_rss"] = np.sqrt((np.abs(mps[None] * img[:, None]) ** 2).sum(1)).astype(np.float32)
    out = tmp_path / "out"
    args = ["--method", "bart_pics", "--input", str(data), "--output_dir", str(out), "--png", "False"]
    args += ["--lamda", "1e-3", "--center_fractions", "0.16", "--progress", "False"]
    assert _script("baseline_recon").main(args) == 0
    with h5py.File(out / "mc.h5", "r") as f:
        assert f["reconstruction"].shape == (2, 64, 64)
        assert f.attrs["method"] == "bart_pics" and f.attrs["bart_version"].startswith("v")
    zf_args = [a if a != "bart_pics" else "zero_filled" for a in args]
    zf_args[zf_args.index(str(out))] = str(tmp_path / "zf")
    assert _script("baseline_recon").main(zf_args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bart_pics (lambda 0.001)" in lines[0]
    bart_db, zf_db = (float(line.split("PSNR ")[1].split(" dB")[0]) for line in (lines[0], lines[2]))
    print(f"baseline_recon end to end: bart_pics {bart_db:.2f} dB, zero_filled {zf_db:.2f} dB")
    assert bart_db > zf_db + 3


def test_benchmark_runs_bart_pics_with_its_lambda_or_skips_it(monkeypatch, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import recon_benchmark as rb

    methods = rb.build_methods(rb.parse_args(["--methods", "l1_wavelet,bart_pics"]))
    cmd = rb.method_command(methods[1], "multicoil", "in", "out", 4, False)
    assert cmd[cmd.index("--method") + 1] == "bart_pics"
    assert float(cmd[cmd.index("--lamda") + 1]) == rb.BASELINE_LAMBDA[("bart_pics", "multicoil", 4)]
    monkeypatch.setenv("PATH", str(tmp_path))  # no bart: left out with a note
    kept, notes = rb.drop_unavailable(methods)
    assert [m.name for m in kept] == ["l1_wavelet"]
    assert len(notes) == 1 and "bart_pics skipped" in notes[0]
