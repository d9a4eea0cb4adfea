"""The reconstruction benchmark's input folders: reduced copies of fastMRI-format files, and what they hold.

A benchmark run may score the first ``--max_files`` volumes, their central ``--max_slices`` slices, and
without the stored ``sens_maps`` (computed from fully sampled data, which a real accelerated scan lacks):
:func:`prepare_inputs` writes such a copy under ``<work_dir>/inputs/`` (file names kept, so name-seeded
masks do not change) or returns the source folder when nothing is left out. :func:`data_info` describes
the folders actually scored, for results/benchmark_info.json.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import h5py

from improved_diffusion.io_util import atomic_write, list_h5_files

# the target each coil setting is scored against (fastMRI's: ESC single-coil, RSS multi-coil)
TARGET_KEYS = {"singlecoil": "reconstruction_esc", "multicoil": "reconstruction_rss"}


def list_h5(folder: str) -> List[str]:
    """Sorted .h5 files directly in ``folder``."""
    if not os.path.isdir(folder):
        raise ValueError(f"data folder {folder}: not found")
    files = list_h5_files(folder, recursive=False)
    if not files:
        raise ValueError(f"data folder {folder}: no .h5 files")
    return files


def central_slices(num_slices: int, max_slices: int) -> range:
    """The ``max_slices`` central slice indices (all when max_slices <= 0)."""
    if max_slices <= 0 or max_slices >= num_slices:
        return range(num_slices)
    start = (num_slices - max_slices) // 2
    return range(start, start + max_slices)


def subset_file(src: str, dst: str, max_slices: int, drop_keys: Sequence[str] = ()) -> None:
    """Copy an h5 file keeping only its central ``max_slices`` slices of the per-slice datasets.

    Datasets whose first axis is the slice axis (kspace, targets, sens_maps) are cut; others (a 1-D/2-D
    ``mask``) and the attrs are copied unchanged; ``drop_keys`` are left out. The file name is kept, so
    name-seeded masks are unchanged.
    """
    with h5py.File(src, "r") as fin:
        if "kspace" not in fin:
            raise ValueError(f"{src}: missing key 'kspace'")
        n = fin["kspace"].shape[0]
        keep = central_slices(n, max_slices)

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as fout:
                for key, ds in fin.items():
                    if not isinstance(ds, h5py.Dataset) or key in drop_keys:
                        continue
                    per_slice = key != "mask" and ds.ndim >= 3 and ds.shape[0] == n
                    data = ds[keep.start : keep.stop] if per_slice else ds[()]
                    fout.create_dataset(key, data=data)
                    for k, v in ds.attrs.items():
                        fout[key].attrs[k] = v
                for k, v in fin.attrs.items():
                    fout.attrs[k] = v

        atomic_write(dst, write)


def _has_key(path: str, key: str) -> bool:
    with h5py.File(path, "r") as f:
        return key in f


def prepare_inputs(
    src_dir: str, work_dir: str, coil: str, max_files: int, max_slices: int, drop_maps: bool = True
) -> str:
    """The folder the methods read: ``src_dir`` itself, or a copy that is reduced and/or without maps.

    Args:
        src_dir: folder of fastMRI-format h5 files.
        work_dir: the benchmark's work folder (copies go to ``<work_dir>/inputs/``).
        coil: ``singlecoil`` or ``multicoil``.
        max_files, max_slices: keep the first files / their central slices (<= 0: all).
        drop_maps: leave out stored ``sens_maps`` (computed from fully sampled data by
            datasets/prepare_fastmri.py), so that every method estimates its maps from the undersampled
            k-space centre, as a real accelerated scan must.
    """
    files = list_h5(src_dir)
    if max_files > 0:
        files = files[:max_files]
    drop = ("sens_maps",) if drop_maps and any(_has_key(f, "sens_maps") for f in files) else ()
    if max_files <= 0 and max_slices <= 0 and not drop:
        return os.path.abspath(src_dir)
    tag = f"{coil}_f{max_files}_s{max_slices}" + ("_nomaps" if drop else "")
    dst_dir = os.path.join(work_dir, "inputs", tag)
    os.makedirs(dst_dir, exist_ok=True)
    for src in files:
        dst = os.path.join(dst_dir, os.path.basename(src))
        if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
            subset_file(src, dst, max_slices, drop)
    return dst_dir


def data_info(input_dirs: Dict[str, str]) -> Dict[str, Any]:
    """Volumes, slices, shapes and coils of the inputs actually scored."""
    out: Dict[str, Any] = {}
    shape = None
    for coil, folder in input_dirs.items():
        files = list_h5(folder)
        slices, coils = 0, 0
        for path in files:
            with h5py.File(path, "r") as f:
                ksp = f["kspace"]
                slices += int(ksp.shape[0])
                coils = int(ksp.shape[1]) if ksp.ndim == 4 else 1
                tgt = f.get(TARGET_KEYS[coil])
                shape = list(tgt.shape[1:]) if tgt is not None else list(ksp.shape[-2:])
        out[coil] = {"dir": folder, "volumes": len(files), "slices": slices, "coils": coils}
    out["image_shape"] = shape
    return out
