"""Build a held-out fastMRI-format evaluation set from real MR scans the prior never trained on.

The diffusion prior trains on the MNI152 T1 template (``make_demo_data.py``). This set is made of other
acquisitions that ship inside PyPI packages (no download at build time), with other contrasts and
orientations:

====================  ===========================================  ==========================  ===========
file stem             source (file inside the installed package)   contrast                    orientation
====================  ===========================================  ==========================  ===========
dipy_b0_axial         dipy/data/files/S0_10slices.nii.gz           b=0 diffusion EPI (T2-w)    axial
nibabel_bold_axial_a  nibabel/tests/data/example4d.nii.gz, t=0     fMRI EPI (T2*-w)            axial
nibabel_bold_axial_b  nibabel/tests/data/example4d.nii.gz, t=1     fMRI EPI (T2*-w)            axial, rows
                                                                                               and columns
                                                                                               swapped
dipy_t1_coronal       dipy/data/files/t1_coronal_slice.npy         T1-w, skull-stripped        coronal
dipy_dwi_axial        dipy/data/files/test_piesno.nii.gz           b=0 and diffusion-weighted  axial
====================  ===========================================  ==========================  ===========

Simulation (``kspace_simulation.py``, shared with ``make_demo_data.py``): every magnitude slice is cropped
or zero-padded to a square field of view around the head (1.2 x its extent, at least 128 source pixels, so
the output pixel is never finer than the source's), resampled with a cubic spline onto the 240 x 240 fine
grid of the demo set (1.4-1.9x finer than the 128 x 128 output), multiplied by a smooth random phase
(``smooth_phase``) and, for multi-coil, by birdcage coil maps (``sigpy.mri.birdcage_maps``);
``simulate_kspace`` keeps the central 128 x 128 block of its Fourier transform, so there is no inverse
crime. Targets (``reconstruction_esc`` / ``reconstruction_rss``) come from the noiseless k-space. Complex
Gaussian noise with sigma = level x max|k| (max over the volume's noiseless k-space) is then added: white
for single-coil, correlated between coils with covariance sigma^2 Psi, Psi = D R D, for multi-coil. Each
file stores ``noise`` (samples, coils) pure-noise samples (as an ISMRMRD noise scan) and the attrs
``noise_std`` (mean per-coil complex std, E|n|^2 = std^2), ``noise_level`` and ``noise_covariance``; no
``sens_maps`` (maps must be estimated, as on a real scan). See docs/data.md, "Held-out split".

    python datasets/make_heldout_data.py                       # -> heldout_data/ (git-ignored)
    python datasets/make_heldout_data.py --max_volumes 2 --max_slices 2 --output_dir /tmp/h   # seconds
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the modules beside this script
from kspace_simulation import (  # noqa: E402
    FOV,
    birdcage_maps,
    folder_size_mb,
    ismrmrd_header,
    simulate_kspace,
    smooth_phase,
    target_attrs,
    target_from_kspace,
    write_fastmri_file,
)

from improved_diffusion.io_util import atomic_write_text  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

SIZE = 128  # output matrix (the demo size)
FOV_MARGIN = 1.2  # square field of view = 1.2 x the head's largest extent (at least SIZE source pixels)
TISSUE_LEVEL = 0.05  # fraction of the volume max above which a pixel counts as tissue (for the FOV box)
DEFAULT_SIGMAS = (0.001, 0.002, 0.005)
DEFAULT_COILS = (8, 15)
DEFAULT_SINGLECOIL_SIGMAS = (0.002,)
COIL_SCALE_RANGE = (0.7, 1.4)  # per-coil noise std factors, before dividing by their mean
COIL_CORRELATION_RANGE = (0.1, 0.3)  # noise correlation coefficients between coils


# ------------------------------------------------------------------------------------------ sources


def package_file(package: str, *parts: str) -> str:
    """Path of a file shipped inside an installed package; FileNotFoundError with an install hint."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install -e '.[dev]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this {package} version does not ship it")
    return path


def _nifti(package: str, *parts: str) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(package_file(package, *parts)).dataobj, dtype=np.float32)


