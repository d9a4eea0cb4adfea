"""The reconstruction scripts' file loop: validate every input, shard slices over ranks, write, report.

:func:`run_files` is shared by scripts/image_sample.py and scripts/baseline_recon.py: each passes a
``reconstruct(volume, slice_idx, SliceInput) -> SliceOutput`` for one slice; reading is
:mod:`improved_diffusion.recon_inputs`, writing :mod:`improved_diffusion.recon_outputs`.
"""

import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import dist_util
from .io_util import BadFileError
from .mri.subsample import MASK_TYPES
from .recon_inputs import MaskSpec, SliceInput, Volume, open_volume
from .recon_outputs import (
    SliceOutput,
    options_hash,
    output_path,
    stored_options_hash,
    write_metrics_summary,
    write_volume,
)

# The flags that scripts/image_sample.py and scripts/baseline_recon.py share: one help text for both.
RUN_FLAG_HELP: Dict[str, str] = {
    "output_dir": "output folder: <name>.h5 per input, png/, metrics/ and metrics.csv (created)",
    "mask_type": "retrospective mask of fully sampled inputs (inputs with a 'mask' keep theirs)",
    "center_fractions": "fastMRI centre fractions, comma list, one per acceleration",
    "accelerations": "nominal accelerations, comma list (one is drawn per volume when several)",
    "seed": "mask seed; -1 = fastMRI's per-file seed from the file name",
    "noise_std": "complex noise std of one k-space sample; 0 = noiseless; -1 = the file's noise scan, "
    "else estimated from the data",
    "overwrite": "redo every output, even one made with the same options (other options always redo)",
    "png": "write png/ previews (zero-filled | recon | target | error | std)",
    "max_png_per_file": "at most this many previews per volume (evenly spaced slices)",
    "progress": "tqdm progress bar over slices",
}
RUN_FLAG_CHOICES: Dict[str, Sequence[Any]] = {"mask_type": MASK_TYPES}
INPUT_HELP = "h5 files and/or folders of h5 files (searched recursively)"


@dataclass
class RunResult:
    """What :func:`run_files` did: written outputs, skipped ones (up to date), redone ones (their options
    had changed), and per-volume summaries."""

    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    redone: List[str] = field(default_factory=list)
    summaries: List[Dict[str, Any]] = field(default_factory=list)


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
    writes the outputs. A file whose output exists with the same :func:`options_hash` is skipped; with
    another hash (other options, or a file from before the hash) it is redone and one line says so;
    ``overwrite`` redoes every file.

    Args:
        paths: input h5 files.
        spec: retrospective masking of fully sampled files.
        output_dir: output folder.
        reconstruct: ``reconstruct(volume, slice_idx, SliceInput) -> SliceOutput``; a ValueError it raises
            is reported as ``<file>: slice <i>: <message>``.
        method_attrs: attrs written to each output h5 (``method`` and its options).
        overwrite: redo files whose output exists, even with the same options.
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
    run_hash = options_hash(method_attrs, spec, noise_std)
    method_attrs = {**method_attrs, "options_hash": run_hash}
    # Rank 0 decides what to skip, so ranks agree even while rank 0 is writing.
    pending, redone = [], []
    if rank == 0:
        for v in volumes:
            out_path = output_path(output_dir, v.name)
            if overwrite or not os.path.exists(out_path):
                pending.append(v.name)
            elif stored_options_hash(out_path) != run_hash:
                pending.append(v.name)
                redone.append(v.name)
                old = stored_options_hash(out_path) or "none"
                print(
                    f"redoing {v.name}: {out_path} was made with other options (hash {old}, now {run_hash})"
                )
    pending, redone = dist_util.broadcast_object((pending, redone))
    result = RunResult(skipped=[v.name for v in volumes if v.name not in pending], redone=redone)
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
            summary = write_volume(volume, outputs, output_dir, method_attrs, png, max_png_per_file)
            result.summaries.append(summary)
            result.written.append(output_path(output_dir, volume.name))
    if bar is not None:
        bar.close()
    if rank == 0:
        write_metrics_summary(output_dir, names)
    dist_util.barrier()
    return result


def run_flags(args: Any) -> Dict[str, Any]:
    """The keywords of :func:`run_files` from the scripts' shared flags (:data:`RUN_FLAG_HELP`).

    ``args.noise_std`` < 0 (the flag's "not given") becomes None.
    """
    return dict(
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        noise_std=args.noise_std if args.noise_std >= 0 else None,
        png=args.png,
        max_png_per_file=args.max_png_per_file,
        progress=args.progress,
    )


def report_error(err: BaseException) -> int:
    """Print an input error as ``error: <line>`` lines on stderr (rank 0 only); the scripts' exit status 2."""
    if dist_util.is_main_process():
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
    return 2


def print_report(result: RunResult, output_dir: str, label: str) -> None:
    """One line per written volume (seconds per slice, NFE, data residual, metrics vs which target)."""
    for name in result.skipped:
        print(f"skipped {name}: up-to-date output in {output_dir} (same options; --overwrite True redoes it)")
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
