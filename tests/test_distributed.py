"""Two-rank training under mpiexec and torchrun: gradients are averaged (identical weights) and ranks read
disjoint files. Each rank writes rank_report_<rank>.json through the IMPROVED_DIFFUSION_RANK_REPORT hook."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from tiny import REPO, TINY_FLAGS, TORCHRUN_2, script_env

BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four single-coil fastMRI-format volumes: `kspace` (slices, H, W) complex64."""
    folder = tmp_path_factory.mktemp("fastmri")
    rng = np.random.default_rng(0)
    for i in range(4):
        k = rng.standard_normal((3, 16, 16)) + 1j * rng.standard_normal((3, 16, 16))
        with h5py.File(folder / f"file{i}.h5", "w") as f:
            f.create_dataset("kspace", data=k.astype(np.complex64))
    return folder


def _env():
    return script_env(IMPROVED_DIFFUSION_RANK_REPORT="1")  # each rank writes its rank_report_<rank>.json


def _train_args(data_dir, log_dir):
    return [
        os.path.join(REPO, "scripts", "image_train.py"),
        f"--data_dir={data_dir}",
        f"--log_dir={log_dir}",
        *TINY_FLAGS,
        "--batch_size=1",
        "--log_interval=1",
        f"--max_steps={STEPS}",
        "--schedule_sampler=loss-second-moment",
    ]


def _check_reports(log_dir, out):
    reports = []
    for rank in (0, 1):
        path = os.path.join(log_dir, f"rank_report_{rank}.json")
        assert os.path.exists(path), out
        with open(path) as f:
            reports.append(json.load(f))
    r0, r1 = reports
    assert r0["params_sha256"] == r1["params_sha256"], "ranks ended with different weights"
    assert r0["params_sha256"] != r0["initial_params_sha256"], "training did not change the weights"
    assert r0["files"] and r1["files"] and not set(r0["files"]) & set(r1["files"]), reports
    assert sorted(r0["files"] + r1["files"]) == [f"file{i}.h5" for i in range(4)]
    names = os.listdir(log_dir)
    assert f"opt{STEPS:06d}.pt" in names and "log-rank001.txt" in names and "progress.csv" in names


@pytest.mark.skipif(
    not os.path.exists(MPIEXEC), reason=f"mpiexec not found next to the interpreter ({MPIEXEC})"
)
def test_mpiexec_two_ranks(data_dir, tmp_path):
    log_dir = tmp_path / "mpi"
    cmd = [MPIEXEC, "-n", "2", sys.executable, *_train_args(data_dir, log_dir)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "launcher: mpi, world size 2" in out.stdout
    _check_reports(log_dir, out.stdout + out.stderr)


def test_torchrun_two_ranks(data_dir, tmp_path):
    log_dir = tmp_path / "torchrun"
    cmd = [*TORCHRUN_2, *_train_args(data_dir, log_dir)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "launcher: torchrun, world size 2" in out.stdout
    _check_reports(log_dir, out.stdout + out.stderr)
