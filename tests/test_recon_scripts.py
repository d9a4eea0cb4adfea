"""End to end: scripts/image_sample.py, baseline_recon.py, evaluate.py on tiny h5 files and a tiny model."""

import os

import h5py
import numpy as np
import pytest
import torch
from tiny import coil_maps, load_module, phantom, write_checkpoint

from improved_diffusion.evaluation import read_volume
from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.mri.fov import crop_rows, readout_crop
from improved_diffusion.mri.subsample import create_mask_for_mask_type, seed_from_fname

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SCAN = os.path.join(ROOT, "..", "shared", "data", "real_brain_8coil_poisson.h5")
SLICES, COILS, H, W = 2, 3, 16, 20
CROP = (12, 16)
MASK_ARGS = ["--mask_type", "random", "--accelerations", "4", "--center_fractions", "0.25"]


def _script(name):
    return load_module(f"scripts/{name}.py")


image_sample, baseline_recon, evaluate = (_script(n) for n in ("image_sample", "baseline_recon", "evaluate"))


def _crop(x):
    top, left = (H - CROP[0]) // 2, (W - CROP[1]) // 2
    return x[..., top : top + CROP[0], left : left + CROP[1]]


def write_single_coil(path):
    img = np.stack([phantom(H, W, 1.0), phantom(H, W, 0.7)])
    with h5py.File(path, "w") as f:
        f["kspace"] = fft2c(torch.from_numpy(img)).numpy()
        f["reconstruction_esc"] = _crop(np.abs(img)).astype(np.float32)


def write_multi_coil(path, with_maps=True, mask=None, target=True):
    img = np.stack([phantom(H, W, 1.0), phantom(H, W, 0.8)])
    maps = coil_maps(COILS, H, W)
    kspace = fft2c(torch.from_numpy(maps[None] * img[:, None])).numpy()
    with h5py.File(path, "w") as f:
        # a mask of the wrong length (the bad-input case) is stored as it is, not applied
        applies = mask is not None and mask.shape[-1] == kspace.shape[-1]
        f["kspace"] = kspace * mask if applies else kspace
        if with_maps:
            f["sens_maps"] = np.broadcast_to(maps, kspace.shape).copy()
        if mask is not None:
            f["mask"] = mask
        if target:
            f["reconstruction_rss"] = _crop(np.sqrt((np.abs(maps[None] * img[:, None]) ** 2).sum(1))).astype(
                np.float32
            )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    data = root / "data"
    data.mkdir()
    write_single_coil(str(data / "sc_a.h5"))
    write_multi_coil(str(data / "mc_b.h5"))
    ckpt = write_checkpoint(root / "ckpt")
    return {"root": root, "data": str(data), "ckpt": ckpt}


