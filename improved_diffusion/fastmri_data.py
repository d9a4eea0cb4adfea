"""Training data from fastMRI h5 files: one complex image per slice, as 2 real channels.

Files are read as fastMRI publishes them:

* single-coil: ``kspace`` (slices, H, W) complex64, optional ``reconstruction_esc`` (slices, h, w) float32;
* multi-coil: ``kspace`` (slices, coils, H, W) complex64, optional ``reconstruction_rss``, plus the key
  ``sens_maps`` (same shape as ``kspace``, complex64) that ``datasets/prepare_fastmri.py`` adds;
* ``ismrmrd_header`` and other keys are ignored; a ``mask`` key that is not all ones marks undersampled
  k-space (fastMRI's test/challenge files), which cannot give training images and is refused.

The training image of a slice is ``ifft2c(kspace)`` (single-coil) or the coil combination
``sum_c conj(S_c) * ifft2c(y_c)`` with the ESPIRiT maps ``S`` (multi-coil), optionally center-cropped,
divided by a per-slice intensity scale (``slice_to_image`` and ``scale_from_kspace`` of
:mod:`improved_diffusion.transforms`, the rule reconstruction shares) that travels with the batch in
``kwargs["scale"]``, so ``x * scale`` gives back the image exactly (without augmentation).

The crop follows the reconstruction's field of view (:mod:`improved_diffusion.mri.fov`, e.g. fastMRI's
knee: 640 x 368 k-space with 2x readout oversampling, crop_size 320): the rows are cropped in k-space
by :func:`~improved_diffusion.mri.fov.readout_crop` (the readout is fully sampled, so reconstruction does
exactly the same) and the scale is computed from that cropped k-space, as reconstruction computes it;
the width (phase encoding, undersampled at reconstruction time, where it is never cropped) is then
center-cropped in the image domain. Pixels keep their size, so a model trained on (320, 320) crops
reconstructs the (320, W) grid of the same scan with the same pixels and the same scale.

Optionally (``augment``, an :class:`~improved_diffusion.augment.AugmentConfig`) each training image is then
augmented and/or cut to a random patch, seeded per sample by (seed, stream, pass over the data, file name,
slice), so the result does not depend on the number of DataLoader workers.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .augment import AugmentConfig, augment_image, sample_key
from .io_util import BadFileError, first_line, inspect_h5, kspace_dataset
from .io_util import list_h5_files as _list_h5
from .mri.coils import maps_problem
from .mri.fftc import center_crop, complex_to_channels
from .mri.fov import crop_rows, readout_crop
from .transforms import PREPARE_HINT, scale_from_kspace, slice_to_image

_KSPACE = "kspace"
_MAPS = "sens_maps"
CropSize = Optional[Union[int, Tuple[int, int]]]

# ----------------------------------------------------------------------------------------------------------
# File index: every file is checked once before training starts.


@dataclass(frozen=True)
class FileInfo:
    """What the index pass learned about one usable file."""

    path: str
    num_slices: int
    shape: Tuple[int, int]  # (H, W) of the k-space
    num_coils: int  # 0 for single-coil


def list_h5_files(data_dir: str) -> List[str]:
    """All ``*.h5`` / ``*.hdf5`` files under ``data_dir`` (recursively), sorted for a stable order.

    ``data_dir`` may be a comma-separated list of folders (e.g. the single-coil and multi-coil training
    splits side by side, without their validation splits).
    """
    folders = [d.strip() for d in data_dir.split(",") if d.strip()]
    for folder in folders:
        if not os.path.isdir(folder):
            raise ValueError(f"data_dir {folder!r} is not a directory")
    return _list_h5(folders)


def check_file(path: str, require_maps: bool = True, crop_size: CropSize = None) -> FileInfo:
    """Open one fastMRI file and validate its keys, dtypes and shapes (no image data is read).

    Args:
        path: the h5 file.
        require_maps: multi-coil files must hold ``sens_maps`` (False for the preparation script).
        crop_size: if given, the crop must fit in the slices.

    Raises:
        BadFileError: one line ``"<path>: <problem>"``.
    """

    def bad(problem: str) -> BadFileError:
        return BadFileError(f"{path}: {problem}")

    with inspect_h5(path) as f:
        ksp = kspace_dataset(f, path, _KSPACE)
        num_coils = ksp.shape[1] if ksp.ndim == 4 else 0
        if num_coils and require_maps:
            if _MAPS not in f:
                raise bad(f"multi-coil file without '{_MAPS}': {PREPARE_HINT}")
            maps = f[_MAPS]
            if not isinstance(maps, h5py.Dataset) or maps.dtype.kind != "c":
                raise bad(f"'{_MAPS}' must be a complex dataset, got {getattr(maps, 'dtype', type(maps))}")
            if maps.shape != ksp.shape:
                raise bad(f"'{_MAPS}' shape {maps.shape} does not match '{_KSPACE}' shape {ksp.shape}")
        if "mask" in f:
            mask = np.asarray(f["mask"][()])
            if not np.isfinite(mask).all():
                raise bad(f"'mask' holds {int((~np.isfinite(mask)).sum())} NaN or inf values")
            if mask.size and not np.all(mask != 0):
                raise bad(
                    f"k-space is undersampled ('mask' samples {100 * np.mean(mask != 0):.0f}%); "
                    "training needs fully sampled files"
                )
        shape = tuple(int(s) for s in ksp.shape[-2:])
        if crop_size is not None:
            ch, cw = _crop_pair(crop_size)
            if ch > shape[0] or cw > shape[1]:
                raise bad(f"crop_size {(ch, cw)} is larger than the slices {shape}")
        return FileInfo(path=path, num_slices=int(ksp.shape[0]), shape=shape, num_coils=int(num_coils))


Report = Callable[[str], None]


def _warn(line: str) -> None:
    warnings.warn(line, stacklevel=3)


def index_files(
    paths: Sequence[str],
    on_bad_file: str = "error",
    require_maps: bool = True,
    crop_size: CropSize = None,
    report: Optional[Report] = None,
) -> List[FileInfo]:
    """Run :func:`check_file` over every one of ``paths``.

    Args:
        on_bad_file: ``"error"`` raises once all files are checked; ``"skip"`` leaves bad files out.
        report: called with one line per skipped file (``"skipping bad file <path>: <problem>"``) and a
            summary line; default ``warnings.warn``.

    Raises:
        BadFileError: in ``"error"`` mode, one line per bad file.
    """
    check_on_bad_file(on_bad_file)
    report = report or _warn
    infos, bad = [], []
    for path in paths:
        try:
            infos.append(check_file(path, require_maps=require_maps, crop_size=crop_size))
        except BadFileError as err:
            bad.append(str(err))
            if on_bad_file == "skip":
                report(f"skipping bad file {err}")
    if bad and on_bad_file == "error":
        raise BadFileError("\n".join(bad))
    if bad:
        report(f"skipped {len(bad)} of {len(paths)} files as bad (on_bad_file='skip')")
    return infos


def check_on_bad_file(on_bad_file: str) -> None:
    """Raise a ValueError unless ``on_bad_file`` is ``"error"`` or ``"skip"``."""
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")


def _crop_pair(crop_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    pair = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"crop_size must be a positive int or (h, w), got {crop_size!r}")
    return pair


# ----------------------------------------------------------------------------------------------------------
# Dataset and loader.


def slice_problem(kspace: torch.Tensor, maps: Optional[torch.Tensor] = None) -> Optional[str]:
    """What makes one slice unusable for training, or None: NaN/inf in ``kspace`` or ``maps``, all-zero
    ``kspace`` (a slice with nothing to learn from; its scale would be meaningless), or maps that are all
    zero or not normalized (:func:`~improved_diffusion.mri.coils.maps_problem`).

    Args:
        kspace: (H, W) or (C, H, W) complex k-space of the slice.
        maps: (C, H, W) sensitivity maps, or None.
    """
    for key, values in ((_KSPACE, kspace), (_MAPS, maps)):
        if values is None:
            continue
        bad = int((~torch.isfinite(torch.view_as_real(values) if values.is_complex() else values)).sum())
        if bad:
            return f"'{key}' holds {bad} NaN or inf values"
    if not bool(kspace.any()):
        return f"'{_KSPACE}' is all zero"
    return None if maps is None else maps_problem(maps, _MAPS)


class FastMRISliceDataset(Dataset):
    """One item per (file, slice): ``(x (2, h, w) float32, {"scale", "fname", "slice_idx", "bad"})``.

    An item is asked for by its index or by ``(epoch, index)`` (what :func:`load_data`'s sampler yields): with
    ``augment`` the image is augmented with the draws of key ``(augment.seed, augment_stream, epoch, file
    base name, slice)`` (:func:`~improved_diffusion.augment.sample_key`); a bare index is epoch 0.

    Files are opened per item (cheap with h5py), so the dataset holds no handle and works in DataLoader
    worker processes with any start method. Each slice's values are checked as it is read
    (:func:`slice_problem`), so a file is read once per epoch and never twice for checking. A bad slice
    raises :class:`BadFileError` (``on_bad_file="error"``) or, with ``"skip"``, marks its whole file bad in
    this process: the item is replaced by the next one of a good file and ``"bad"`` lists
    ``(path, reason)`` for the files found bad on the way.
    """

    def __init__(
        self,
        files: Sequence[FileInfo],
        crop_size: CropSize = None,
        skip_edge_slices: int = 0,
        on_bad_file: str = "error",
        augment: Optional[AugmentConfig] = None,
        augment_stream: int = 0,
    ):
        if skip_edge_slices < 0:
            raise ValueError(f"skip_edge_slices must be >= 0, got {skip_edge_slices}")
        check_on_bad_file(on_bad_file)
        self.crop = None if crop_size is None else _crop_pair(crop_size)
        self.augment = augment if augment is not None and augment.enabled else None
        self.augment_stream = int(augment_stream)
        self.on_bad_file = on_bad_file
        self.bad_files: Dict[str, str] = {}  # path -> reason, found in this process
        self.items: List[Tuple[str, int, bool]] = []
        for info in files:
            # Noise-only slices sit at both ends of a volume; drop skip_edge_slices on each side.
            for s in range(skip_edge_slices, info.num_slices - skip_edge_slices):
                self.items.append((info.path, s, info.num_coils > 0))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, Dict]:
        epoch, index = (0, index) if isinstance(index, (int, np.integer)) else index
        x, kwargs = self._get(int(index))
        if self.augment is not None:
            key = sample_key(self.augment, self.augment_stream, epoch, kwargs["fname"], kwargs["slice_idx"])
            x = augment_image(x, self.augment, key).float().contiguous()
        return x, kwargs

    def _get(self, index: int) -> Tuple[torch.Tensor, Dict]:
        if self.on_bad_file == "error":
            x, kwargs = self.read_item(index)
            kwargs["bad"] = []
            return x, kwargs
        found = []
        for step in range(len(self.items)):
            i = (index + step) % len(self.items)
            if self.items[i][0] in self.bad_files:
                continue
            try:
                x, kwargs = self.read_item(i)
            except BadFileError as err:
                self.bad_files[self.items[i][0]] = str(err)
                found.append((self.items[i][0], str(err)))
                continue
            kwargs["bad"] = found
            return x, kwargs
        raise BadFileError(
            f"every file of this shard is bad (on_bad_file='skip'): {'; '.join(self.bad_files.values())}"
        )

    def read_item(self, index: int) -> Tuple[torch.Tensor, Dict]:
        """Item ``index`` as it is on disk (no skipping).

        Raises:
            BadFileError: ``"<path>: slice <s>: <problem>"`` for an unreadable or unusable slice.
        """
        path, s, multicoil = self.items[index]
        try:
            with h5py.File(path, "r") as f:
                kspace = torch.from_numpy(np.asarray(f[_KSPACE][s]))
                maps = torch.from_numpy(np.asarray(f[_MAPS][s])) if multicoil else None
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise BadFileError(f"{path}: cannot read slice {s}: {first_line(err)}") from None
        problem = slice_problem(kspace, maps)
        if problem is not None:
            raise BadFileError(f"{path}: slice {s}: {problem}")
        kspace = kspace.to(torch.complex64)
        maps = None if maps is None else maps.to(torch.complex64)
        if self.crop is not None and self.crop[0] < kspace.shape[-2]:
            # The readout crop of reconstruction (module docstring): same pixels, same scale.
            kspace = readout_crop(kspace, self.crop[0])
            maps = None if maps is None else crop_rows(maps, self.crop[0])
        scale = scale_from_kspace(kspace)
        image = slice_to_image(kspace, maps)
        if self.crop is not None:
            image = center_crop(image, self.crop)
        x = complex_to_channels(image / scale).float().contiguous()
        if not torch.isfinite(x).all():
            raise BadFileError(f"{path}: slice {s} gives non-finite image values")
        return x, {"scale": np.float32(scale), "fname": os.path.basename(path), "slice_idx": s}


def collate_slices(batch: List[Tuple[torch.Tensor, Dict]]) -> Tuple[torch.Tensor, Dict]:
    """Stack items: ``(x (B, 2, h, w), {"scale": (B,) float32, "fname": [B], "slice_idx": (B,) int64})``.

    Items' ``"bad"`` lists (files found bad while reading, see :class:`FastMRISliceDataset`) are joined
    under ``"bad"``.
    """
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch slices of different sizes {sorted(shapes)}; use crop_size or batch 1")
    x = torch.stack([item[0] for item in batch])
    kwargs = {
        "scale": torch.tensor([item[1]["scale"] for item in batch], dtype=torch.float32),
        "fname": [item[1]["fname"] for item in batch],
        "slice_idx": torch.tensor([item[1]["slice_idx"] for item in batch], dtype=torch.int64),
    }
    bad = [line for item in batch for line in item[1].get("bad", [])]
    if bad:
        kwargs["bad"] = bad
    return x, kwargs


def _default_shard() -> Tuple[int, int]:
    try:  # lazy: dist_util pulls in torch.distributed / mpi4py set-up code that plain loading never needs
        from . import dist_util

        return int(dist_util.get_rank()), int(dist_util.get_world_size())
    except ImportError:
        return 0, 1


def index_data(
    *,
    data_dir: str,
    batch_size: int = 1,
    crop_size: CropSize = None,
    skip_edge_slices: int = 0,
    on_bad_file: str = "error",
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    report: Optional[Report] = None,
    patch_size: int = 0,
) -> List[FileInfo]:
    """The index pass of :func:`load_data`: this shard's usable files, each checked by :func:`check_file`
    (keys, dtypes and shapes; no slice data is read).

    Files (sorted) are split across ranks as ``files[shard::num_shards]`` (defaults: this process's rank
    and world size). Arguments as in :func:`load_data`; ``patch_size`` > 0 (random square patches, see
    :mod:`improved_diffusion.augment`) must fit in every (cropped) slice, and then slices of different
    sizes can share a batch.

    Raises:
        BadFileError: in ``"error"`` mode, one line per bad file of the shard.
        ValueError: bad arguments, no files, a shard left without usable files or too few slices for a
            batch, mixed slice sizes for batches without a crop.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if skip_edge_slices < 0:
        raise ValueError(f"skip_edge_slices must be >= 0, got {skip_edge_slices}")
    check_on_bad_file(on_bad_file)
    if crop_size is not None:
        crop_size = _crop_pair(crop_size)
    if not (isinstance(patch_size, int) and patch_size >= 0):
        raise ValueError(f"patch_size must be an int >= 0 (0: whole slices), got {patch_size!r}")
    if shard is None or num_shards is None:
        rank, world = _default_shard()
        shard = rank if shard is None else shard
        num_shards = world if num_shards is None else num_shards
    if not (num_shards >= 1 and 0 <= shard < num_shards):
        raise ValueError(f"shard {shard} is not in [0, num_shards={num_shards})")

    paths = list_h5_files(data_dir)
    if not paths:
        raise ValueError(f"data_dir {data_dir!r} holds no .h5 files")
    mine = paths[shard::num_shards]
    if not mine:
        raise ValueError(
            f"shard {shard} of {num_shards} gets no files: {data_dir!r} holds only {len(paths)}; "
            "use fewer ranks"
        )
    infos = index_files(mine, on_bad_file=on_bad_file, require_maps=True, crop_size=crop_size, report=report)
    if not infos:
        raise ValueError(f"no usable files in shard {shard} of {num_shards} of {data_dir!r} (all were bad)")
    if patch_size:
        small = [info for info in infos if min(crop_size or info.shape) < patch_size]
        if small:
            raise ValueError(
                f"patch_size {patch_size} does not fit in the slices of {small[0].path} "
                f"({crop_size or small[0].shape}{' after crop' if crop_size else ''})"
                + (f" and {len(small) - 1} more files" if len(small) > 1 else "")
            )
    if batch_size > 1 and crop_size is None and not patch_size:
        sizes = {info.shape: info.path for info in infos}
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise ValueError(
                f"batch_size={batch_size} needs equal slice sizes, but {p1} has {s1} and {p2} has {s2}; "
                "pass crop_size or use batch_size=1"
            )
    num_slices = sum(max(0, info.num_slices - 2 * skip_edge_slices) for info in infos)
    if num_slices < batch_size:
        raise ValueError(
            f"only {num_slices} slices in shard {shard} of {data_dir!r} (after skip_edge_slices="
            f"{skip_edge_slices}), fewer than batch_size={batch_size}"
        )
    return infos


def _worker_message(err: BadFileError) -> str:
    """The original one-line message of a BadFileError that a DataLoader worker raised.

    torch re-raises a worker's exception in the main process as the same type with ``"Caught ... in
    DataLoader worker process n. Original Traceback ..."`` and the formatted traceback as its message; the
    original message is what follows the last ``BadFileError: ``.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    marker = f"{BadFileError.__name__}: "
    return text[text.rindex(marker) + len(marker) :].strip() if marker in text else text


class EpochTaggedSampler(Sampler):
    """Wraps a sampler so it yields ``(epoch, index)``; ``epoch`` counts the passes over it (from 0).

    The sampler runs in the main process, so every DataLoader worker sees the same epoch numbers and the
    per-sample augmentation seeds do not depend on the number of workers.
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        for index in self.sampler:
            yield epoch, index

    def __len__(self) -> int:
        return len(self.sampler)


def load_data(
    *,
    data_dir: str = "",
    batch_size: int,
    crop_size: CropSize = None,
    deterministic: bool = False,
    skip_edge_slices: int = 0,
    num_workers: int = 0,
    on_bad_file: str = "error",
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    seed: int = 0,
    files: Optional[Sequence[FileInfo]] = None,
    report: Optional[Report] = None,
    augment: Optional[AugmentConfig] = None,
    augment_stream: int = 0,
) -> Iterator[Tuple[torch.Tensor, Dict]]:
    """Infinite generator of training batches from a folder of fastMRI h5 files.

    The index pass (:func:`index_data`) checks every file of this rank's shard before anything is read;
    pass its result as ``files`` to run it earlier (scripts/image_train.py does, before building the
    model). Each slice's values are checked as it is read (:func:`slice_problem`): NaN/inf or all-zero
    k-space is a bad file found late, handled by ``on_bad_file`` like the others.

    Args:
        data_dir: folder searched recursively for ``*.h5`` / ``*.hdf5`` (unused when ``files`` is given).
        batch_size: slices per batch; > 1 needs equal slice sizes (use ``crop_size`` for mixed sizes).
        crop_size: center crop of the image, int or (h, w); None keeps the full size.
        deterministic: fixed order every pass; otherwise shuffled with a generator seeded by ``seed``.
        skip_edge_slices: slices dropped at each end of every volume (noise-only edges).
        num_workers: torch DataLoader worker processes.
        on_bad_file: "error" raises :class:`BadFileError` (the index pass lists every bad file, a bad slice
            found while training stops at that slice); "skip" reports and leaves the file out (a file
            found bad while training is left out from then on, its slices replaced by other files').
        shard, num_shards: this process's part of the files; default from dist_util (0, 1 otherwise).
        seed: shuffling seed.
        files: the result of :func:`index_data` (then ``data_dir`` and the shard are not looked at).
        report: called with one line per skipped file; default ``warnings.warn``.
        augment: augmentations and random patches (:mod:`improved_diffusion.augment`), applied after
            the crop; None or a config with nothing on keeps the images as they are.
        augment_stream: part of every augmentation seed (scripts/image_train.py passes the resumed step,
            so a resumed run does not replay the augmentations of the run it continues).

    Yields:
        ``(x, kwargs)``: x float32 (B, 2, h, w) = (real, imag) of image / scale (h = w = patch size with
        patches); kwargs
        ``{"scale": float32 (B,), "fname": list[str], "slice_idx": int64 (B,)}``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if files is None:
        files = index_data(
            data_dir=data_dir,
            batch_size=batch_size,
            crop_size=crop_size,
            skip_edge_slices=skip_edge_slices,
            on_bad_file=on_bad_file,
            shard=shard,
            num_shards=num_shards,
            report=report,
            patch_size=augment.patch_size if augment is not None else 0,
        )
    report = report or _warn
    dataset = FastMRISliceDataset(
        files,
        crop_size=crop_size,
        skip_edge_slices=skip_edge_slices,
        on_bad_file=on_bad_file,
        augment=augment,
        augment_stream=augment_stream,
    )
    if len(dataset) < batch_size:
        raise ValueError(
            f"only {len(dataset)} slices in {len(files)} files (after skip_edge_slices={skip_edge_slices}), "
            f"fewer than batch_size={batch_size}"
        )
    generator = torch.Generator().manual_seed(seed)
    # The sampler DataLoader(shuffle=...) would build, tagged with the pass number (same order, same draws).
    order = SequentialSampler(dataset) if deterministic else RandomSampler(dataset, generator=generator)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochTaggedSampler(order),
        num_workers=num_workers,
        drop_last=True,
        collate_fn=collate_slices,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
    reported = set()  # each worker finds a bad file on its own; report it once
    while True:
        try:
            for x, kwargs in loader:
                for path, line in kwargs.pop("bad", []):
                    if path not in reported:
                        reported.add(path)
                        report(f"skipping bad file {line} (its slices are left out from now on)")
                yield x, kwargs
        except BadFileError as err:
            raise BadFileError(_worker_message(err)) from None
