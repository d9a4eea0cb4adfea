"""Inputs of the reconstruction scripts: h5 volumes, their masks, maps and noise scans.

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
"""

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from .io_util import BadFileError, first_line, inspect_h5, kspace_dataset, list_h5_files
from .mri.fftc import center_crop
from .mri.fov import output_crop, recon_matrix
from .mri.subsample import MASK_TYPES, create_mask_for_mask_type, effective_acceleration, seed_from_fname

KSPACE_KEY = "kspace"
MASK_KEY = "mask"
MAPS_KEY = "sens_maps"
NOISE_KEY = "noise"
TARGET_KEYS = {True: "reconstruction_rss", False: "reconstruction_esc"}  # by multicoil


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
            target = torch.from_numpy(np.asarray(f[self.target_key][()], dtype=np.float32))
        return center_crop(target, self.target_shape).numpy()


def list_inputs(inputs: Sequence[str]) -> List[str]:
    """h5 files from a list of files and/or folders (folders searched recursively), sorted, unique.

    Raises:
        BadFileError: a path that does not exist, or no h5 file at all.
    """
    out = list_h5_files(inputs)
    if not out:
        raise BadFileError(f"{', '.join(inputs)}: no .h5 files found")
    return out


def open_volume(path: str, spec: MaskSpec) -> Volume:
    """Validate one input file and build (or read) its mask.

    Raises:
        BadFileError: one line ``"<path>: <problem>"`` (unreadable file, missing/ill-shaped keys, a mask or
            maps that do not match the k-space).
    """

    def bad(problem: str) -> BadFileError:
        return BadFileError(f"{path}: {problem}")

    with inspect_h5(path) as f:
        ksp = kspace_dataset(f, path, KSPACE_KEY)
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
                raise bad(f"cannot build a {spec.mask_type} mask: {first_line(err)}") from None
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
    if not np.isfinite(mask).all():  # NaN != 0 would count as sampled
        raise bad(f"'{MASK_KEY}' holds {int((~np.isfinite(mask)).sum())} NaN or inf values")
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