def _sample_args(setup, out, *extra):
    return [
        "--model_path", setup["ckpt"], "--input", setup["data"], "--output_dir", str(out), *MASK_ARGS,
        "--use_ddim", "True", "--timestep_respacing", "4", "--t0", "0.5", "--num_samples", "2",
        "--progress", "False",
        # noiseless, consistent data: the final DC is the exact fit (CG to 1e-8)
        "--noise_std", "0", "--cg_tol", "1e-8", "--cg_iters", "300",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def diffusion_out(setup):
    out = setup["root"] / "diffusion"
    # --num_channels equal to the config's value is accepted (only a conflicting value is an error)
    assert image_sample.main(_sample_args(setup, out, "--num_channels", "8")) == 0
    return out


def test_image_sample_writes_documented_outputs(setup, diffusion_out, capsys):
    for name, multicoil in (("sc_a.h5", False), ("mc_b.h5", True)):
        with h5py.File(diffusion_out / name, "r") as f:
            assert f["reconstruction"].shape == (SLICES, *CROP) and f["reconstruction"].dtype == np.float32
            assert f["reconstruction_std"].shape == (SLICES, *CROP)
            # the readout is cropped to the target's rows (no ismrmrd_header): the reconstruction grid
            assert f["reconstruction_complex"].shape == (SLICES, CROP[0], W)
            for key in (
                "method",
                "mask_type",
                "acceleration",
                "effective_acceleration",
                "nfe",
                "seconds_per_slice",
            ):
                assert key in f.attrs
            assert f.attrs["nfe"] == 2 and f.attrs["acceleration"] == 4.0
            # t0 0.5 of 20 base steps: base step 9, nearest kept step of [0, 6, 13, 19] is 6
            assert f.attrs["start_step"] == 6 and f.attrs["t0"] == "0.5"
            assert len(f.attrs["options_hash"]) == 12
            assert f.attrs["target_key"] == ("reconstruction_rss" if multicoil else "reconstruction_esc")
            x, mask = f["reconstruction_complex"][()], f["mask"][()]
            # the retrospective mask is the mask module's, seeded from the file name
            want, _ = create_mask_for_mask_type("random", [0.25], [4])(
                (SLICES, H, W), seed=seed_from_fname(name)
            )
            np.testing.assert_array_equal(mask, want.numpy().reshape(-1))
        # data consistency holds on the output, in the readout-cropped k-space
        with h5py.File(os.path.join(setup["data"], name), "r") as f:
            kspace, maps = f["kspace"][()], (f["sens_maps"][()] if multicoil else None)
        kspace = readout_crop(torch.from_numpy(kspace), CROP[0]).numpy()
        maps = None if maps is None else crop_rows(torch.from_numpy(maps), CROP[0]).numpy()
        k_out = fft2c(torch.from_numpy(maps * x[:, None] if multicoil else x)).numpy()
        y = kspace * mask
        assert np.linalg.norm(k_out * mask - y) / np.linalg.norm(y) < 1e-4
        stem = name[:-3]
        rows = evaluate_rows(diffusion_out / "metrics" / f"{stem}.csv")
        assert [r["slice"] for r in rows] == ["0", "1", "volume"]
        assert {r["start_step"] for r in rows} == {"6"}
        assert {"nmse", "psnr", "ssim", "target"} <= set(rows[0])
        assert os.path.isfile(diffusion_out / "png" / f"{stem}_slice000.png")
    assert len(evaluate_rows(diffusion_out / "metrics.csv")) == 2


def evaluate_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_are_skipped_with_the_same_options_and_redone_with_others(setup, diffusion_out, capsys):
    path = diffusion_out / "sc_a.h5"
    before = os.stat(path).st_mtime_ns
    capsys.readouterr()
    assert image_sample.main(_sample_args(setup, diffusion_out)) == 0
    out = capsys.readouterr().out
    assert "skipped sc_a.h5" in out and "skipped mc_b.h5" in out and "redoing" not in out
    assert os.stat(path).st_mtime_ns == before
    # other options: redone, with one line each saying so
    assert image_sample.main(_sample_args(setup, diffusion_out, "--dc", "replace")) == 0
    out = capsys.readouterr().out
    assert out.count("redoing") == 2 and "redoing sc_a.h5" in out and "other options" in out
    with h5py.File(path, "r") as f:
        assert f.attrs["dc"] == "replace"
    assert "s/slice" in out and "NFE 2" in out and "PSNR" in out
    # --overwrite redoes even with the same options
    before = os.stat(path).st_mtime_ns
    assert (
        image_sample.main(_sample_args(setup, diffusion_out, "--dc", "replace", "--overwrite", "True")) == 0
    )
    assert os.stat(path).st_mtime_ns != before and "skipped" not in capsys.readouterr().out


def test_summary_csv_covers_only_this_runs_files(setup, diffusion_out, tmp_path):
    out = tmp_path / "one"
    single = os.path.join(setup["data"], "sc_a.h5")
    for name in ("sc_a.h5", "mc_b.h5"):  # a folder that already holds another run's metrics
        os.makedirs(out / "metrics", exist_ok=True)
        with open(diffusion_out / "metrics" / name.replace(".h5", ".csv")) as f:
            (out / "metrics" / name.replace(".h5", ".csv")).write_text(f.read())
    args = _sample_args(setup, out)
    args[args.index("--input") + 1] = single
    assert image_sample.main(args + ["--start_step", "13", "--t0", ""]) == 0
    rows = evaluate_rows(out / "metrics.csv")
    assert [r["file"] for r in rows] == ["sc_a.h5"] and rows[0]["start_step"] == "13"
    with h5py.File(out / "sc_a.h5", "r") as f:
        assert f.attrs["start_step"] == 13 and f.attrs["nfe"] == 3


def test_upstream_clip_denoised_maps_onto_clip(setup, tmp_path, capsys):
    args = _sample_args(setup, tmp_path / "clip", "--clip_denoised", "False", "--num_samples", "1")
    args[args.index("--input") + 1] = os.path.join(setup["data"], "sc_a.h5")
    assert image_sample.main(args) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: --clip_denoised False: --clip none (x0 is not bounded before data consistency)"]
    with h5py.File(tmp_path / "clip" / "sc_a.h5", "r") as f:
        assert f.attrs["clip"] == "none"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--t0", "200"], "use --start_step 200"),
        (["--t0", "1"], "use --start_step 1"),
        (["--t0", "1.5"], "--t0 must be a fraction in (0, 1]"),
        (["--start_step", "13"], "give one start, not both"),  # with _sample_args' --t0 0.5
        (["--t0", "", "--start_step", "20"], "start_step must be in [0, 19]"),
    ],
)
def test_bad_start_gives_one_clear_error(setup, tmp_path, capsys, flags, expected):
    assert image_sample.main(_sample_args(setup, tmp_path / "out", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["image_sample", "baseline_recon"])
def test_launcher_error_is_one_line(setup, tmp_path, capsys, monkeypatch, script):
    from improved_diffusion import dist_util

    def fail():
        raise dist_util.LauncherError("mpiexec started 2 ranks, but mpi4py is not installed")

    monkeypatch.setattr(dist_util, "setup_dist", fail)
    module = image_sample if script == "image_sample" else baseline_recon
    args = ["--input", setup["data"], "--output_dir", str(tmp_path / "out")]
    assert module.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: mpiexec started 2 ranks, but mpi4py is not installed"]


def _bad_case(tmp_path, case):
    data = tmp_path / "in"
    data.mkdir()
    ckpt = None
    if case == "mask":
        write_multi_coil(str(data / "bad.h5"), mask=np.ones(W + 1, np.float32))
    elif case == "maps":
        write_multi_coil(str(data / "bad.h5"))
        with h5py.File(data / "bad.h5", "a") as f:
            maps = f["sens_maps"][()]
            del f["sens_maps"]
            f["sens_maps"] = maps[:, :-1]
    elif case == "unreadable":
        (data / "bad.h5").write_text("not an hdf5 file")
    elif case == "config":
        write_single_coil(str(data / "good.h5"))
        ckpt = write_checkpoint(tmp_path / "ckpt", in_channels=1)
    elif case == "no_kspace":
        with h5py.File(data / "bad.h5", "w") as f:
            f["image"] = np.zeros((1, H, W), np.float32)
    return data, ckpt


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mask", ["bad.h5", "'mask' of shape (21,) does not match"]),
        ("maps", ["bad.h5", "'sens_maps'", "does not match"]),
        ("unreadable", ["bad.h5", "not a readable HDF5 file"]),
        ("no_kspace", ["bad.h5", "missing key 'kspace'"]),
        ("config", ["model000000.pt", "in_channels=1"]),
        ("flag", ["--num_channels 64 conflicts", "config.json"]),
    ],
)
def test_bad_inputs_give_one_clear_error_and_no_output(setup, tmp_path, capsys, case, expected):
    data, ckpt = _bad_case(tmp_path, case if case != "flag" else "none")
    if case == "flag":
        write_single_coil(str(data / "good.h5"))
    out = tmp_path / "out"
    extra = ["--num_channels", "64"] if case == "flag" else []
    args = ["--model_path", ckpt or setup["ckpt"], "--input", str(data), "--output_dir", str(out), *extra]
    args += ["--timestep_respacing", "4"]  # the test model has 20 steps (the default is ddim50)
    assert image_sample.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    for text in expected:
        assert text in err[0]
    assert not out.exists() or not any(p.suffix == ".h5" for p in out.rglob("*"))


