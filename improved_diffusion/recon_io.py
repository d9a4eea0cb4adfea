"""Input and output of the reconstruction scripts (scripts/image_sample.py, scripts/baseline_recon.py).

Inputs are fastMRI-format h5 files (see docs/reconstruction.md):

* ``kspace`` (slices, H, W) single-coil or (slices, coils, H, W) multi-coil, complex;
* optional ``mask``: the file is already undersampled (fastMRI test/challenge files; a 1-D column mask
  ``(W,)`` or a 2-D mask ``(H, W)``) and is used as it is; otherwise the file is fully sampled and is
  undersampled retrospectively here with a mask from :mod:`improved_diffusion.mri.subsample`
  (one mask per volume, seeded from the file name by default, as fastMRI's validation masks);
* optional ``sens_maps`` (same shape as ``kspace``), otherwise maps are estimated per slice with
  :func:`improved_diffusion.mri.espirit.estimate_sens_maps` from the sampled k-space centre;
* optional ``noise``: a noise scan ``(samples, coils)`` (or ``(samples,)`` single-coil), complex, as
  ISMRMRD raw data carry; otherwise the noise is estimated from the data
  (:mod:`improved_diffusion.mri.noise`), unless ``--noise_std`` gives it;
* optional target ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil).

Outputs per input file, same file name, in the output folder (all written atomically):

* ``<name>.h5``: ``reconstruction`` (slices, h, w) float32 magnitude at the target's crop (the full image
  when there is no target), ``reconstruction_std`` (same shape), ``reconstruction_complex``
  (slices, H, W) complex64 on the reconstruction grid (readout cropped to the FOV), ``mask``; attrs
  describe the method and the run, with per
  slice ``noise_std`` (complex std of a whitened k-space sample), ``noise_residual_ratio``
  (``‖A x − y‖ / (noise_std sqrt(N))``, about 1 when the output fits the data to the noise level) and
  ``calib_misfit`` (how well the maps explain the calibration data, 1 = to the noise level);
* ``png/<stem>_sliceNNN.png`` previews: zero-filled | reconstruction | target | |error| | std;
* ``metrics/<stem>.csv`` per-slice and per-volume NMSE/PSNR/SSIM against the target, and a summary
  ``metrics.csv`` over all volumes in the folder.
"""

import csv
import hashlib
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from . import dist_util
from .fastmri_data import BadFileError
from .mri import metrics as mri_metrics
from .mri.fov import output_crop, recon_matrix
from .mri.subsample import MASK_TYPES, create_mask_for_mask_type, effective_acceleration, seed_from_fname

KSPACE_KEY = "kspace"
MASK_KEY = "mask"
MAPS_KEY = "sens_maps"
NOISE_KEY = "noise"
TARGET_KEYS = {True: "reconstruction_rss", False: "reconstruction_esc"}  # by multicoil
METRIC_FIELDS = ("file", "slice", "target", "nmse", "psnr", "ssim", "noise_residual_ratio")


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class MaskSpec:
    """How fully sampled files are undersampled (ignored for files that carry a ``mask``).

    Attributes:
        mask_type: one of ``random``, ``equispaced``, ``equispaced_fraction``, ``poisson``.
        center_fractions: fastMRI's centre fractions, one per acceleration.
        accelerations: nominal accelerations.
        seed: mask seed; ``None`` (or < 0) seeds every file from its name (fastMRI's validation masks).
    """

    mask_type: str = "random"
    center_fractions: Sequence[float] = (0.08,)
    accelerations: Sequence[float] = (4.0,)
    seed: Optional[int] = None

    def validate(self) -> None:
        """Raise ValueError naming the bad flag."""
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"--mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        create_mask_for_mask_type(self.mask_type, self.center_fractions, self.accelerations)


