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

Synthesized contrasts (``--contrasts``, off by default): extra training folders
``{singlecoil,multicoil}_synth_train/`` made from nilearn's grey- and white-matter probability maps and brain
mask on the template's grid (``load_mni152_gm_template``, ``load_mni152_wm_template``,
``load_mni152_brain_mask``, resolution=1, no download; CSF = mask - GM - WM clipped at 0). Each slice gets
its own tissue intensities, drawn uniformly from the ranges of :data:`CONTRAST_RANGES` (the template's own
T1 has WM 0.87, GM 0.65, CSF 0.28 in the median of pure-tissue voxels); the image is
``i_GM p_GM + i_WM p_WM + i_CSF p_CSF`` (brain only, like the template), at most 1:

=========  ==============  ==============  ==============  =========================
contrast   WM              GM              CSF             order
=========  ==============  ==============  ==============  =========================
t1         0.80 - 0.95     0.55 - 0.70     0.10 - 0.30     WM > GM > CSF
t2         0.30 - 0.45     0.50 - 0.65     0.85 - 1.00     CSF > GM > WM
pd         0.50 - 0.62     0.65 - 0.78     0.80 - 0.95     CSF > GM > WM (flatter)
flair      0.50 - 0.65     0.70 - 0.90     0.00 - 0.10     GM > WM > CSF (suppressed)
=========  ==============  ==============  ==============  =========================

Slices are cut in every ``--orientations`` (axial, coronal: superior up, sagittal: superior up and anterior
left) and simulated exactly like the demo set (smooth phase, no inverse crime, noise, single- and
multi-coil, same keys). Validation stays apart: axial slices come from the brain slices at least
``HOLDOUT_GAP`` slices away from every validation slice. A coronal or sagittal slice crosses every axial
slice, so with ``--synth_holdout slab`` (the default) it is cut from a slab of the brain between (or beyond)
the validation volumes, at least ``MIN_SLAB`` slices thick, with a cosine taper of ``SLAB_TAPER`` slices at
its edges (a slab profile): no synthesized voxel lies within ``HOLDOUT_GAP`` slices of a validation slice,
and those images show part of the brain. (Under the old 3 x 3-block intensity scale those partial images
normalized far above [-1, 1]; the scale now comes from the whole fully sampled k-space, so every training
slice peaks at 0.5.) ``--synth_holdout none`` cuts whole coronal and sagittal slices instead (they pass
through the validation slices' anatomy, in other contrasts and orientations). ``manifest.json`` gets a
``synthetic`` entry with the held-out slices, every file's positions, slabs and intensities.

    python datasets/make_demo_data.py                     # full set (~80 slices per kind)
    python datasets/make_demo_data.py --tiny --output_dir /tmp/demo   # seconds, for tests
    python datasets/make_demo_data.py --contrasts t1,t2,pd,flair --orientations axial,coronal,sagittal
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
from improved_diffusion.io_util import atomic_write, atomic_write_text
from improved_diffusion.mri.fftc import fft2c, ifft2c
from improved_diffusion.script_util import HelpFormatter

FOV = 240  # mm: zero-padded 1 mm grid that holds the whole head (233 mm front to back)
BRAIN_AREA_FRACTION = 0.3  # a slice counts as brain when its area is >= 30% of the largest slice's
TISSUE_LEVEL = 0.05  # template intensity above which a voxel is tissue

# Synthesized contrasts: (low, high) intensity of each tissue, drawn uniformly per slice (module docstring).
CONTRAST_RANGES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "t1": {"wm": (0.80, 0.95), "gm": (0.55, 0.70), "csf": (0.10, 0.30)},
    "t2": {"wm": (0.30, 0.45), "gm": (0.50, 0.65), "csf": (0.85, 1.00)},
    "pd": {"wm": (0.50, 0.62), "gm": (0.65, 0.78), "csf": (0.80, 0.95)},
    "flair": {"wm": (0.50, 0.65), "gm": (0.70, 0.90), "csf": (0.00, 0.10)},
}
TISSUES = ("gm", "wm", "csf")
ORIENTATIONS = ("axial", "coronal", "sagittal")
ACQUISITION_PREFIX = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}
HOLDOUT_GAP = 4  # synthesized images keep |z - z_val| >= 4 to every validation slice (as training volumes)
SYNTH_HOLDOUTS = ("slab", "none")
MIN_SLAB = 32  # thinnest slab (slices) a coronal or sagittal image is cut from
SLAB_TAPER = 4  # slices of cosine taper at each edge of a slab