def test_undersampled_input_with_mask_and_estimated_maps(setup, tmp_path, capsys):
    data = tmp_path / "under"
    data.mkdir()
    yy, xx = np.mgrid[:H, :W]
    mask = (np.random.default_rng(0).random((H, W)) < 0.4) | ((abs(yy - H // 2) < 4) & (abs(xx - W // 2) < 4))
    write_multi_coil(str(data / "under.h5"), with_maps=False, mask=mask.astype(np.float32), target=False)
    out = tmp_path / "out"
    args = ["--model_path", setup["ckpt"], "--input", str(data / "under.h5"), "--output_dir", str(out)]
    assert image_sample.main(args + ["--timestep_respacing", "2", "--progress", "False"]) == 0
    with h5py.File(out / "under.h5", "r") as f:
        assert f.attrs["mask_type"] == "file" and f["reconstruction"].shape == (SLICES, H, W)
        assert f["mask"].shape == (H, W) and np.isfinite(f["reconstruction"][()]).all()
        assert abs(f.attrs["effective_acceleration"] - mask.size / mask.sum()) < 1e-9
    assert not (out / "metrics").exists()  # no target, no metrics
    assert (out / "png" / "under_slice000.png").is_file()


def test_baselines_use_the_same_masks_and_evaluate(setup, diffusion_out, capsys):
    outs = {}
    for method in ("zero_filled", "sense", "l1_wavelet"):
        out = setup["root"] / method
        args = [
            "--method",
            method,
            "--input",
            setup["data"],
            "--output_dir",
            str(out),
            "--max_iter",
            "10",
            *MASK_ARGS,
        ]
        assert baseline_recon.main(args + ["--progress", "False", "--png", "False"]) == 0
        outs[method] = out
        for name in ("sc_a.h5", "mc_b.h5"):
            with h5py.File(out / name, "r") as f, h5py.File(diffusion_out / name, "r") as g:
                np.testing.assert_array_equal(f["mask"][()], g["mask"][()])
                assert f.attrs["method"] == method and f["reconstruction"].shape == (SLICES, *CROP)
    # zero-filled single-coil = |ifft2c(masked k-space)| at the target crop
    with (
        h5py.File(outs["zero_filled"] / "sc_a.h5", "r") as f,
        h5py.File(os.path.join(setup["data"], "sc_a.h5")) as g,
    ):
        want = _crop(np.abs(ifft2c(torch.from_numpy(g["kspace"][()] * f["mask"][()])).numpy()))
        np.testing.assert_allclose(f["reconstruction"][()], want, rtol=1e-4, atol=1e-5 * want.max())
    capsys.readouterr()
    csv_path = setup["root"] / "evaluation.csv"
    dirs = [str(diffusion_out)] + [str(outs[m]) for m in outs]
    assert (
        evaluate.main(
            ["--predictions_dir", *dirs, "--targets_dir", setup["data"], "--output_csv", str(csv_path)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "l1_wavelet" in printed and "reconstruction_rss" in printed
    rows = evaluate_rows(csv_path)
    assert len(rows) == 4 * (2 + 2)  # 4 folders x (2 volumes + mean + std)
    zf = [r for r in rows if r["method"] == "zero_filled" and r["file"] == "mean"][0]
    sense = [r for r in rows if r["method"] == "sense" and r["file"] == "mean"][0]
    assert float(sense["psnr"]) > float(zf["psnr"])  # consistent 3-coil data: SENSE beats zero-filled


def test_evaluate_reports_missing_target(tmp_path, diffusion_out, capsys):
    assert evaluate.main(["--predictions_dir", str(diffusion_out), "--targets_dir", str(tmp_path)]) == 2
    assert "no target file" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(REAL_SCAN), reason="the real 8-coil scan is not available")
def test_real_multicoil_scan_end_to_end(setup, tmp_path):
    out = tmp_path / "real"
    args = [
        "--model_path",
        setup["ckpt"],
        "--input",
        REAL_SCAN,
        "--output_dir",
        str(out),
        "--use_ddim",
        "True",
    ]
    args += ["--timestep_respacing", "2", "--t0", "0.3", "--num_samples", "1", "--progress", "False"]
    assert image_sample.main(args) == 0
    with h5py.File(out / os.path.basename(REAL_SCAN), "r") as f:
        assert f["reconstruction"].shape == (1, 180, 230) and np.isfinite(f["reconstruction"][()]).all()
        assert f.attrs["mask_type"] == "file" and f.attrs["data_residual"] < 0.1


def test_evaluate_target_follows_the_kspace_kind(tmp_path):
    """fastMRI's single-coil files hold both targets: they are scored against ESC, multi-coil against RSS."""
    for name, kspace_shape in (("sc.h5", (1, H, W)), ("mc.h5", (1, COILS, H, W))):
        with h5py.File(tmp_path / name, "w") as f:
            f["kspace"] = np.zeros(kspace_shape, np.complex64)
            f["reconstruction_esc"] = np.ones((1, H, W), np.float32)
            f["reconstruction_rss"] = np.ones((1, H, W), np.float32)
    assert read_volume(str(tmp_path / "sc.h5"), None, "target")[1] == "reconstruction_esc"
    assert read_volume(str(tmp_path / "mc.h5"), None, "target")[1] == "reconstruction_rss"
