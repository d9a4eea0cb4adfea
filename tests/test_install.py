"""A plain ``pip install torch==2.13.0 -e .`` in a fresh venv, on a machine without MPI, must work.

mpi4py is an ``[mpi]`` extra: installed without a loadable libmpi it breaks every sigpy import (sigpy imports
``mpi4py.MPI`` whenever mpi4py is importable), and so ESPIRiT, the L1 baseline and Poisson masks. This test
builds a clean venv (no system site packages) with only the plain install and runs those sigpy paths and
``dist_util.setup_dist()`` in it. It takes about a minute (most of it pip; torch 2.13.0 is a local CPU wheel);
skip it with ``-m "not slow_install"``.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from tiny import coil_maps, phantom, write_checkpoint

from improved_diffusion.mri.fftc import fft2c

pytestmark = pytest.mark.slow_install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Launcher variables a surrounding run may have set; the probe must see a plain process.
LAUNCH_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "PMI", "OMPI_", "MV2_")

PROBE = textwrap.dedent(
    """
    import importlib.util, os, sys, warnings
    import numpy as np

    assert importlib.util.find_spec("mpi4py") is None, "mpi4py is installed by the plain install"
    import improved_diffusion
    assert improved_diffusion.__file__.startswith(sys.argv[1]), improved_diffusion.__file__

    # Poisson mask: sigpy.mri.poisson.
    from improved_diffusion.mri.subsample import PoissonMaskFunc
    mask, num_low = PoissonMaskFunc([0.08], [4], seed=0)((1, 48, 48))
    assert tuple(mask.shape) == (48, 48) and 0.15 < float(mask.mean()) < 0.4, float(mask.mean())

    # ESPIRiT maps (sigpy's EspiritCalib) on a small phantom with birdcage coils, fully sampled.
    import sigpy, sigpy.mri, torch
    from improved_diffusion.mri.espirit import CalibrationWarning, estimate_sens_maps
    from improved_diffusion.mri.fftc import fft2c
    x = sigpy.shepp_logan((48, 48)).astype(np.complex64)
    coils = sigpy.mri.birdcage_maps((4, 48, 48), r=1.5).astype(np.complex64)
    k = fft2c(torch.from_numpy(coils * x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # ESPIRiT itself, not the low-resolution fallback
        maps = estimate_sens_maps(k)
    sumsq = (np.abs(maps) ** 2).sum(0)
    assert maps.shape == (4, 48, 48) and np.isfinite(maps).all() and (sumsq > 0).mean() > 0.3
    np.testing.assert_allclose(sumsq[sumsq > 0], 1.0, rtol=1e-4)

    # A plain process and a torchrun-style world of one need no MPI.
    from improved_diffusion import dist_util
    dist_util.setup_dist()
    assert dist_util.launcher() == "none" and dist_util.get_world_size() == 1
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist_util.setup_dist()
    assert dist_util.launcher() == "torchrun" and dist_util.get_world_size() == 1
    assert "mpi4py" not in sys.modules
    print("probe ok")
    """
)


def _libmpi_on_system() -> str:
    """Lines of ``ldconfig -p`` naming libmpi ("" when none, or no ldconfig)."""
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return ""
    out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    return "\n".join(line.strip() for line in out.splitlines() if "libmpi" in line)


def test_plain_install_without_mpi(tmp_path):
    # Install a copy of the package, so the build leaves no egg-info in the checkout and cannot race with
    # the checkout's own editable install.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for folder in ("improved_diffusion", "scripts"):
        shutil.copytree(
            os.path.join(REPO, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES + ("PYTHON", "VIRTUAL_ENV"))
    }
    env["OMP_NUM_THREADS"] = "1"
    venv = tmp_path / "venv"
    # A venv made from this (venv) interpreter is based on the base interpreter, without its site-packages.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", "-e", str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list"], env=env, capture_output=True, text=True).stdout
    names = {line.split()[0].lower() for line in listed.splitlines()[2:] if line.strip()}
    assert "sigpy" in names and "torch" in names
    assert not names & {"mpi4py", "mpich", "openmpi", "impi-rt"}, sorted(names & {"mpi4py", "mpich"})

    probe = subprocess.run(
        [python, "-c", PROBE, str(src)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    system_mpi = _libmpi_on_system()
    note = f"\n(libmpi on this system: {system_mpi})" if system_mpi else ""
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-5000:] + note
    assert probe.stdout.strip().endswith("probe ok")

    # The scripts end to end in that venv (h5 + PNG previews + CSV): a 4-coil phantom, a tiny checkpoint.
    data = tmp_path / "data"
    data.mkdir()
    img = np.stack([phantom(32, 32, 1.0), phantom(32, 32, 0.8)])
    with h5py.File(data / "mc.h5", "w") as f:
        f["kspace"] = fft2c(torch.from_numpy(coil_maps(4, 32, 32)[None] * img[:, None])).numpy()
    ckpt = write_checkpoint(tmp_path / "ckpt")
    masks = [
        "--mask_type",
        "random",
        "--accelerations",
        "4",
        "--center_fractions",
        "0.25",
        "--progress",
        "False",
    ]
    runs = {
        "baseline_recon": ["--method", "l1_wavelet"],
        "image_sample": ["--model_path", ckpt, "--timestep_respacing", "4", "--num_samples", "1"],
    }
    for script, flags in runs.items():
        out = tmp_path / script
        cmd = [python, str(src / "scripts" / f"{script}.py"), "--input", str(data), "--output_dir", str(out)]
        run = subprocess.run(cmd + masks + flags, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert (out / "mc.h5").is_file() and list(out.rglob("*.png")), sorted(os.listdir(out))