@functools.lru_cache(maxsize=1)
def load_template() -> np.ndarray:
    """MNI152 T1 template as axial slices (z, AP, LR) float32 in [0, 1], anterior at row 0 (read-only)."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)  # (x, y, z)
    vol = np.transpose(vol, (2, 1, 0))[:, ::-1, :]  # (z, y, x) with y flipped: anterior first
    vol = np.ascontiguousarray(vol / vol.max())
    vol.flags.writeable = False  # cached: shared by every call
    return vol


@functools.lru_cache(maxsize=1)
def load_tissue_maps() -> np.ndarray:
    """GM, WM and CSF fractions (3, z, AP, LR) float32 on the template's grid and orientation (read-only).

    GM and WM probabilities (nilearn, resolution=1) are multiplied by the binary brain mask; CSF is
    ``mask - GM - WM`` clipped at 0, so the three add up to at most 1 inside the mask and are 0 outside.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template

    def axial(img) -> np.ndarray:
        vol = np.asarray(img.get_fdata(), dtype=np.float32)  # (x, y, z), as load_template
        return np.transpose(vol, (2, 1, 0))[:, ::-1, :]

    mask = (axial(load_mni152_brain_mask(resolution=1)) > 0.5).astype(np.float32)
    gm = np.clip(axial(load_mni152_gm_template(resolution=1)), 0, 1) * mask
    wm = np.clip(axial(load_mni152_wm_template(resolution=1)), 0, 1) * mask
    total = gm + wm
    over = total > 1  # rounding (sums of 1 + 3e-8 occur): keep gm + wm <= 1
    gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
    csf = np.clip(mask - gm - wm, 0, None)
    maps = np.ascontiguousarray(np.stack([gm, wm, csf]))
    maps.flags.writeable = False
    return maps


def draw_intensities(rng: np.random.Generator, contrast: str) -> Dict[str, float]:
    """One slice's tissue intensities, each uniform in its :data:`CONTRAST_RANGES` range."""
    return {t: float(rng.uniform(*CONTRAST_RANGES[contrast][t])) for t in TISSUES}


def synthesize(maps: np.ndarray, intensities: Dict[str, float]) -> np.ndarray:
    """``sum_t i_t p_t`` over GM, WM, CSF: maps (3, ...) -> image (...) float32."""
    return sum(np.float32(intensities[t]) * maps[i] for i, t in enumerate(TISSUES)).astype(np.float32)


def oriented(vol: np.ndarray, orientation: str) -> np.ndarray:
    """A (..., z, AP, LR) volume as (..., slice, rows, cols) for ``orientation`` (a view).

    axial: (z, AP, LR), anterior up; coronal: (AP, z, LR), superior up; sagittal: (LR, z, AP), superior up,
    anterior left.
    """
    if orientation == "axial":
        return vol
    flipped = vol[..., ::-1, :, :]  # superior first
    if orientation == "coronal":
        return np.swapaxes(flipped, -3, -2)
    if orientation == "sagittal":
        return np.moveaxis(flipped, -1, -3)
    raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")


def heldout_slices(layout: Dict[str, List[List[int]]], depth: int, gap: int = HOLDOUT_GAP) -> np.ndarray:
    """(depth,) bool: axial slices within ``gap`` - 1 of a validation slice (no synthesized voxel there)."""
    held = np.zeros(depth, bool)
    for zs in layout["val"]:
        for z in zs:
            held[max(0, z - gap + 1) : z + gap] = True
    return held