def _axial(a: np.ndarray) -> np.ndarray:
    """(x, y) slice of a RAS/LAS volume as (rows, cols) = (anterior -> posterior, x)."""
    return np.ascontiguousarray(a.T[::-1])


def _load_b0() -> Tuple[np.ndarray, List[int]]:
    v = _nifti("dipy", "data", "files", "S0_10slices.nii.gz")[..., 0]  # (128, 128, 10) RAS, 2 mm
    return np.stack([_axial(v[:, :, z]) for z in range(v.shape[2])]), list(range(v.shape[2]))


def _load_bold(frame: int, zs: Sequence[int], swap: bool) -> Tuple[np.ndarray, List[int]]:
    v = _nifti("nibabel", "tests", "data", "example4d.nii.gz")[..., frame]  # (128, 96, 24) LAS, 2 mm
    stack = np.stack([_axial(v[:, :, z]) for z in zs])  # (slices, 96 AP, 128 LR)
    if swap:  # rows LR, columns AP: the phase-encode (column) direction becomes anterior-posterior
        stack = np.ascontiguousarray(np.transpose(stack, (0, 2, 1)))
    return stack, list(zs)


def _load_t1() -> Tuple[np.ndarray, List[int]]:
    image = np.load(package_file("dipy", "data", "files", "t1_coronal_slice.npy"))  # (256, 256), superior up
    return image[None].astype(np.float32), [0]


def _load_dwi() -> Tuple[np.ndarray, List[int]]:
    v = _nifti("dipy", "data", "files", "test_piesno.nii.gz")  # (96, 96, 14): one slice, 14 weightings
    # identity affine (orientation not recorded); stored as it is, which puts anterior at row 0
    return np.ascontiguousarray(np.moveaxis(v, 2, 0)), list(range(v.shape[2]))


@dataclass(frozen=True)
class SourceVolume:
    """One held-out volume (one output file per folder)."""

    name: str  # file stem
    source: str  # package file it comes from
    licence: str
    contrast: str
    orientation: str
    acquisition: str  # fastMRI-style acquisition attr
    pixel_mm: float  # source pixel spacing
    spacing_known: bool  # False: the package does not record it, pixel_mm (so fov_mm) is nominal
    load: Callable[[], Tuple[np.ndarray, List[int]]]  # -> (slices, rows, cols) magnitude, source indices


VOLUMES: Tuple[SourceVolume, ...] = (
    SourceVolume(
        "dipy_b0_axial", "dipy/data/files/S0_10slices.nii.gz", "BSD-3-Clause (dipy)",
        "b=0 image of a diffusion EPI scan (T2-weighted)", "axial", "AXT2", 2.0, True, _load_b0,
    ),
    SourceVolume(
        "nibabel_bold_axial_a", "nibabel/tests/data/example4d.nii.gz (frame 0, slices 0-11)", "MIT (nibabel)",
        "fMRI EPI time series (T2*-weighted)", "axial", "AXT2STAR", 2.0, True,
        lambda: _load_bold(0, range(0, 12), swap=False),
    ),
    SourceVolume(
        "nibabel_bold_axial_b", "nibabel/tests/data/example4d.nii.gz (frame 1, slices 12-23)",
        "MIT (nibabel)",
        "fMRI EPI time series (T2*-weighted)", "axial, rows/columns swapped (phase encode AP)", "AXT2STAR",
        2.0, True, lambda: _load_bold(1, range(12, 24), swap=True),
    ),
    SourceVolume(
        "dipy_t1_coronal", "dipy/data/files/t1_coronal_slice.npy", "BSD-3-Clause (dipy)",
        "T1-weighted (skull-stripped)", "coronal", "CORT1", 1.0, False, _load_t1,
    ),
    SourceVolume(
        "dipy_dwi_axial", "dipy/data/files/test_piesno.nii.gz", "BSD-3-Clause (dipy)",
        "diffusion EPI: one slice, 14 weightings (2 bright b=0-like, 12 diffusion-weighted)", "axial",
        "AXDWI", 1.0, False, _load_dwi,
    ),
)  # fmt: skip


def pick_slices(n: int, max_slices: Optional[int]) -> List[int]:
    """Evenly spaced indices into n slices (all of them when max_slices is None or >= n)."""
    if max_slices is None or max_slices >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_slices)})


