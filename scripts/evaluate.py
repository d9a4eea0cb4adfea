"""fastMRI-style evaluation of reconstruction folders against target files (NMSE, PSNR, SSIM).

Every ``*.h5`` in a predictions folder must hold ``reconstruction`` (slices, h, w) magnitude; the target
is the file of the same name in ``--targets_dir`` (e.g. the input folder), key ``reconstruction_rss``
(multi-coil) or ``reconstruction_esc`` (single-coil), found automatically unless ``--target_key`` is set.
The scoring is :mod:`improved_diffusion.evaluation` (fastMRI's metrics per volume, shapes center-cropped
to the common size); this script prints and writes mean and standard deviation over volumes.

Example:
    python scripts/evaluate.py --predictions_dir recon_out/diffusion recon_out/l1 \
        --targets_dir demo_data/multicoil_val \
        --output_csv recon_out/evaluation.csv
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from improved_diffusion.evaluation import FOLDER_FIELDS, METRICS, SUMMARY_ROWS, evaluate_folder, summarize
from improved_diffusion.io_util import BadFileError
from improved_diffusion.recon_outputs import write_csv
from improved_diffusion.recon_runner import report_error
from improved_diffusion.script_util import HelpFormatter


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
        for stat in SUMMARY_ROWS:
            suffix = "" if stat == "mean" else "_std"
            row = {"method": label, "predictions_dir": folder, "file": stat, "target": targets}
            row.update({m: s[m + suffix] for m in METRICS})
            csv_rows.append(row)
    if args.output_csv:
        write_csv(args.output_csv, csv_rows, FOLDER_FIELDS)
        print(f"wrote {args.output_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