def _float_list(text: Any, flag: str) -> List[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{flag}: no value given")
    return values


def mask_spec_from_args(args: Any) -> MaskSpec:
    """MaskSpec from the scripts' flags ``mask_type``, ``center_fractions``, ``accelerations``, ``seed``."""
    spec = MaskSpec(
        mask_type=args.mask_type,
        center_fractions=_float_list(args.center_fractions, "center_fractions"),
        accelerations=_float_list(args.accelerations, "accelerations"),
        seed=None if int(args.seed) < 0 else int(args.seed),
    )
    spec.validate()
    return spec


@dataclass
class Volume:
    """One input file, validated, with its mask (k-space slices are read on demand).

    Attributes:
        path: the h5 file.
        name: its base name (also the output's name).
        num_slices, num_coils (0 = single-coil), shape (H, W) of the k-space.
        mask: float32 mask broadcastable to a slice's k-space: ``(W,)`` columns or ``(H, W)``.
        mask_type: the mask type, or ``"file"`` when the file carried its mask.
        acceleration: nominal acceleration; effective_acceleration: points / sampled points.
        num_low_frequencies: fully sampled centre columns (None when unknown).
        has_maps: the file holds ``sens_maps``.
        has_noise: the file holds a ``noise`` scan.
        target_key: the target dataset in the file, or None.
        target_shape: (h, w) of the output crop: the target's (fastMRI's ``(W, W)`` when the k-space is
            narrower, :func:`~improved_diffusion.mri.fov.output_crop`), or the k-space shape without one.
        recon_rows: rows of the reconstruction field of view (``ismrmrd_header`` reconSpace, else the
            target's rows), or None.
    """

    path: str
    name: str
    num_slices: int
    num_coils: int
    shape: Tuple[int, int]
    mask: np.ndarray
    mask_type: str
    acceleration: float
    effective_acceleration: float
    num_low_frequencies: Optional[int]
    has_maps: bool
    has_noise: bool
    target_key: Optional[str]
    target_shape: Tuple[int, int]
    recon_rows: Optional[int] = None

    @property
    def multicoil(self) -> bool:
        return self.num_coils > 0

    def read_kspace(self, slice_idx: int) -> np.ndarray:
        """Masked k-space of one slice: ``(H, W)`` or ``(C, H, W)`` complex64."""
        with h5py.File(self.path, "r") as f:
            kspace = np.asarray(f[KSPACE_KEY][slice_idx], dtype=np.complex64)
        return (kspace * self.mask).astype(np.complex64)

    def read_maps(self, slice_idx: int) -> Optional[np.ndarray]:
        """The file's maps of one slice ``(C, H, W)`` complex64, or None."""
        if not self.has_maps:
            return None
        with h5py.File(self.path, "r") as f:
            return np.asarray(f[MAPS_KEY][slice_idx], dtype=np.complex64)

    def read_noise(self) -> Optional[np.ndarray]:
        """The file's noise scan ``(samples, coils)`` complex, or None."""
        if not self.has_noise:
            return None
        with h5py.File(self.path, "r") as f:
            noise = np.asarray(f[NOISE_KEY][()])
        return noise.reshape(-1, 1) if noise.ndim == 1 else noise

    def read_target(self) -> Optional[np.ndarray]:
        """The target volume ``(slices, h, w)`` float32, or None."""
        if self.target_key is None:
            return None
        with h5py.File(self.path, "r") as f:
            return center_crop_np(np.asarray(f[self.target_key][()], dtype=np.float32), self.target_shape)


def list_inputs(inputs: Sequence[str]) -> List[str]:
    """h5 files from a list of files and/or folders (folders searched recursively), sorted, unique."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in files if f.endswith((".h5", ".hdf5")))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise BadFileError(f"{item}: no such file or folder")
    out = sorted(set(found))
    if not out:
        raise BadFileError(f"{', '.join(inputs)}: no .h5 files found")
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def open_volume(path: str, spec: MaskSpec) -> Volume:
    """Validate one input file and build (or read) its mask.

    Raises:
        BadFileError: one line ``"<path>: <problem>"`` (unreadable file, missing/ill-shaped keys, a mask or
            maps that do not match the k-space).
    """

    def bad(problem: str) -> BadFileError:
        return BadFileError(f"{path}: {problem}")

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise bad(f"not a readable HDF5 file: {_first_line(err)}") from None
    try:
        with f:
            if KSPACE_KEY not in f:
                raise bad(f"missing key '{KSPACE_KEY}' (keys: {sorted(f.keys())})")
            ksp = f[KSPACE_KEY]
            if not isinstance(ksp, h5py.Dataset) or ksp.dtype.kind != "c":
                raise bad(f"'{KSPACE_KEY}' must be a complex dataset, got {getattr(ksp, 'dtype', type(ksp))}")
            if ksp.ndim not in (3, 4) or 0 in ksp.shape:
                raise bad(f"'{KSPACE_KEY}' must be (slices, H, W) or (slices, coils, H, W), got {ksp.shape}")
            num_coils = int(ksp.shape[1]) if ksp.ndim == 4 else 0
            shape = (int(ksp.shape[-2]), int(ksp.shape[-1]))
            has_maps = MAPS_KEY in f
            if has_maps:
                maps = f[MAPS_KEY]
                if num_coils == 0:
                    raise bad(f"'{MAPS_KEY}' given for single-coil k-space {ksp.shape}")
                if maps.dtype.kind != "c" or maps.shape != ksp.shape:
                    raise bad(
                        f"'{MAPS_KEY}' {maps.shape} {maps.dtype} does not match '{KSPACE_KEY}' {ksp.shape} "
                        "(complex maps, one per coil, are needed)"
                    )
            has_noise = NOISE_KEY in f
            if has_noise:
                noise = f[NOISE_KEY]
                coils = max(num_coils, 1)
                if (
                    noise.dtype.kind != "c"
                    or noise.ndim not in (1, 2)
                    or (noise.ndim == 2 and noise.shape[1] != coils)
                ):
                    raise bad(
                        f"'{NOISE_KEY}' {noise.shape} {noise.dtype} must be a complex noise scan "
                        f"(samples, {coils})"
                    )
            if MASK_KEY in f:
                mask, mask_type, num_low = _file_mask(np.asarray(f[MASK_KEY][()]), shape, bad), "file", None
                acceleration = float(f.attrs.get("acceleration", effective_acceleration(mask, shape)))
                if "num_low_frequency" in f.attrs:
                    num_low = int(f.attrs["num_low_frequency"])
            else:
                seed = seed_from_fname(path) if spec.seed is None or spec.seed < 0 else int(spec.seed)
                func = create_mask_for_mask_type(spec.mask_type, spec.center_fractions, spec.accelerations)
                try:
                    mask_t, num_low = func(tuple(ksp.shape), seed=seed)
                except ValueError as err:
                    raise bad(f"cannot build a {spec.mask_type} mask: {_first_line(err)}") from None
                mask = mask_t.numpy().astype(np.float32)
                # Column masks come as (1, ..., 1, W), Poisson masks as (H, W).
                mask = mask.reshape(shape) if mask.shape[-2:] == shape else mask.reshape(-1)
                mask_type = spec.mask_type
                # With several accelerations the mask function drew one; the effective value then stands in.
                nominal = spec.accelerations[0] if len(spec.accelerations) == 1 else None
                acceleration = float(nominal) if nominal else effective_acceleration(mask, shape)
            target_key = TARGET_KEYS[num_coils > 0]
            target_shape = shape
            if target_key in f:
                tgt = f[target_key]
                if tgt.ndim != 3 or tgt.shape[0] != ksp.shape[0]:
                    raise bad(f"target '{target_key}' {tgt.shape} does not match {ksp.shape[0]} slices")
                try:
                    target_shape = output_crop((int(tgt.shape[1]), int(tgt.shape[2])), shape)
                except ValueError as err:
                    raise bad(f"target '{target_key}': {err}") from None
            else:
                target_key = None
            header_matrix = recon_matrix(f["ismrmrd_header"][()]) if "ismrmrd_header" in f else None
            recon_rows = header_matrix[0] if header_matrix else (int(tgt.shape[1]) if target_key else None)
            eff = effective_acceleration(mask, shape)
    except BadFileError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise bad(f"unreadable: {_first_line(err)}") from None
    return Volume(
        path=path,
        name=os.path.basename(path),
        num_slices=int(ksp.shape[0]),
        num_coils=num_coils,
        shape=shape,
        mask=mask,
        mask_type=mask_type,
        acceleration=acceleration,
        effective_acceleration=eff,
        num_low_frequencies=None if num_low is None else int(num_low),
        has_maps=has_maps,
        has_noise=has_noise,
        target_key=target_key,
        target_shape=target_shape,
        recon_rows=recon_rows,
    )


def _file_mask(mask: np.ndarray, shape: Tuple[int, int], bad: Callable[[str], BadFileError]) -> np.ndarray:
    """A file's mask as ``(W,)`` or ``(H, W)`` float32 0/1, checked against the k-space (H, W)."""
    mask = np.asarray(mask)
    squeezed = mask.reshape([s for s in mask.shape if s != 1]) if mask.ndim > 1 else mask
    if squeezed.ndim == 1 and squeezed.shape[0] == shape[1]:
        out = squeezed
    elif squeezed.ndim == 2 and squeezed.shape == shape:
        out = squeezed
    else:
        raise bad(
            f"'{MASK_KEY}' of shape {mask.shape} does not match the k-space (H, W) = {shape}; expected "
            f"({shape[1]},) columns or {shape}"
        )
    out = (out != 0).astype(np.float32)
    if not out.any():
        raise bad(f"'{MASK_KEY}' samples no k-space point")
    return out


# ---------------------------------------------------------------------------------------------- outputs


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    A crash leaves either the old file or none, never a partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def center_crop_np(x: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Center-crop the last two dims of a numpy array (fastMRI's rounding, as mri.fftc.center_crop)."""
    h, w = x.shape[-2:]
    ch, cw = shape
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def write_recon_h5(
    path: str,
    reconstruction: np.ndarray,
    reconstruction_std: np.ndarray,
    reconstruction_complex: np.ndarray,
    mask: np.ndarray,
    attrs: Dict[str, Any],
) -> None:
    """Write one output volume (see the module docstring) atomically."""

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("reconstruction", data=reconstruction.astype(np.float32))
            f.create_dataset("reconstruction_std", data=reconstruction_std.astype(np.float32))
            f.create_dataset("reconstruction_complex", data=reconstruction_complex.astype(np.complex64))
            f.create_dataset("mask", data=mask.astype(np.float32))
            for key, value in attrs.items():
                f.attrs[key] = "" if value is None else value

    atomic_write(path, write)


def write_csv(path: str, rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> None:
    """Write rows (dicts) as CSV with a header, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)

    atomic_write(path, write)


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _to_uint8(img: np.ndarray, vmax: float) -> np.ndarray:
    return (np.clip(img / max(vmax, 1e-12), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_preview_png(path: str, panels: Sequence[Tuple[str, Optional[np.ndarray], float]]) -> None:
    """Side-by-side grayscale PNG of labelled magnitude panels ``(title, image (h, w) or None, vmax)``.

    Panels that are None are skipped; each is scaled to [0, vmax].
    """
    from PIL import Image, ImageDraw  # lazy: only the scripts write previews

    panels = [(t, p, v) for t, p, v in panels if p is not None]
    # Small images are enlarged (nearest neighbour) so the labels fit.
    zoom = max(1, -(-128 // max(p.shape[0] for _, p, _ in panels)))
    if zoom > 1:
        panels = [(t, np.kron(p, np.ones((zoom, zoom))), v) for t, p, v in panels]
    h = max(p.shape[0] for _, p, _ in panels)
    gap, label_h = 4, 14
    width = sum(p.shape[1] for _, p, _ in panels) + gap * (len(panels) - 1)
    canvas = Image.new("L", (width, h + label_h), color=0)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, img, vmax in panels:
        canvas.paste(Image.fromarray(_to_uint8(img, vmax)), (x, label_h))
        draw.text((x + 2, 1), title, fill=255)
        x += img.shape[1] + gap

    def write(tmp: str) -> None:
        canvas.save(tmp, format="PNG")

    atomic_write(path, write)


def metric_rows(
    name: str, target: np.ndarray, recon: np.ndarray, target_key: str, noise_ratio: Sequence[float]
) -> List[Dict[str, Any]]:
    """Per-slice rows and one ``volume`` row of NMSE/PSNR/SSIM (fastMRI's: data range = volume max), with
    each slice's ``noise_residual_ratio`` (the volume row: their mean)."""
    maxval = float(target.max())
    rows = []
    for i in range(target.shape[0]):
        m = mri_metrics.volume_metrics(target[i : i + 1], recon[i : i + 1], maxval=maxval)
        rows.append(
            {"file": name, "slice": i, "target": target_key, **m, "noise_residual_ratio": noise_ratio[i]}
        )
    m = mri_metrics.volume_metrics(target, recon)
    rows.append(
        {
            "file": name,
            "slice": "volume",
            "target": target_key,
            **m,
            "noise_residual_ratio": _nanmean(noise_ratio),
        }
    )
    return rows


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def write_metrics_summary(output_dir: str) -> Optional[str]:
    """Collect the volume rows of ``metrics/*.csv`` into ``metrics.csv`` (returns its path, or None)."""
    folder = os.path.join(output_dir, "metrics")
    if not os.path.isdir(folder):
        return None
    rows = []
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".csv"):
            rows.extend(r for r in read_csv(os.path.join(folder, fname)) if r["slice"] == "volume")
    if not rows:
        return None
    path = os.path.join(output_dir, "metrics.csv")
    write_csv(path, rows, METRIC_FIELDS)
    return path


# ------------------------------------------------------------------------------------------ the file loop


@dataclass
class SliceInput:
    """What one slice's reconstruction gets from its file (numpy, as measured: not yet whitened).

    Attributes:
        kspace: masked k-space ``(H, W)`` or ``(C, H, W)`` complex64.
        mask: the volume's mask, broadcastable to ``(H, W)``.
        maps: the file's ``sens_maps`` of this slice ``(C, H, W)``, or None (estimate them).
        noise_scan: the file's ``noise`` scan ``(samples, coils)``, or None.
        noise_std: the ``--noise_std`` override (None: not given).
    """

    kspace: np.ndarray
    mask: np.ndarray
    maps: Optional[np.ndarray] = None
    noise_scan: Optional[np.ndarray] = None
    noise_std: Optional[float] = None


@dataclass
class SliceOutput:
    """One reconstructed slice (numpy, full k-space grid, the input's intensity units).

    ``magnitude`` is what the output's ``reconstruction`` holds: the RSS-equivalent magnitude for
    multi-coil data (:mod:`improved_diffusion.mri.coils`), ``|mean|`` for single-coil data.
    """

    mean: np.ndarray  # (H, W) complex
    magnitude: np.ndarray  # (H, W) real
    std: np.ndarray  # (H, W) real
    zero_filled: np.ndarray  # (H, W) real magnitude
    seconds: float = 0.0
    nfe: int = 0
    residual: float = float("nan")
    noise_std: float = float("nan")
    noise_source: str = ""
    noise_ratio: float = float("nan")
    calib_misfit: float = float("nan")


@dataclass
class RunResult:
    """What :func:`run_files` did: written outputs, skipped ones, and per-volume summaries."""

    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    summaries: List[Dict[str, Any]] = field(default_factory=list)


def output_path(output_dir: str, volume_name: str) -> str:
    return os.path.join(output_dir, volume_name)


def seed_for_slice(seed: int, fname: str, slice_idx: int) -> int:
    """A seed per (run seed, file name, slice), so samples do not depend on how work is sharded."""
    text = f"{int(seed)}:{os.path.basename(str(fname))}:{int(slice_idx)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:7], "little")


def run_files(
    paths: Sequence[str],
    spec: MaskSpec,
    output_dir: str,
    reconstruct: Callable[[Volume, int, SliceInput], SliceOutput],
    method_attrs: Dict[str, Any],
    overwrite: bool = False,
    noise_std: Optional[float] = None,
    png: bool = True,
    max_png_per_file: int = 4,
    progress: bool = True,
) -> RunResult:
    """Reconstruct every slice of every file and write the outputs (the shared loop of the scripts).

    Every file is validated first (all bad files are reported, one line each, before any work). Slices of
    a file are sharded over the ranks (slice i on rank i % world_size) and gathered on rank 0, which
    writes the outputs; files whose output exists are skipped unless ``overwrite``.

    Args:
        paths: input h5 files.
        spec: retrospective masking of fully sampled files.
        output_dir: output folder.
        reconstruct: ``reconstruct(volume, slice_idx, SliceInput) -> SliceOutput``; a ValueError it raises
            is reported as ``<file>: slice <i>: <message>``.
        method_attrs: attrs written to each output h5 (``method`` and its options).
        overwrite: redo files whose output exists.
        noise_std: complex noise std overriding the files' noise scans and the estimate (None: not given).
        png, max_png_per_file: previews (evenly spaced slices, at most this many per file).
        progress: tqdm bar over slices on rank 0.

    Raises:
        BadFileError: listing every bad input file (one line each).
    """
    rank, world = dist_util.get_rank(), max(dist_util.get_world_size(), 1)
    volumes, errors = [], []
    for path in paths:
        try:
            volumes.append(open_volume(path, spec))
        except BadFileError as err:
            errors.append(str(err))
    if errors:
        raise BadFileError("\n".join(errors))
    names = [v.name for v in volumes]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise BadFileError(f"{', '.join(dupes)}: several inputs share this file name (outputs would collide)")
    # Rank 0 decides what to skip, so ranks agree even while rank 0 is writing.
    pending = [v.name for v in volumes if overwrite or not os.path.exists(output_path(output_dir, v.name))]
    pending = dist_util.broadcast_object(pending)
    result = RunResult(skipped=[v.name for v in volumes if v.name not in pending])
    todo = [v for v in volumes if v.name in pending]
    total = sum(len(range(rank, v.num_slices, world)) for v in todo)
    bar = None
    if progress and rank == 0 and total:
        from tqdm import tqdm

        bar = tqdm(total=total * 1, desc=method_attrs.get("method", "recon"), unit="slice", file=sys.stderr)
    for volume in todo:
        mine, failure = {}, None
        noise_scan = volume.read_noise()
        for s in range(rank, volume.num_slices, world):
            try:
                start = time.time()
                inp = SliceInput(
                    volume.read_kspace(s), volume.mask, volume.read_maps(s), noise_scan, noise_std
                )
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = reconstruct(volume, s, inp)
                for w in caught:  # one short line instead of Python's two-line warning format
                    print(f"warning: {volume.name} slice {s}: {w.message}", file=sys.stderr)
            except (BadFileError, ValueError) as err:
                # Reported after the gather, on every rank: a rank that raised here alone would leave the
                # others waiting forever in the collective.
                failure = str(err) if isinstance(err, BadFileError) else f"{volume.path}: slice {s}: {err}"
                break
            out.seconds = time.time() - start
            mine[s] = out
            if bar is not None:
                bar.update(1)
        gathered = dist_util.all_gather_object((mine, failure))
        failures = [f for _, f in gathered if f is not None]
        if failures:
            if bar is not None:
                bar.close()
            raise BadFileError(failures[0])
        if rank == 0:
            outputs = {}
            for part, _ in gathered:
                outputs.update(part)
            summary = _write_volume(volume, outputs, output_dir, method_attrs, png, max_png_per_file)
            result.summaries.append(summary)
            result.written.append(output_path(output_dir, volume.name))
    if bar is not None:
        bar.close()
    if rank == 0 and todo:
        write_metrics_summary(output_dir)
    dist_util.barrier()
    return result


def _write_volume(
    volume: Volume,
    outputs: Dict[int, SliceOutput],
    output_dir: str,
    method_attrs: Dict[str, Any],
    png: bool,
    max_png_per_file: int,
) -> Dict[str, Any]:
    """Assemble the slices of one volume and write its h5, previews and metrics (rank 0)."""
    order = range(volume.num_slices)
    mean = np.stack([outputs[i].mean for i in order])
    crop = volume.target_shape
    recon = center_crop_np(np.stack([outputs[i].magnitude for i in order]), crop).astype(np.float32)
    std = center_crop_np(np.stack([outputs[i].std for i in order]), crop).astype(np.float32)
    zero_filled = center_crop_np(np.stack([outputs[i].zero_filled for i in order]), crop)
    seconds = float(np.mean([outputs[i].seconds for i in order]))
    nfe = int(max(outputs[i].nfe for i in order))
    residual = float(np.nanmean([outputs[i].residual for i in order]))
    noise_ratio = np.array([outputs[i].noise_ratio for i in order], dtype=np.float64)
    attrs = dict(method_attrs)
    attrs.update(
        mask_type=volume.mask_type,
        acceleration=volume.acceleration,
        effective_acceleration=volume.effective_acceleration,
        num_low_frequencies=-1 if volume.num_low_frequencies is None else volume.num_low_frequencies,
        nfe=nfe,
        seconds_per_slice=seconds,
        data_residual=residual,
        noise_std=np.array([outputs[i].noise_std for i in order], dtype=np.float64),
        noise_source=outputs[0].noise_source,
        noise_residual_ratio=noise_ratio,
        calib_misfit=np.array([outputs[i].calib_misfit for i in order], dtype=np.float64),
        target_key=volume.target_key or "",
        input_file=os.path.abspath(volume.path),
    )
    write_recon_h5(output_path(output_dir, volume.name), recon, std, mean, volume.mask, attrs)
    target = volume.read_target()
    stem = os.path.splitext(volume.name)[0]
    summary = {
        "file": volume.name,
        "seconds_per_slice": seconds,
        "nfe": nfe,
        "data_residual": residual,
        "noise_residual_ratio": _nanmean(noise_ratio),
    }
    if target is not None:
        rows = metric_rows(volume.name, target, recon, volume.target_key, noise_ratio)
        write_csv(os.path.join(output_dir, "metrics", stem + ".csv"), rows, METRIC_FIELDS)
        summary.update({k: rows[-1][k] for k in ("nmse", "psnr", "ssim")}, target=volume.target_key)
    if png and max_png_per_file > 0:
        n = volume.num_slices
        picks = sorted(set(np.linspace(0, n - 1, min(n, max_png_per_file)).round().astype(int).tolist()))
        for i in picks:
            vmax = float(target[i].max()) if target is not None else float(recon[i].max())
            err = None if target is None else np.abs(recon[i] - target[i])
            panels = [
                ("zero-filled", zero_filled[i], vmax),
                ("recon", recon[i], vmax),
                ("target", None if target is None else target[i], vmax),
                ("|error| x5", err, vmax / 5),
                ("std x5", std[i] if std[i].any() else None, vmax / 5),
            ]
            write_preview_png(os.path.join(output_dir, "png", f"{stem}_slice{i:03d}.png"), panels)
    return summary


def report_error(err: BaseException) -> int:
    """Print an input error as ``error: <line>`` lines on stderr (rank 0 only); the scripts' exit status 2."""
    if dist_util.is_main_process():
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
    return 2


def print_report(result: RunResult, output_dir: str, label: str) -> None:
    """One line per written volume (seconds per slice, NFE, data residual, metrics vs which target)."""
    for name in result.skipped:
        print(f"skipped {name}: output exists in {output_dir} (use --overwrite True to redo)")
    for s in result.summaries:
        line = (
            f"{s['file']}: {label}, {s['seconds_per_slice']:.2f} s/slice"
            + (f", NFE {s['nfe']}" if s["nfe"] else "")
            + f", data residual {s['data_residual']:.2e}"
            + f", residual / noise level {s['noise_residual_ratio']:.2f}"
        )
        if "psnr" in s:
            line += f", vs {s['target']}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f}, NMSE {s['nmse']:.4f}"
        print(line)
    print(f"wrote {len(result.written)} volume(s) to {output_dir}")
