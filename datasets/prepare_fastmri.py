"""Add ESPIRiT sensitivity maps (key ``sens_maps``) to multi-coil fastMRI files.

Every ``*.h5`` under ``--input_dir`` is written to the same relative path under ``--output_dir``:
multi-coil files as a copy with the new key ``sens_maps`` (slices, coils, H, W) complex64, computed per
slice by ``improved_diffusion.mri.espirit.estimate_sens_maps`` (the code the reconstruction uses);
single-coil files copied, hard-linked or skipped (``--single_coil``). Each output is built in a temporary
file in the output folder and renamed when complete, so an interrupted run leaves no half-written
``.h5`` and a rerun skips the finished ones. Files are split over MPI ranks (``mpiexec -n N``), torchrun
ranks, or ``--workers N`` processes; a summary (with every bad file and why) ends the run, and the exit
status is 1 if any file was bad.

    python datasets/prepare_fastmri.py --input_dir multicoil_train --output_dir multicoil_train_maps
    mpiexec -n 4 python datasets/prepare_fastmri.py --input_dir ... --output_dir ... --device cuda:0
"""

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import h5py
import numpy as np

try:
    from improved_diffusion.fastmri_data import BadFileError, check_file, list_h5_files
    from improved_diffusion.io_util import atomic_write
    from improved_diffusion.mri.espirit import estimate_sens_maps
    from improved_diffusion.script_util import HelpFormatter
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from improved_diffusion.fastmri_data import BadFileError, check_file, list_h5_files
    from improved_diffusion.io_util import atomic_write
    from improved_diffusion.mri.espirit import estimate_sens_maps
    from improved_diffusion.script_util import HelpFormatter

MAPS_KEY = "sens_maps"
# Fully sampled training data: a 48 x 48 calibration square is plenty, and the whole k-space would make
# ESPIRiT's calibration matrix needlessly large.
ESPIRIT_DEFAULTS = dict(max_calib=48, thresh=0.02, kernel_width=6, crop=0.95)
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")

Result = Tuple[str, str, str]  # (input path, status, detail)


def add_sens_maps(
    path: str, progress: bool = False, compression: Optional[str] = None, **espirit_kwargs
) -> None:
    """Compute ``sens_maps`` for every slice of the multi-coil file ``path`` and write them into it (r+).

    The dataset is chunked per slice (``compression``: None, "gzip" or "lzf", with byte shuffling; maps
    are zero outside the object, so gzip about halves them), and its attrs record the ESPIRiT settings.
    """
    with h5py.File(path, "r+") as f:
        kspace = f["kspace"]
        if MAPS_KEY in f:
            del f[MAPS_KEY]
        out = f.create_dataset(
            MAPS_KEY,
            shape=kspace.shape,
            dtype=np.complex64,
            chunks=(1, *kspace.shape[1:]),
            compression=compression,
            shuffle=compression is not None,
        )
        slices = range(kspace.shape[0])
        if progress:
            from tqdm import tqdm

            slices = tqdm(slices, desc=os.path.basename(path), leave=False)
        for s in slices:
            out[s] = estimate_sens_maps(np.asarray(kspace[s]), **espirit_kwargs)
        for key, value in espirit_kwargs.items():
            out.attrs[key] = -1 if value is None else value


def prepare_file(
    src: str,
    dst: str,
    espirit_kwargs: Dict,
    single_coil: str = "copy",
    progress: bool = False,
    compression: Optional[str] = None,
) -> Result:
    """Write ``dst`` from ``src`` (see module doc); never raises for a bad input file.

    Returns:
        ``(src, status, detail)`` with status one of: done (output existed), prepared, has_maps (copied,
        it already had maps), copied, linked, skipped (single-coil with ``single_coil="skip"``), bad.
    """
    if os.path.exists(dst):
        return src, "done", ""
    try:
        info = check_file(src, require_maps=False)
    except BadFileError as err:
        return src, "bad", str(err)
    if info.num_coils == 0 and single_coil == "skip":
        return src, "skipped", "single-coil"
    status = "copied"
    link = info.num_coils == 0 and single_coil == "link"

    def write(tmp: str) -> None:
        # the temp file ends in .tmp (not .h5), so loaders and this script never pick up an unfinished one
        nonlocal status
        if link:
            os.remove(tmp)  # os.link needs a free name
            try:
                os.link(src, tmp)
                status = "linked"
                return
            except OSError:  # other file system: fall back to a copy
                pass
        shutil.copyfile(src, tmp)
        if info.num_coils:
            with h5py.File(tmp, "r") as f:
                has_maps = MAPS_KEY in f and f[MAPS_KEY].shape == f["kspace"].shape
            if has_maps:
                status = "has_maps"
            else:
                add_sens_maps(tmp, progress=progress, compression=compression, **espirit_kwargs)
                status = "prepared"

    try:
        # a hard link keeps the source's mode
        atomic_write(dst, write, chmod=not link)
        return src, status, ""
    except Exception as err:  # a file that breaks half-way (damaged data chunk, disk full): report, go on
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        return src, "bad", f"{src}: failed while writing {dst}: {first}"