def square_box(stack: np.ndarray) -> Tuple[int, int, int]:
    """(top, left, side) of a square around the head, centred on it, in source pixels.

    side = FOV_MARGIN x the head's largest extent, but at least SIZE: the output pixel is never finer
    than the source pixel, so the outer k-space holds the scan's own detail, not interpolation.
    The square may reach outside the image (zero-padded by ``to_fine_grid``).
    """
    tissue = stack.max(axis=0) > TISSUE_LEVEL * stack.max()
    rows, cols = np.nonzero(tissue.any(axis=1))[0], np.nonzero(tissue.any(axis=0))[0]
    if rows.size == 0:
        raise ValueError("source volume has no tissue")
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    side = int(max(SIZE, np.ceil(FOV_MARGIN * extent)))
    centre_r, centre_c = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    return int(round(centre_r - side / 2)), int(round(centre_c - side / 2)), side


def to_fine_grid(image: np.ndarray, box: Tuple[int, int, int]) -> np.ndarray:
    """Crop/zero-pad the square ``box`` and resample it to FOV x FOV with a cubic spline (>= 0)."""
    from scipy.ndimage import zoom

    top, left, side = box
    sq = np.zeros((side, side), np.float32)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, image.shape[0]), min(left + side, image.shape[1])
    sq[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    fine = zoom(sq.astype(np.float64), FOV / side, order=3, mode="grid-constant", cval=0.0, grid_mode=True)
    return np.clip(fine, 0, None).astype(np.float32)


# -------------------------------------------------------------------------------------- noise model


def coil_noise_covariance(coils: int, rng: np.random.Generator) -> np.ndarray:
    """Psi = D R D (coils x coils, complex128, mean of sqrt(diag) = 1).

    D: per-coil std factors uniform in COIL_SCALE_RANGE divided by their mean; R: real correlation matrix
    with off-diagonal coefficients uniform in COIL_CORRELATION_RANGE (shrunk toward the identity until it
    is positive definite, which the default ranges do not need up to at least 32 coils).
    """
    s = rng.uniform(*COIL_SCALE_RANGE, size=coils)
    s = s / s.mean()
    rho = rng.uniform(*COIL_CORRELATION_RANGE, size=(coils, coils))
    r = np.triu(rho, 1)
    r = r + r.T + np.eye(coils)
    while np.linalg.eigvalsh(r).min() < 0.05:
        r = 0.9 * r + 0.1 * np.eye(coils)
    return (s[:, None] * r * s[None, :]).astype(np.complex128)


def complex_normal(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """Circular complex Gaussian with E|z|^2 = 1."""
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)


def correlated_noise(rng: np.random.Generator, chol: np.ndarray, sigma: float, shape) -> np.ndarray:
    """Noise with coil axis first: shape (C, ...) and covariance sigma^2 chol chol^H between coils."""
    z = complex_normal(rng, tuple(shape))
    return sigma * np.tensordot(chol, z, axes=(1, 0))


# --------------------------------------------------------------------------------------- simulation


def level_key(level: float) -> int:
    """Integer seed part of a noise level (seeds depend on the level's value, not on the flag order)."""
    return int(round(level * 1e6))


def noiseless_kspace(
    fine: np.ndarray, indices: Sequence[int], *, seed: int, v: int, coil_maps: Optional[np.ndarray]
) -> np.ndarray:
    """(slices, [C,] SIZE, SIZE) complex64 noiseless k-space; the phase of each slice is seeded per slice."""
    out = []
    for image, s in zip(fine, indices):
        phase = smooth_phase(np.random.default_rng([seed, v, s, 0]), FOV)
        image = image * np.exp(1j * phase)
        out.append(simulate_kspace(image, SIZE, 0.0, np.random.default_rng(0), coil_maps))  # noise 0
    return np.stack(out)


def noisy_copy(
    clean: np.ndarray, indices: Sequence[int], *, level: float, seed: int, v: int, samples: int
) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """Add noise to ``clean`` k-space; returns (kspace, noise samples (samples, C), noise attrs)."""
    multicoil = clean.ndim == 4
    coils = clean.shape[1] if multicoil else 1
    sigma = float(level * np.abs(clean).max())
    psi = coil_noise_covariance(coils, np.random.default_rng([seed, v, coils, 1])) if multicoil else np.eye(1)
    chol = np.linalg.cholesky(psi)
    lk = level_key(level)
    noisy = np.empty_like(clean)
    for i, s in enumerate(indices):
        rng = np.random.default_rng([seed, v, s, coils, lk])
        shape = clean.shape[1:] if multicoil else (1, *clean.shape[1:])
        n = correlated_noise(rng, chol, sigma, shape)
        noisy[i] = clean[i] + (n if multicoil else n[0])
    rng = np.random.default_rng([seed, v, coils, lk, 7])  # the noise scan
    scan = correlated_noise(rng, chol, sigma, (coils, samples)).T.astype(np.complex64)
    attrs = {
        "noise_std": sigma * float(np.sqrt(np.real(np.diag(psi))).mean()),  # = sigma (D has mean 1)
        "noise_level": level,
        "noise_covariance": (sigma**2 * psi).astype(np.complex128),
        "kspace_max": float(np.abs(clean).max()),
    }
    return noisy.astype(np.complex64), scan, attrs


def write_file(
    path: str, kspace: np.ndarray, target_key: str, target: np.ndarray, scan: np.ndarray, attrs: Dict
):
    """One held-out file: k-space, target, the ``noise`` scan and ``attrs``, written atomically."""
    write_fastmri_file(
        path,
        kspace,
        target_key,
        target,
        ismrmrd_header(SIZE, attrs["fov_mm"]),
        {**target_attrs(target), **attrs},
        # gzip level 1 with byte shuffling: noisy k-space shrinks ~14% at any level, level 1 is the fastest.
        packed=dict(compression="gzip", compression_opts=1, shuffle=True),
        datasets={"noise": scan},
    )


def folder_name(coils: int, level: float) -> str:
    return f"singlecoil_sigma{level:g}" if coils == 1 else f"multicoil{coils}_sigma{level:g}"


def _check_levels(levels: Sequence[float], flag: str) -> None:
    for level in levels:
        if not (np.isfinite(level) and 0 <= level < 1):
            raise ValueError(f"--{flag}: noise levels must be in [0, 1), got {level}")


def build(
    output_dir: str = "heldout_data",
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    coils: Sequence[int] = DEFAULT_COILS,
    singlecoil_sigmas: Sequence[float] = DEFAULT_SINGLECOIL_SIGMAS,
    max_volumes: Optional[int] = None,
    max_slices: Optional[int] = 6,
    noise_samples: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> Dict:
    """Write the held-out set; returns the manifest (also saved as ``manifest.json``)."""
    from tqdm import tqdm

    _check_levels(sigmas, "sigmas")
    _check_levels(singlecoil_sigmas, "singlecoil_sigmas")
    if any(c < 2 for c in coils):
        raise ValueError(f"--coils: multi-coil needs >= 2 coils, got {list(coils)}")
    if max_volumes is not None and max_volumes < 1:
        raise ValueError(f"--max_volumes must be >= 1, got {max_volumes}")
    if max_slices is not None and max_slices < 1:
        raise ValueError(f"--max_slices must be >= 1, got {max_slices}")
    if noise_samples < 2:
        raise ValueError(f"--noise_samples must be >= 2, got {noise_samples}")
    if not (sigmas and coils) and not singlecoil_sigmas:
        raise ValueError("nothing to build: give --sigmas with --coils, or --singlecoil_sigmas")
    volumes = VOLUMES[:max_volumes]
    kinds = [(1, list(singlecoil_sigmas))] + ([(c, list(sigmas)) for c in coils] if sigmas else [])
    kinds = [(c, lv) for c, lv in kinds if lv]
    maps = {c: birdcage_maps(c) for c in coils}
    manifest = {
        "sources": {},
        "size": SIZE,
        "fine_grid": FOV,
        "seed": seed,
        "noise_samples": noise_samples,
        "folders": {folder_name(c, lv): [] for c, levels in kinds for lv in levels},
    }
    steps = len(volumes) * sum(len(levels) for _, levels in kinds)
    bar = tqdm(total=steps, desc="heldout", unit="file", disable=not progress)
    for vol in volumes:
        v = VOLUMES.index(vol)  # seeds depend on the volume, not on how many are built
        stack, source_idx = vol.load()
        stack = np.clip(stack, 0, None)
        stack = stack / stack.max()
        box = square_box(stack)
        keep = pick_slices(len(stack), max_slices)
        indices = [source_idx[i] for i in keep]
        fine = np.stack([to_fine_grid(stack[i], box) for i in keep])
        fov_mm = box[2] * vol.pixel_mm
        manifest["sources"][vol.name] = {
            "source": vol.source,
            "licence": vol.licence,
            "contrast": vol.contrast,
            "orientation": vol.orientation,
            "source_shape": list(stack.shape),
            "source_slices": indices,
            "fov_box": list(box),
            "fov_mm": fov_mm,
            "fov_mm_nominal": not vol.spacing_known,
        }
        for c, levels in kinds:
            clean = noiseless_kspace(fine, indices, seed=seed, v=v, coil_maps=maps.get(c))
            target_key, target = target_from_kspace(clean)
            for level in levels:
                folder = os.path.join(output_dir, folder_name(c, level))
                os.makedirs(folder, exist_ok=True)
                kspace, scan, noise_attrs = noisy_copy(
                    clean, indices, level=level, seed=seed, v=v, samples=noise_samples
                )
                attrs = {
                    "acquisition": vol.acquisition,
                    "patient_id": f"heldout_{vol.name}",
                    "source": f"{vol.source}, simulated k-space",
                    "licence": vol.licence,
                    "contrast": vol.contrast,
                    "orientation": vol.orientation,
                    "source_slices": np.asarray(indices, np.int32),
                    "fov_mm": float(fov_mm),
                    "fov_mm_nominal": not vol.spacing_known,
                    "pixel_mm": float(fov_mm / SIZE),
                    "coils": c,
                    "seed": seed,
                    **noise_attrs,
                }
                name = f"heldout_{vol.name}.h5"
                write_file(os.path.join(folder, name), kspace, target_key, target, scan, attrs)
                manifest["folders"][folder_name(c, level)].append(name)
                bar.update(1)
    bar.close()
    atomic_write_text(os.path.join(output_dir, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


# ------------------------------------------------------------------------------------------------ CLI


def _floats(text: str) -> List[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr (``make_heldout_data: error: ...``, exit 2), without the usage."""

    def error(self, message):
        self.exit(2, f"make_heldout_data: error: {message} (see --help)\n")


def create_argparser() -> argparse.ArgumentParser:
    p = _OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--output_dir", type=str, default="heldout_data", help="output folder")
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=list(DEFAULT_SIGMAS),
        help="multi-coil noise levels, comma list: sigma = level x max|k| of the volume",
    )
    p.add_argument(
        "--coils", type=_ints, default=list(DEFAULT_COILS), help="multi-coil coil counts, comma list"
    )
    p.add_argument(
        "--singlecoil_sigmas",
        type=_floats,
        default=list(DEFAULT_SINGLECOIL_SIGMAS),
        help="single-coil noise levels, comma list; empty string for none",
    )
    p.add_argument(
        "--max_volumes",
        type=int,
        default=None,
        help=f"only the first N of the {len(VOLUMES)} volumes (None: all)",
    )
    p.add_argument("--max_slices", type=int, default=6, help="at most N evenly spaced slices per volume")
    p.add_argument("--all_slices", action="store_true", help="every source slice (overrides --max_slices)")
    p.add_argument("--noise_samples", type=int, default=1024, help="pure-noise samples per coil in 'noise'")
    p.add_argument("--seed", type=int, default=0, help="seed of phases, coil noise covariances and noise")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    t0 = time.time()
    try:
        build(
            args.output_dir,
            sigmas=args.sigmas,
            coils=args.coils,
            singlecoil_sigmas=args.singlecoil_sigmas,
            max_volumes=args.max_volumes,
            max_slices=None if args.all_slices else args.max_slices,
            noise_samples=args.noise_samples,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        print(f"make_heldout_data: error: {err}", file=sys.stderr)
        return 2
    print(f"built {args.output_dir} in {time.time() - t0:.1f} s, {folder_size_mb(args.output_dir):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
