"""Build a small fastMRI-format demo set from the MNI152 T1 template that ships with nilearn.

Real anatomy, offline: ``nilearn.datasets.load_mni152_template(resolution=1)`` (197x233x189 at 1 mm, no
download). Axial slices of the brain (empty ends skipped) are cut into ``train_volumes + val_volumes``
equal blocks along z; each volume (one file) is the central ``slices_per_volume`` slices of its block, so
neighbouring volumes are several slices apart and validation (blocks spread through the brain) never
touches a training slice.

Per slice: complex image = magnitude x exp(i phi) with a smooth random phase (2nd-order polynomial,
seeded). To avoid the inverse crime, the 1 mm slice is zero-padded to a 240 mm field of view, Fourier
transformed, and only the central ``size x size`` k-space block is kept (pixel 240/size mm), then complex
Gaussian noise is added. Multi-coil: 8 birdcage coils (``sigpy.mri.birdcage_maps``) multiply the 1 mm
image before the transform, k-space = F(S_c x) + noise, and ``sens_maps`` are added by
``prepare_fastmri.add_sens_maps`` (the preparation script's own code), so the folders are ready to train.

Output (``--output_dir``, default ``demo_data/``): ``singlecoil_{train,val}/`` with ``kspace`` (slices, H, W)
and ``reconstruction_esc``; ``multicoil_{train,val}/`` with ``kspace`` (slices, coils, H, W),
``reconstruction_rss`` and ``sens_maps``; every file also has ``ismrmrd_header`` and the attrs
acquisition, max, norm, patient_id; ``manifest.json`` lists the template slices of every file.

    python datasets/make_demo_data.py                     # full set (~80 slices per kind)
    python datasets/make_demo_data.py --tiny --output_dir /tmp/demo   # seconds, for tests
"""

import argparse
import functools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

try:
    import prepare_fastmri
except ImportError:  # imported from elsewhere than this folder
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import prepare_fastmri

from improved_diffusion.fastmri_data import scale_from_kspace, slice_to_image
from improved_diffusion.mri.fftc import fft2c, ifft2c

FOV = 240  # mm: zero-padded 1 mm grid that holds the whole head (233 mm front to back)
BRAIN_AREA_FRACTION = 0.3  # a slice counts as brain when its area is >= 30% of the largest slice's
TISSUE_LEVEL = 0.05  # template intensity above which a voxel is tissue