def _rank_and_size() -> Tuple[int, int, Optional[object]]:
    """(rank, world size, MPI communicator or None) from the launcher's environment."""
    if any(int(os.environ.get(v, "1") or 1) > 1 for v in _MPI_SIZE_VARS):
        from mpi4py import MPI  # lazy: only under an MPI launcher

        comm = MPI.COMM_WORLD
        return comm.Get_rank(), comm.Get_size(), comm
    if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None
    return 0, 1, None


def _summary(results: List[Result]) -> str:
    counts: Dict[str, int] = {}
    for _, status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    lines = ["prepare_fastmri: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    bad = [detail for _, status, detail in results if status == "bad"]
    if bad:
        lines.append(f"{len(bad)} bad file(s):")
        lines.extend("  " + b for b in bad)
    return "\n".join(lines)


def _one_thread() -> None:
    """Worker processes compute single-threaded: an OpenMP pool inherited through fork can hang torch, and
    the workers already use the cores."""
    import torch

    torch.set_num_threads(1)


def _run_one(job: Tuple[str, str, Dict, str, Optional[str]]) -> Result:
    src, dst, kwargs, single_coil, compression = job
    return prepare_file(src, dst, kwargs, single_coil, compression=compression)


def run(
    input_dir: str,
    output_dir: str,
    espirit_kwargs: Optional[Dict] = None,
    single_coil: str = "copy",
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    compression: Optional[str] = None,
) -> List[Result]:
    """Prepare this rank's share ``files[rank::world_size]`` of ``input_dir`` into ``output_dir``."""
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ValueError(f"output_dir must differ from input_dir ({input_dir!r}); inputs are never modified")
    if single_coil not in ("copy", "link", "skip"):
        raise ValueError(f"single_coil must be copy, link or skip, got {single_coil!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    kwargs = dict(ESPIRIT_DEFAULTS, **(espirit_kwargs or {}))
    files = list_h5_files(input_dir)[rank::world_size]
    jobs = [
        (src, os.path.join(output_dir, os.path.relpath(src, input_dir)), kwargs, single_coil, compression)
        for src in files
    ]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"prepare (rank {rank})", disable=not show_progress or rank != 0)
    results: List[Result] = []
    if workers == 1:
        for src, dst, kw, sc, comp in jobs:
            results.append(
                prepare_file(src, dst, kw, sc, progress=show_progress and rank == 0, compression=comp)
            )
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
            for result in pool.map(_run_one, jobs):
                results.append(result)
                bar.update()
    bar.close()
    return results


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--input_dir", type=str, required=True, help="folder of fastMRI .h5 files (searched recursively)"
    )
    p.add_argument(
        "--output_dir", type=str, required=True, help="where the files with sens_maps go (same names)"
    )
    p.add_argument(
        "--max_calib",
        type=int,
        default=ESPIRIT_DEFAULTS["max_calib"],
        help="cap on each side of the ESPIRiT calibration rectangle (0: the whole fully sampled centre)",
    )
    p.add_argument(
        "--thresh", type=float, default=ESPIRIT_DEFAULTS["thresh"], help="relative singular-value threshold"
    )
    p.add_argument(
        "--kernel_width", type=int, default=ESPIRIT_DEFAULTS["kernel_width"], help="ESPIRiT kernel"
    )
    p.add_argument(
        "--crop", type=float, default=ESPIRIT_DEFAULTS["crop"], help="eigenvalue threshold of the maps"
    )
    p.add_argument(
        "--device", type=str, default=None, help="torch device for ESPIRiT, e.g. cuda:0 (None: cuda if seen)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes per rank")
    p.add_argument(
        "--single_coil",
        type=str,
        choices=("copy", "link", "skip"),
        default="copy",
        help="single-coil files (no maps needed): copy them, symlink them, or leave them out",
    )
    p.add_argument(
        "--compression",
        type=str,
        choices=("none", "gzip", "lzf"),
        default="none",
        help="h5 compression of the written sens_maps",
    )
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(
        max_calib=args.max_calib,
        thresh=args.thresh,
        kernel_width=args.kernel_width,
        crop=args.crop,
        device=device,
    )
    rank, size, comm = _rank_and_size()
    try:
        results = run(
            args.input_dir,
            args.output_dir,
            kwargs,
            single_coil=args.single_coil,
            workers=args.workers,
            rank=rank,
            world_size=size,
            show_progress=not args.no_progress,
            compression=None if args.compression == "none" else args.compression,
        )
    except ValueError as err:
        print(f"prepare_fastmri: error: {err}", file=sys.stderr)
        return 2
    if comm is not None:
        gathered = comm.gather(results, root=0)
        if rank != 0:
            return 0
        results = [r for part in gathered for r in part]
    print(_summary(results))
    return 1 if any(status == "bad" for _, status, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