def slabs(held: np.ndarray, min_slab: int = MIN_SLAB) -> List[Tuple[int, int]]:
    """Runs ``[z0, z1)`` of not-held-out axial slices at least ``min_slab`` long."""
    runs, start = [], None
    for z, h in enumerate(list(held) + [True]):
        if not h and start is None:
            start = z
        elif h and start is not None:
            if z - start >= min_slab:
                runs.append((start, z))
            start = None
    return runs


def slab_profile(depth: int, slab: Tuple[int, int], taper: int = SLAB_TAPER) -> np.ndarray:
    """(depth,) weights: 1 inside ``slab``, a cosine ramp over ``taper`` slices at its edges, 0 outside."""
    z0, z1 = slab
    w = np.zeros(depth, np.float32)
    w[z0:z1] = 1
    for d in range(min(taper, (z1 - z0) // 2)):
        ramp = 0.5 - 0.5 * np.cos(np.pi * (d + 0.5) / taper)
        w[z0 + d] = w[z1 - 1 - d] = ramp
    return w


def synth_sections(
    maps: np.ndarray,
    orientation: str,
    held: np.ndarray,
    first: int,
    last: int,
    count: int,
    rng: np.random.Generator,
    holdout: str = "slab",
) -> List[Tuple[int, Optional[Tuple[int, int]], np.ndarray]]:
    """``count`` tissue-map sections (3, rows, cols) of one orientation that avoid the held-out slices.

    Axial: distinct slices of [first, last] that are not held out. Coronal/sagittal with ``holdout``
    "slab": one slab of :func:`slabs` (chosen with probability proportional to its thickness), weighted by
    :func:`slab_profile`, then distinct positions where the slab holds at least BRAIN_AREA_FRACTION of its
    largest brain area; with "none": whole slices at such positions (they cross the held-out slices).

    Returns:
        ``[(position, slab or None, sections (3, rows, cols) float32), ...]`` sorted by position.
    """
    if orientation == "axial":
        allowed = [z for z in range(first, last + 1) if not held[z]]
        if len(allowed) < count:
            raise ValueError(f"only {len(allowed)} axial slices outside the validation volumes, need {count}")
        picks = sorted(int(z) for z in rng.choice(allowed, size=count, replace=False))
        return [(z, None, np.ascontiguousarray(maps[:, z])) for z in picks]
    if holdout not in SYNTH_HOLDOUTS:
        raise ValueError(f"synth_holdout must be one of {', '.join(SYNTH_HOLDOUTS)}, got {holdout!r}")
    if holdout == "none":
        slab, weight = None, np.ones(maps.shape[1], np.float32)
    else:
        runs = slabs(held)
        if not runs:
            raise ValueError(f"no slab of {MIN_SLAB} slices outside the validation volumes for {orientation}")
        lengths = np.array([z1 - z0 for z0, z1 in runs], float)
        slab = runs[int(rng.choice(len(runs), p=lengths / lengths.sum()))]
        weight = slab_profile(maps.shape[1], slab)
    rows_weight = weight[::-1, None]  # oriented() puts superior (high z) first
    view = oriented(maps, orientation)  # (3, positions, rows, cols)
    brain = (view.sum(axis=0) > 0.5) & (rows_weight > 0.5)
    area = brain.sum(axis=(1, 2))
    candidates = np.nonzero(area >= BRAIN_AREA_FRACTION * area.max())[0]
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} {orientation} positions in slab {slab}, need {count}")
    picks = sorted(int(p) for p in rng.choice(candidates, size=count, replace=False))
    return [(p, slab, np.ascontiguousarray(view[:, p] * rows_weight)) for p in picks]


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
    write_slices(
        path,
        [vol[z] for z in zs],
        size=size,
        noise=noise,
        seed=seed,
        coil_maps=coil_maps,
        patient_id=patient_id,
        espirit_kwargs=espirit_kwargs,
        attrs={"template_slices": np.asarray(zs, np.int32)},
    )


def write_slices(
    path: str,
    slices: Sequence[np.ndarray],
    *,
    size: int,
    noise: float,
    seed: Sequence[int],
    coil_maps: Optional[np.ndarray],
    patient_id: str,
    espirit_kwargs: Dict,
    acquisition: str = "AXT1",
    source: str = "MNI152 2009 T1 template (nilearn), simulated k-space",
    attrs: Optional[Dict] = None,
) -> None:
    """Simulate one volume (file) from 1 mm magnitude slices (rows, cols <= FOV) and write it atomically.

    ``attrs`` are written after ``source`` (the demo volumes' ``template_slices``), before ``noise_std``.
    """
    rng = np.random.default_rng(list(seed))
    kspace = []
    for magnitude in slices:
        fine = pad_to_fov(magnitude)
        image = fine * np.exp(1j * smooth_phase(rng, FOV))
        kspace.append(simulate_kspace(image, size, noise, rng, coil_maps))
    kspace = np.stack(kspace)
    coil_images = ifft2c(torch.from_numpy(kspace)).numpy()
    if coil_maps is None:
        target_key, target = "reconstruction_esc", np.abs(coil_images)
    else:
        target_key, target = "reconstruction_rss", np.sqrt((np.abs(coil_images) ** 2).sum(axis=1))
    target = target.astype(np.float32)
    # gzip with byte shuffling: noisy k-space barely compresses, the maps (zero outside the head) halve.
    packed = dict(compression="gzip", shuffle=True)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=kspace, chunks=(1, *kspace.shape[1:]), **packed)
            f.create_dataset(target_key, data=target, chunks=(1, *target.shape[1:]), **packed)
            f["ismrmrd_header"] = ismrmrd_header(size)
            f.attrs["acquisition"] = acquisition
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
            f.attrs["patient_id"] = patient_id
            f.attrs["source"] = source
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            f.attrs["noise_std"] = noise
            f.attrs["fov_mm"] = FOV
        if coil_maps is not None:
            prepare_fastmri.add_sens_maps(tmp, compression="gzip", **espirit_kwargs)

    atomic_write(path, write)


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
    contrasts: Sequence[str] = (),
    orientations: Sequence[str] = ORIENTATIONS,
    synth_volumes: int = 1,
    synth_holdout: str = "slab",
    log=print,
) -> Dict:
    """Write the demo set; returns the manifest (also saved as ``manifest.json``).

    With ``contrasts`` (names of :data:`CONTRAST_RANGES`) it also writes ``{kind}_synth_train/`` with
    ``synth_volumes`` files of ``slices_per_volume`` slices per (orientation, contrast); see the module
    docstring. Without them the output is what it always was.
    """
    import sigpy.mri

    if size > FOV or size < 8:
        raise ValueError(f"size must be in [8, {FOV}], got {size}")
    unknown = [k for k in kinds if k not in ("singlecoil", "multicoil")]
    if unknown or not kinds:
        raise ValueError(f"kinds must be singlecoil and/or multicoil, got {list(kinds)}")
    bad = [c for c in contrasts if c not in CONTRAST_RANGES]
    if bad:
        raise ValueError(f"contrasts must be among {', '.join(CONTRAST_RANGES)}, got {', '.join(bad)}")
    if contrasts:
        bad = [o for o in orientations if o not in ORIENTATIONS]
        if bad or not orientations:
            raise ValueError(
                f"orientations must be among {', '.join(ORIENTATIONS)}, got {list(orientations)}"
            )
        if synth_volumes < 1:
            raise ValueError(f"synth_volumes must be >= 1, got {synth_volumes}")
        if synth_holdout not in SYNTH_HOLDOUTS:
            raise ValueError(
                f"synth_holdout must be one of {', '.join(SYNTH_HOLDOUTS)}, got {synth_holdout!r}"
            )
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
    if contrasts:
        manifest["synthetic"] = build_synthetic(
            output_dir,
            vol.shape[0],
            first,
            last,
            layout,
            size=size,
            slices_per_volume=slices_per_volume,
            noise=noise,
            seed=seed,
            kinds=kinds,
            contrasts=contrasts,
            orientations=orientations,
            synth_volumes=synth_volumes,
            synth_holdout=synth_holdout,
            coil_maps=maps,
            espirit_kwargs=espirit_kwargs,
            log=log,
        )
    atomic_write_text(os.path.join(output_dir, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def build_synthetic(
    output_dir: str,
    depth: int,
    first: int,
    last: int,
    layout: Dict[str, List[List[int]]],
    *,
    size: int,
    slices_per_volume: int,
    noise: float,
    seed: int,
    kinds: Sequence[str],
    contrasts: Sequence[str],
    orientations: Sequence[str],
    synth_volumes: int,
    coil_maps: np.ndarray,
    synth_holdout: str = "slab",
    espirit_kwargs: Dict,
    log=print,
) -> Dict:
    """Write ``{kind}_synth_train/`` (synthesized contrasts, all orientations); returns its manifest entry.

    Positions, slabs and intensities are drawn per (orientation, contrast, volume) from seed
    ``(seed, 3, o, c, v)`` and shared by the kinds (as the demo volumes share template slices); phase and
    noise per kind from ``(seed, kind, 2, o, c, v)``.
    """
    maps = load_tissue_maps()
    held = heldout_slices(layout, depth)
    entry = {
        "source": "nilearn MNI152 GM/WM probability maps and brain mask, resolution=1; CSF = mask - GM - WM",
        "intensity_ranges": CONTRAST_RANGES,
        "heldout_slices": [int(z) for z in np.nonzero(held)[0]],
        "holdout_gap": HOLDOUT_GAP,
        "holdout": synth_holdout,
        "slabs": [list(r) for r in slabs(held)] if synth_holdout == "slab" else [],
        "files": {},
    }
    plans = {}
    for o_i, orientation in enumerate(ORIENTATIONS):
        if orientation not in orientations:
            continue  # indices from the full list: seeds do not depend on which orientations are built
        for c_i, contrast in enumerate(CONTRAST_RANGES):
            if contrast not in contrasts:
                continue
            for v in range(synth_volumes):
                rng = np.random.default_rng([seed, 3, o_i, c_i, v])
                sections = synth_sections(
                    maps, orientation, held, first, last, slices_per_volume, rng, synth_holdout
                )
                levels = [draw_intensities(rng, contrast) for _ in sections]
                plans[(o_i, orientation, c_i, contrast, v)] = (sections, levels)
    for kind in kinds:
        k_i = ("singlecoil", "multicoil").index(kind)
        folder = os.path.join(output_dir, f"{kind}_synth_train")
        os.makedirs(folder, exist_ok=True)
        for (o_i, orientation, c_i, contrast, v), (sections, levels) in plans.items():
            name = f"synth_{kind}_{orientation}_{contrast}_{v:03d}.h5"
            t = time.time()
            positions = [p for p, _, _ in sections]
            slab = sections[0][1]
            write_slices(
                os.path.join(folder, name),
                [synthesize(sec, lv) for (_, _, sec), lv in zip(sections, levels)],
                size=size,
                noise=noise,
                seed=(seed, k_i, 2, o_i, c_i, v),
                coil_maps=coil_maps if kind == "multicoil" else None,
                patient_id=f"mni152_synth_{kind}_{orientation}_{contrast}_{v:03d}",
                espirit_kwargs=espirit_kwargs,
                acquisition=ACQUISITION_PREFIX[orientation] + contrast.upper(),
                source=f"MNI152 2009 tissue maps (nilearn), synthesized {contrast}, simulated k-space",
                attrs={
                    "orientation": orientation,
                    "contrast": contrast,
                    "positions": np.asarray(positions, np.int32),
                    "slab": np.asarray(slab if slab is not None else (-1, -1), np.int32),
                    "intensities": np.asarray([[lv[t_] for t_ in TISSUES] for lv in levels], np.float32),
                    "intensity_columns": ",".join(TISSUES),
                },
            )
            entry["files"][f"{kind}_synth_train/{name}"] = {
                "orientation": orientation,
                "contrast": contrast,
                "positions": positions,
                "slab": list(slab) if slab is not None else None,
                "intensities": [{t_: round(lv[t_], 4) for t_ in TISSUES} for lv in levels],
            }
            where = f"slab z {slab[0]}..{slab[1] - 1}, " if slab is not None else ""
            log(f"{kind}_synth_train/{name}: {where}positions {positions[0]}..{positions[-1]} "
                f"({time.time() - t:.1f} s)")  # fmt: skip
    return entry


def scale_statistics(output_dir: str) -> Dict[str, np.ndarray]:
    """max |x| / scale of every slice, per kind (``<kind>_synth`` for the synthesized folders): how the
    intensity scale normalizes the demo images."""
    ratios: Dict[str, List[float]] = {}
    for kind in ("singlecoil", "multicoil"):
        for split in ("train", "val", "synth_train"):
            folder = os.path.join(output_dir, f"{kind}_{split}")
            if not os.path.isdir(folder):
                continue
            group = f"{kind}_synth" if split == "synth_train" else kind
            for name in sorted(os.listdir(folder)):
                with h5py.File(os.path.join(folder, name), "r") as f:
                    for s in range(f["kspace"].shape[0]):
                        k = torch.from_numpy(f["kspace"][s])
                        maps = torch.from_numpy(f["sens_maps"][s]) if "sens_maps" in f else None
                        image = slice_to_image(k, maps)
                        ratios.setdefault(group, []).append(float(image.abs().max()) / scale_from_kspace(k))
    return {kind: np.asarray(r) for kind, r in ratios.items()}


def folder_size_mb(path: str) -> float:
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
    return total / 2**20


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--output_dir", type=str, default="demo_data", help="output folder (<kind>_train/, _val/)")
    p.add_argument("--size", type=int, default=128, help="matrix size (FOV 240 mm)")
    p.add_argument("--slices_per_volume", type=int, default=10, help="slices per file")
    p.add_argument("--train_volumes", type=int, default=6, help="training files per kind")
    p.add_argument("--val_volumes", type=int, default=2, help="validation files per kind")
    p.add_argument("--coils", type=int, default=8, help="coils of the multi-coil files")
    p.add_argument("--noise", type=float, default=0.01, help="complex noise std (template max = 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of phases, coil maps and noise")
    p.add_argument(
        "--kinds", type=str, default="singlecoil,multicoil", help="comma list of singlecoil, multicoil"
    )
    p.add_argument("--tiny", action="store_true", help="32x32, 2 slices, 2 train + 1 val volumes (tests)")
    p.add_argument(
        "--contrasts",
        type=str,
        default="",
        help="also build <kind>_synth_train/ with these synthesized contrasts: comma list of "
        f"{', '.join(CONTRAST_RANGES)} ('' = none)",
    )
    p.add_argument(
        "--orientations",
        type=str,
        default=",".join(ORIENTATIONS),
        help="orientations of the synthesized slices (with --contrasts)",
    )
    p.add_argument(
        "--synth_volumes",
        type=int,
        default=1,
        help="synthesized files per (orientation, contrast), each of --slices_per_volume slices",
    )
    p.add_argument(
        "--synth_holdout",
        type=str,
        default="slab",
        choices=SYNTH_HOLDOUTS,
        help="coronal/sagittal: 'slab' keeps every voxel away from the validation slices (partial slices), "
        "'none' cuts whole slices through them",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    if args.tiny:
        args.size, args.slices_per_volume, args.train_volumes, args.val_volumes = 32, 2, 2, 1
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    contrasts = [c.strip().lower() for c in args.contrasts.split(",") if c.strip()]
    orientations = [o.strip().lower() for o in args.orientations.split(",") if o.strip()]
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
            contrasts=contrasts,
            orientations=orientations,
            synth_volumes=args.synth_volumes,
            synth_holdout=args.synth_holdout,
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
