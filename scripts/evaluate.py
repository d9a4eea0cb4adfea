"""fastMRI-style evaluation of reconstruction folders against target files (NMSE, PSNR, SSIM).

Every ``*.h5`` in a predictions folder must hold ``reconstruction`` (slices, h, w) magnitude; the target
is the file of the same name in ``--targets_dir`` (e.g. the input folder), key ``reconstruction_rss``
(multi-coil) or ``reconstruction_esc`` (single-coil), found automatically unless ``--target_key`` is set.
When shapes differ, both are center-cropped to the common size (fastMRI crops the target to the
reconstruction). Metrics per volume as fastMRI's evaluate.py (data range = volume max, SSIM 7x7 averaged
over slices), then mean and standard deviation over volumes.

Example:
    python scripts/evaluate.py --predictions_dir recon_out/diffusion recon_out/l1 \
        --targets_dir demo_data/multicoil_val \
        --output_csv recon_out/evaluation.csv
"""

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from improved_diffusion.fastmri_data import BadFileError
from improved_diffusion.io_util import list_h5_files, open_h5
from improved_diffusion.mri.metrics import volume_metrics
from improved_diffusion.recon_inputs import TARGET_KEYS
from improved_diffusion.recon_outputs import center_crop_np, write_csv
from improved_diffusion.recon_runner import report_error
from improved_diffusion.script_util import HelpFormatter

METRICS = ("nmse", "psnr", "ssim")
CSV_FIELDS = ("method", "predictions_dir", "file", "target", "nmse", "psnr", "ssim")


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--predictions_dir", nargs="+", type=str, required=True, help="one or more folders of outputs"
    )
    parser.add_argument(
        "--targets_dir", type=str, required=True, help="folder with the target h5 files (same names)"
    )
    parser.add_argument(
        "--target_key",
        type=str,
        default="",
        help="target dataset; '' = multi-coil files reconstruction_rss, single-coil reconstruction_esc",
    )
    parser.add_argument(
        "--output_csv", type=str, default="", help="per-volume rows plus mean/std rows per folder ('' = none)"
    )
    return parser


def _read(path: str, key: Optional[str], what: str):
    """(array, key, attrs) from an h5 file.

    With ``key`` None the target key follows the file's ``kspace``: 4-D (multi-coil) -> RSS, 3-D
    (single-coil) -> ESC, as fastMRI scores its challenges (its single-coil files hold both keys); a file
    without ``kspace`` takes whichever target it has.
    """
    with open_h5(path) as f:
        keys = [key] if key else [TARGET_KEYS[True], TARGET_KEYS[False]]
        if not key and "kspace" in f:
            keys = [TARGET_KEYS[f["kspace"].ndim == 4]]
        for k in keys:
            if k in f:
                return np.asarray(f[k][()], dtype=np.float64), k, dict(f.attrs)
        raise BadFileError(f"{path}: {what} has none of the keys {keys} (keys: {sorted(f.keys())})")


def evaluate_folder(predictions_dir: str, targets_dir: str, target_key: str = "") -> List[Dict]:
    """Per-volume metric rows for one predictions folder (sorted by file name)."""
    if not os.path.isdir(predictions_dir):
        raise BadFileError(f"{predictions_dir}: predictions folder does not exist")
    names = [os.path.basename(p) for p in list_h5_files(predictions_dir, recursive=False)]
    if not names:
        raise BadFileError(f"{predictions_dir}: no .h5 predictions")
    rows = []
    for name in names:
        pred, _, attrs = _read(os.path.join(predictions_dir, name), "reconstruction", "prediction")
        target_path = os.path.join(targets_dir, name)
        if not os.path.isfile(target_path):
            raise BadFileError(f"{target_path}: no target file for prediction {name}")
        target, key, _ = _read(target_path, target_key or None, "target")
        if pred.ndim != 3 or target.ndim != 3 or pred.shape[0] != target.shape[0]:
            raise BadFileError(
                f"{os.path.join(predictions_dir, name)}: reconstruction {pred.shape} and target {key} "
                f"{target.shape} must be (slices, h, w) with the same number of slices"
            )
        common = (min(pred.shape[1], target.shape[1]), min(pred.shape[2], target.shape[2]))
        pred, target = center_crop_np(pred, common), center_crop_np(target, common)
        method = str(attrs.get("method", os.path.basename(os.path.normpath(predictions_dir))))
        if method == "diffusion":  # tell the samplers and data-consistency modes apart
            method += f" ({attrs.get('sampler', '?')}, dc={attrs.get('dc', '?')})"
        row = {"method": method, "predictions_dir": predictions_dir, "file": name, "target": key}
        row.update(volume_metrics(target, pred))
        rows.append(row)
    return rows


def summarize(rows: Sequence[Dict]) -> Dict[str, float]:
    """Mean and (population) standard deviation over volumes of each metric."""
    out = {}
    for m in METRICS:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        out[m], out[m + "_std"] = float(values.mean()), float(values.std())
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    try:
        results = [(d, evaluate_folder(d, args.targets_dir, args.target_key)) for d in args.predictions_dir]
    except BadFileError as err:
        return report_error(err)
    csv_rows = []
    header = f"{'method':<32} {'volumes':>7}  {'NMSE':>17}  {'PSNR (dB)':>15}  {'SSIM':>15}  target"
    print(header)
    print("-" * len(header))
    for folder, rows in results:
        s = summarize(rows)
        targets = ",".join(sorted({r["target"] for r in rows}))
        label = rows[0]["method"] if len({r["method"] for r in rows}) == 1 else os.path.basename(folder)
        print(
            f"{label:<32} {len(rows):>7}  {s['nmse']:.4f} ± {s['nmse_std']:.4f}  "
            f"{s['psnr']:6.2f} ± {s['psnr_std']:5.2f}  {s['ssim']:.4f} ± {s['ssim_std']:.4f}  {targets}"
        )
        csv_rows.extend(rows)
        for stat in ("mean", "std"):
            suffix = "" if stat == "mean" else "_std"
            row = {"method": label, "predictions_dir": folder, "file": stat, "target": targets}
            row.update({m: s[m + suffix] for m in METRICS})
            csv_rows.append(row)
    if args.output_csv:
        write_csv(args.output_csv, csv_rows, CSV_FIELDS)
        print(f"wrote {args.output_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
