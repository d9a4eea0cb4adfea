"""The simulated acquisition shared by make_demo_data.py and make_heldout_data.py, and its fastMRI file.

A magnitude image on a fine grid (``FOV`` x ``FOV``, 1 mm for the template) gets a smooth random phase
(:func:`smooth_phase`) and, for multi-coil, birdcage sensitivities (:func:`birdcage_maps`); its Fourier
transform is cropped to the central ``size x size`` block (:func:`simulate_kspace`), so the k-space is not
made on the grid it is reconstructed on (no inverse crime). Targets are fastMRI's (:func:`target_from_kspace`:
ESC single-coil, RSS multi-coil); :func:`write_fastmri_file` writes one file with the minimal
:func:`ismrmrd_header` that fastMRI's ``SliceDataset`` reads.
"""

import os
from typing import Callable, Dict, Optional, Tuple

import h5py
import numpy as np
import torch

from improved_diffusion.io_util import atomic_write
from improved_diffusion.mri.fftc import fft2c, ifft2c

FOV = 240  # mm: zero-padded 1 mm grid that holds the whole head (233 mm front to back)


def smooth_phase(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n) phase map: a random offset plus a random 2nd-order polynomial over the field of view."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    c = rng.standard_normal(5)
    return (
        rng.uniform(-np.pi, np.pi)
        + c[0] * xx
        + c[1] * yy
        + 0.5 * (c[2] * xx**2 + c[3] * yy**2 + c[4] * xx * yy)
    )


def pad_to_fov(image: np.ndarray) -> np.ndarray:
    """Centre a (rows, cols) 1 mm slice in a FOV x FOV grid."""
    out = np.zeros((FOV, FOV), image.dtype)
    r, c = image.shape
    top, left = (FOV - r) // 2, (FOV - c) // 2
    out[top : top + r, left : left + c] = image
    return out


def simulate_kspace(
    image: np.ndarray,
    size: int,
    noise: float,
    rng: np.random.Generator,
    coil_maps: Optional[np.ndarray] = None,
) -> np.ndarray:
    """k-space of the central size x size block of F(S_c x) on the fine grid, plus complex noise.

    Args:
        image: (FOV, FOV) complex 1 mm image.
        size: demo matrix size.
        noise: standard deviation of the complex noise (E|n|^2 = noise^2) in image-intensity units.
        coil_maps: (C, FOV, FOV) coil sensitivities, or None for single-coil.

    Returns:
        (size, size) or (C, size, size) complex64 k-space.
    """
    obj = image if coil_maps is None else coil_maps * image
    k = fft2c(torch.from_numpy(obj.astype(np.complex64))).numpy()
    lo = (FOV - size) // 2 + (FOV % 2 and size % 2 == 0)  # keep the centre FOV // 2 at size // 2
    k = k[..., lo : lo + size, lo : lo + size] * (FOV / size)  # same image intensity on the coarse grid
    k = k + noise / np.sqrt(2) * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    return k.astype(np.complex64)


def ismrmrd_header(size: int, fov_mm: float = FOV) -> str:
    """Minimal ISMRMRD XML with the fields fastMRI's SliceDataset reads (matrix sizes, encoding limits)."""
    matrix = f"<matrixSize><x>{size}</x><y>{size}</y><z>1</z></matrixSize>"
    fov = f"<fieldOfView_mm><x>{fov_mm:g}</x><y>{fov_mm:g}</y><z>1</z></fieldOfView_mm>"
    space = matrix + fov
    limits = (
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{size - 1}</maximum>"
        f"<center>{size // 2}</center>"
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        f"<encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
        f"<encodingLimits>{limits}</kspace_encoding_step_1></encodingLimits>"
        "<trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"
    )


def birdcage_maps(coils: int) -> np.ndarray:
    """(coils, FOV, FOV) complex64 birdcage sensitivities on the fine grid.

    ``sigpy.mri.birdcage_maps`` with r=1.5, which puts the coil ring just outside the field of view.
    """
    import sigpy.mri

    return sigpy.mri.birdcage_maps((coils, FOV, FOV), r=1.5).astype(np.complex64)


def target_from_kspace(kspace: np.ndarray) -> Tuple[str, np.ndarray]:
    """fastMRI's target of a volume: (key, float32 image) = |ifft2c| (single-coil) or RSS over coils.

    Args:
        kspace: ``(slices, H, W)`` single-coil or ``(slices, coils, H, W)`` multi-coil k-space.
    """
    images = ifft2c(torch.from_numpy(kspace)).numpy()
    if kspace.ndim == 3:
        return "reconstruction_esc", np.abs(images).astype(np.float32)
    return "reconstruction_rss", np.sqrt((np.abs(images) ** 2).sum(axis=1)).astype(np.float32)


def target_attrs(target: np.ndarray) -> Dict[str, float]:
    """The ``max`` and ``norm`` attrs of a fastMRI file, from its target volume."""
    return {"max": float(target.max()), "norm": float(np.linalg.norm(target))}


def write_fastmri_file(
    path: str,
    kspace: np.ndarray,
    target_key: str,
    target: np.ndarray,
    header: str,
    attrs: Dict,
    *,
    packed: Dict,
    datasets: Optional[Dict[str, np.ndarray]] = None,
    finish: Optional[Callable[[str], None]] = None,
) -> None:
    """Write one fastMRI-format file atomically (:func:`improved_diffusion.io_util.atomic_write`).

    Args:
        path: the .h5 file.
        kspace, target: written one slice per chunk with the compression options ``packed``.
        target_key: ``reconstruction_esc`` or ``reconstruction_rss``.
        header: the ``ismrmrd_header`` XML.
        attrs: the file's attrs, written in this order.
        datasets: further datasets (e.g. a ``noise`` scan), written uncompressed after the target.
        finish: called with the temporary file once it is closed, before it is moved into place (adds
            ``sens_maps`` to the demo files).
    """

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=kspace, chunks=(1, *kspace.shape[1:]), **packed)
            f.create_dataset(target_key, data=target, chunks=(1, *target.shape[1:]), **packed)
            for key, value in (datasets or {}).items():
                f.create_dataset(key, data=value)
            f["ismrmrd_header"] = header
            for key, value in attrs.items():
                f.attrs[key] = value
        if finish is not None:
            finish(tmp)

    atomic_write(path, write)


def folder_size_mb(path: str) -> float:
    """Size of every file below ``path``, in MiB (the builders print it)."""
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
    return total / 2**20
