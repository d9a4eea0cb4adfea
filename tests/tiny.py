"""What the tests share: the tiny model, its checkpoint, a phantom with coil maps, and a launcher-free
environment for the scripts.

Not a test file (pytest collects ``test_*.py`` only); the tests import it as ``tiny`` (pytest puts tests/ on
``sys.path``), and so does benchmarks/bad_input_table.py, whose runs tests/test_bad_input.py asserts on.
"""

import importlib.util
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import h5py
import numpy as np
import torch

from improved_diffusion.respace import SpacedDiffusion
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    save_config,
)
from improved_diffusion.unet import UNetModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 16x16 UNet without attention on a 20-step diffusion: it builds and runs in well under a second on CPU.
TINY_MODEL: Dict[str, Any] = dict(
    image_size=16,
    num_channels=8,
    num_res_blocks=1,
    attention_resolutions="",
    num_heads=1,
    diffusion_steps=20,
    channel_mult="1,2",
)
TINY_FLAGS: List[str] = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
# torchrun's and the MPI launchers' variables: a script started with any of them would look for its group.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
)
MPI_PREFIXES = ("PMI", "OMPI", "PMIX", "MV2")
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]  # + script and args


def tiny_config(**overrides: Any) -> Dict[str, Any]:
    """Every model and diffusion option: the defaults, :data:`TINY_MODEL`, then ``overrides``."""
    return {**model_and_diffusion_defaults(), **TINY_MODEL, **overrides}


def tiny_model_and_diffusion(seed: int = 0, **overrides: Any) -> Tuple[UNetModel, SpacedDiffusion]:
    """The tiny model (weights seeded by ``seed``) and its diffusion, built from :func:`tiny_config`."""
    torch.manual_seed(seed)
    return create_model_and_diffusion(**tiny_config(**overrides))


def write_checkpoint(
    folder: str, config_overrides: Optional[Dict] = None, name: str = "model000000.pt", **model_overrides: Any
) -> str:
    """A tiny model's weights ``<folder>/<name>`` (``model_overrides``) and config.json beside them (plus
    ``config_overrides``); returns the weights' path."""
    cfg = tiny_config(**model_overrides)
    model, _ = tiny_model_and_diffusion(**model_overrides)
    save_config({**cfg, **(config_overrides or {})}, str(folder))
    path = os.path.join(str(folder), name)
    torch.save(model.state_dict(), path)
    return path


def phantom(h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """(h, w) complex64: a smooth ellipse with a phase ramp (normalized magnitudes well inside [-1, 1])."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    inside = ((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    return (scale * inside * (1 + 0.5 * np.cos(xx / 3)) * np.exp(0.4j * xx / w)).astype(np.complex64)


def coil_maps(coils: int, h: int, w: int) -> np.ndarray:
    """(coils, h, w) complex64 smooth maps, one centred near each corner in turn, with sum_c |S_c|^2 = 1."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    maps = np.stack(
        [np.exp(-((yy - h * (c % 2)) ** 2 + (xx - w * (c // 2)) ** 2) / 300 + 0.2j * c) for c in range(coils)]
    )
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64)


def random_volume(path: str, slices: int = 4, size: int = 16, coils: int = 0, seed: int = 0) -> str:
    """A fastMRI-format file of random k-space (single-coil, or multi-coil with unit-norm constant maps)."""
    rng = np.random.default_rng(seed)
    shape = (slices, coils, size, size) if coils else (slices, size, size)
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    with h5py.File(path, "w") as f:
        f["kspace"] = k
        if coils:
            f["sens_maps"] = np.full(shape, 1 / np.sqrt(coils), np.complex64)
    return str(path)


def script_env(**extra: str) -> Dict[str, str]:
    """``os.environ`` for a script run as a plain process: no launcher variables and no OPENAI_LOGDIR, one
    thread, this checkout first on PYTHONPATH; ``extra`` is added."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS + ("OPENAI_LOGDIR",) and not k.startswith(MPI_PREFIXES)
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def load_module(relpath: str):
    """A script of this repository (e.g. ``"scripts/prior_sample.py"``) imported as a module, registered in
    ``sys.modules`` under its file name (dataclasses look their module up there, and worker processes
    unpickle its functions through it)."""
    path = os.path.join(REPO, relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