@functools.lru_cache(maxsize=1)
def load_template() -> np.ndarray:
    """MNI152 T1 template as axial slices (z, AP, LR) float32 in [0, 1], anterior at row 0 (read-only)."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)  # (x, y, z)
    vol = np.transpose(vol, (2, 1, 0))[:, ::-1, :]  # (z, y, x) with y flipped: anterior first
    vol = np.ascontiguousarray(vol / vol.max())
    vol.flags.writeable = False  # cached: shared by every call
    return vol


def brain_slices(vol: np.ndarray) -> Tuple[int, int]:
    """First and last axial slice whose tissue area is at least BRAIN_AREA_FRACTION of the largest."""
    area = (vol > TISSUE_LEVEL).sum(axis=(1, 2))
    keep = np.nonzero(area >= BRAIN_AREA_FRACTION * area.max())[0]
    return int(keep[0]), int(keep[-1])


def volume_layout(
    first: int, last: int, train_volumes: int, val_volumes: int, slices_per_volume: int
) -> Dict[str, List[List[int]]]:
    """Template slice indices of every volume: {"train": [[z, ...], ...], "val": [...]}.

    The range is cut into equal blocks; validation takes blocks spread evenly through the brain (never
    the first or last), and every volume keeps the central slices of its block.
    """
    n = train_volumes + val_volumes
    edges = np.linspace(first, last + 1, n + 1)
    block = int(np.floor(edges[1] - edges[0]))
    if slices_per_volume > block:
        raise ValueError(f"slices_per_volume {slices_per_volume} does not fit in blocks of {block} slices")
    val_blocks = (
        {int(round((i + 1) * n / (val_volumes + 1))) - 1 for i in range(val_volumes)}
        if val_volumes
        else set()
    )
    layout: Dict[str, List[List[int]]] = {"train": [], "val": []}
    for b in range(n):
        start = int(np.floor(edges[b])) + (block - slices_per_volume) // 2
        layout["val" if b in val_blocks else "train"].append(list(range(start, start + slices_per_volume)))
    return layout


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


def write_volume(
    path: str,
    vol: np.ndarray,
    zs: Sequence[int],
    *,
    size: int,
    noise: float,
    seed: Sequence[int],
    coil_maps: Optional[np.ndarray],
    patient_id: str,
    espirit_kwargs: Dict,
) -> None:
    """Simulate one volume (file) from template slices ``zs`` and write it atomically."""
    rng = np.random.default_rng(list(seed))
    kspace = []
    for z in zs:
        fine = pad_to_fov(vol[z])
        image = fine * np.exp(1j * smooth_phase(rng, FOV))
        kspace.append(simulate_kspace(image, size, noise, rng, coil_maps))
    kspace = np.stack(kspace)
    coil_images = ifft2c(torch.from_numpy(kspace)).numpy()
    if coil_maps is None:
        target_key, target = "reconstruction_esc", np.abs(coil_images)
    else:
        target_key, target = "reconstruction_rss", np.sqrt((np.abs(coil_images) ** 2).sum(axis=1))
    target = target.astype(np.float32)
    tmp = f"{path}.{os.getpid()}.tmp"
    # gzip with byte shuffling: noisy k-space barely compresses, the maps (zero outside the head) halve.
    packed = dict(compression="gzip", shuffle=True)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=kspace, chunks=(1, *kspace.shape[1:]), **packed)
        f.create_dataset(target_key, data=target, chunks=(1, *target.shape[1:]), **packed)
        f["ismrmrd_header"] = ismrmrd_header(size)
        f.attrs["acquisition"] = "AXT1"
        f.attrs["max"] = float(target.max())
        f.attrs["norm"] = float(np.linalg.norm(target))
        f.attrs["patient_id"] = patient_id
        f.attrs["source"] = "MNI152 2009 T1 template (nilearn), simulated k-space"
        f.attrs["template_slices"] = np.asarray(zs, np.int32)
        f.attrs["noise_std"] = noise
        f.attrs["fov_mm"] = FOV
    if coil_maps is not None:
        prepare_fastmri.add_sens_maps(tmp, compression="gzip", **espirit_kwargs)
    os.replace(tmp, path)


def build(
    output_dir: str = "demo_data",
    *,
    size: int = 128,
    slices_per_volume: int = 10,
    train_volumes: int = 6,
    val_volumes: int = 2,
    coils: int = 8,
    noise: float = 0.01,
    seed: int = 0,
    kinds: Sequence[str] = ("singlecoil", "multicoil"),
    espirit_kwargs: Optional[Dict] = None,
    log=print,
) -> Dict:
    """Write the demo set; returns the manifest (also saved as ``manifest.json``)."""
    import sigpy.mri

    if size > FOV or size < 8:
        raise ValueError(f"size must be in [8, {FOV}], got {size}")
    unknown = [k for k in kinds if k not in ("singlecoil", "multicoil")]
    if unknown or not kinds:
        raise ValueError(f"kinds must be singlecoil and/or multicoil, got {list(kinds)}")
    vol = load_template()
    first, last = brain_slices(vol)
    layout = volume_layout(first, last, train_volumes, val_volumes, slices_per_volume)
    espirit_kwargs = dict(prepare_fastmri.ESPIRIT_DEFAULTS, **(espirit_kwargs or {}))
    # Birdcage coils on the 1 mm grid; r=1.5 puts the coil ring just outside the field of view.
    maps = sigpy.mri.birdcage_maps((coils, FOV, FOV), r=1.5).astype(np.complex64)
    manifest = {
        "source": "nilearn MNI152 template, resolution=1",
        "brain_slices": [first, last],
        "size": size,
        "fov_mm": FOV,
        "coils": coils,
        "noise_std": noise,
        "seed": seed,
        "espirit": espirit_kwargs,
        "files": {},
    }
    for kind in kinds:
        k_i = ("singlecoil", "multicoil").index(kind)  # seeds do not depend on which kinds are built
        for s_i, split in enumerate(("train", "val")):
            folder = os.path.join(output_dir, f"{kind}_{split}")
            os.makedirs(folder, exist_ok=True)
            for v, zs in enumerate(layout[split]):
                name = f"demo_{kind}_{split}_{v:03d}.h5"
                t = time.time()
                write_volume(
                    os.path.join(folder, name),
                    vol,
                    zs,
                    size=size,
                    noise=noise,
                    seed=(seed, k_i, s_i, v),
                    coil_maps=maps if kind == "multicoil" else None,
                    patient_id=f"mni152_{kind}_{split}_{v:03d}",
                    espirit_kwargs=espirit_kwargs,
                )
                manifest["files"][f"{kind}_{split}/{name}"] = zs
                log(f"{kind}_{split}/{name}: template slices {zs[0]}..{zs[-1]} ({time.time() - t:.1f} s)")
    tmp = os.path.join(output_dir, f"manifest.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, "manifest.json"))
    return manifest


def scale_statistics(output_dir: str) -> Dict[str, np.ndarray]:
    """max |x| / scale of every slice, per kind: how the intensity scale normalizes the demo images."""
    ratios: Dict[str, List[float]] = {}
    for kind in ("singlecoil", "multicoil"):
        for split in ("train", "val"):
            folder = os.path.join(output_dir, f"{kind}_{split}")
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                with h5py.File(os.path.join(folder, name), "r") as f:
                    for s in range(f["kspace"].shape[0]):
                        k = torch.from_numpy(f["kspace"][s])
                        maps = torch.from_numpy(f["sens_maps"][s]) if "sens_maps" in f else None
                        image = slice_to_image(k, maps)
                        ratios.setdefault(kind, []).append(float(image.abs().max()) / scale_from_kspace(k))
    return {kind: np.asarray(r) for kind, r in ratios.items()}


def folder_size_mb(path: str) -> float:
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
    return total / 2**20


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="demo_data")
    p.add_argument("--size", type=int, default=128, help="matrix size (FOV 240 mm)")
    p.add_argument("--slices_per_volume", type=int, default=10)
    p.add_argument("--train_volumes", type=int, default=6)
    p.add_argument("--val_volumes", type=int, default=2)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.01, help="complex noise std (template max = 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="singlecoil,multicoil", help="comma list of singlecoil, multicoil")
    p.add_argument("--tiny", action="store_true", help="32x32, 2 slices, 2 train + 1 val volumes (tests)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    if args.tiny:
        args.size, args.slices_per_volume, args.train_volumes, args.val_volumes = 32, 2, 2, 1
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    t0 = time.time()
    try:
        build(
            args.output_dir,
            size=args.size,
            slices_per_volume=args.slices_per_volume,
            train_volumes=args.train_volumes,
            val_volumes=args.val_volumes,
            coils=args.coils,
            noise=args.noise,
            seed=args.seed,
            kinds=kinds,
        )
    except ValueError as err:
        print(f"make_demo_data: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.time() - t0
    print(f"built {args.output_dir} in {elapsed:.1f} s, {folder_size_mb(args.output_dir):.1f} MB")
    for kind, r in scale_statistics(args.output_dir).items():
        q = np.percentile(r, [0, 5, 50, 95, 100])
        print(f"{kind}: max|x|/scale over {len(r)} slices: min {q[0]:.2f} p5 {q[1]:.2f} median {q[2]:.2f} "
              f"p95 {q[3]:.2f} max {q[4]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
