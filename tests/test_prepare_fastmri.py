"""Tests for datasets/prepare_fastmri.py: maps are added, reruns skip, bad files are summarized."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch
from tiny import load_module

from improved_diffusion.fastmri_data import load_data
from improved_diffusion.mri.fftc import fft2c

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "datasets", "prepare_fastmri.py")
prepare = load_module("datasets/prepare_fastmri.py")  # registered, so worker processes unpickle its functions

FAST = dict(max_calib=12, kernel_width=4)


def _write_inputs(d, n=32, coils=4):
    d.mkdir()
    x = sigpy.shepp_logan((n, n)).astype(np.complex64)
    maps = sigpy.mri.birdcage_maps((coils, n, n), r=1.5).astype(np.complex64)
    multi = fft2c(torch.from_numpy(np.stack([maps * x, maps * x[::-1]]))).numpy()
    with h5py.File(d / "multi.h5", "w") as f:
        f["kspace"] = multi
        f["reconstruction_rss"] = np.abs(x)[None].repeat(2, 0).astype(np.float32)
        f.attrs["acquisition"] = "AXT1"
    (d / "sub").mkdir()
    with h5py.File(d / "sub" / "single.h5", "w") as f:
        f["kspace"] = fft2c(torch.from_numpy(x[None])).numpy()
    (d / "broken.h5").write_bytes(b"\x00" * 100)


def test_prepare_adds_maps_and_resumes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(src)
    results = prepare.run(str(src), str(out), FAST, show_progress=False)
    status = {os.path.basename(s): st for s, st, _ in results}
    assert status == {"multi.h5": "prepared", "single.h5": "copied", "broken.h5": "bad"}
    with h5py.File(out / "multi.h5") as f, h5py.File(src / "multi.h5") as g:
        assert f["sens_maps"].shape == f["kspace"].shape == (2, 4, 32, 32)
        assert f["sens_maps"].dtype == np.complex64 and np.isfinite(f["sens_maps"][()]).all()
        np.testing.assert_array_equal(f["kspace"][()], g["kspace"][()])
        assert f.attrs["acquisition"] == "AXT1" and "sens_maps" not in g  # input untouched
        sumsq = (np.abs(f["sens_maps"][0]) ** 2).sum(0)
        assert np.allclose(sumsq[sumsq > 0], 1, atol=1e-4) and (sumsq > 0).mean() > 0.3
    assert (out / "sub" / "single.h5").exists() and not list(out.rglob("*.tmp"))
    # The prepared folder trains: multi-coil images through the maps, single-coil through ifft2c.
    x, kw = next(load_data(data_dir=str(out), batch_size=1, deterministic=True, shard=0, num_shards=1))
    assert x.shape == (1, 2, 32, 32) and kw["fname"] == ["multi.h5"]
    # Second run: finished files are skipped; the bad file is reported again.
    again = prepare.run(str(src), str(out), FAST, show_progress=False)
    assert sorted(st for _, st, _ in again) == ["bad", "done", "done"]
    text = prepare._summary(again)
    assert "2 done" in text and "broken.h5: not a readable HDF5" in text


def test_cli_workers_single_coil_skip_and_errors(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(src)
    os.remove(src / "broken.h5")
    argv = ["--input_dir", str(src), "--output_dir", str(out), "--max_calib", "12", "--kernel_width", "4"]
    flags = [
        "--workers",
        "2",
        "--single_coil",
        "skip",
        "--no_progress",
        "--device",
        "cpu",
        "--compression",
        "gzip",
    ]
    assert prepare.main(argv + flags) == 0
    assert "1 prepared, 1 skipped" in capsys.readouterr().out
    assert (out / "multi.h5").exists() and not (out / "sub" / "single.h5").exists()
    with h5py.File(out / "multi.h5") as f:
        assert f["sens_maps"].attrs["max_calib"] == 12 and f["sens_maps"].compression == "gzip"
    assert prepare.main(["--input_dir", str(src), "--output_dir", str(src)]) == 2
    assert "must differ" in capsys.readouterr().err


def test_existing_maps_are_kept(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(src)
    shutil.rmtree(src / "sub")
    os.remove(src / "broken.h5")
    with h5py.File(src / "multi.h5", "r+") as f:
        f["sens_maps"] = np.ones(f["kspace"].shape, np.complex64)
    (result,) = prepare.run(str(src), str(out), FAST, show_progress=False)
    assert result[1] == "has_maps"


@pytest.mark.skipif(
    shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None, reason="no mpiexec"
)
def test_mpi_ranks_share_the_files(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(src)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    cmd = [mpiexec, "-n", "2", sys.executable, SCRIPT, "--input_dir", str(src), "--output_dir", str(out)]
    cmd += ["--max_calib", "12", "--kernel_width", "4", "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr  # broken.h5 is bad
    assert "1 bad, 1 copied, 1 prepared" in proc.stdout and proc.stdout.count("prepare_fastmri:") == 1
    assert (out / "multi.h5").exists() and (out / "sub" / "single.h5").exists()
