"""The real 8-coil brain scan (../shared/data, 2-D Poisson, about 8x): diffusion beside the baselines.

Runs scripts/image_sample.py (its defaults: the recommended recipe) and scripts/baseline_recon.py (SENSE,
L1-wavelet, BART pics) on the scan exactly as a user would, then scores every output against the file's
``reference_pics`` (a BART compressed-sensing reconstruction: agreement, not ground truth). The outputs
are in the scan's units and the reference in BART's, so each output is first scaled by the least-squares
factor ``<out, ref> / <out, out>``; PSNR uses the reference's maximum, SSIM fastMRI's 7x7 window.

Writes ``results/real_scan.csv`` (method, PSNR, SSIM, residual / noise level, seconds) and
``results/real_scan.png`` (reference | each method).

    .venv/bin/python benchmarks/real_scan.py [--scan ../shared/data/real_brain_8coil_poisson.h5]
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from improved_diffusion.mri.metrics import psnr, ssim  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

SCAN = os.path.join(REPO_ROOT, "..", "shared", "data", "real_brain_8coil_poisson.h5")
# (label, script, flags). λ of the baselines: chosen by benchmarks/tune_lambda.py on a demo TRAINING volume
# (demo_multicoil_train_001.h5, slices 4 and 6) with a 2-D Poisson 8x mask and added noise 0.001 x max|k|, the
# scan's own noise level (its noise estimate is 0.00104 x max|k|); never tuned on this scan. BART's maps fail
# on that volume's 10 x 10 calibration square (9.7 dB at its best λ, 0.1, the grid's edge), so BART also runs
# with the λ of its 4x tune at that noise level (3e-4), where its maps work.
METHODS = [
    ("diffusion (defaults)", "image_sample.py", []),
    ("SENSE", "baseline_recon.py", ["--method", "sense", "--lamda", "3e-2"]),
    ("L1-wavelet", "baseline_recon.py", ["--method", "l1_wavelet", "--lamda", "3e-2"]),
    ("BART pics -l1", "baseline_recon.py", ["--method", "bart_pics", "--lamda", "1e-1"]),
    ("BART pics -l1 (4x λ)", "baseline_recon.py", ["--method", "bart_pics", "--lamda", "3e-4"]),
]


def score(out: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """PSNR/SSIM of ``out`` against ``ref`` after the least-squares intensity factor."""
    a = float((out * ref).sum() / max((out * out).sum(), 1e-30))
    return {"psnr": psnr(ref, a * out, ref.max()), "ssim": ssim(ref[None], (a * out)[None], ref.max())}


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--scan", type=str, default=SCAN, help="the real scan (kspace, mask, reference_pics)")
    p.add_argument(
        "--work_dir", type=str, default=os.path.join(REPO_ROOT, "recon_out", "real_scan"), help="outputs"
    )
    p.add_argument(
        "--results_dir", type=str, default=os.path.join(REPO_ROOT, "results"), help="CSV and PNG go here"
    )
    p.add_argument("--methods", type=str, default="", help="comma list of labels to run ('' = all)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    if not os.path.isfile(args.scan):
        print(f"real_scan: error: {args.scan}: no such file", file=sys.stderr)
        return 2
    with h5py.File(args.scan, "r") as f:
        ref = np.asarray(f["reference_pics"][0], dtype=np.float64)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: List[Dict] = []
    failed = 0
    panels = [ref / ref.max()]
    for label, script, flags in METHODS:
        if wanted and label not in wanted:
            continue
        out_dir = os.path.join(args.work_dir, re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_"))
        cmd = [sys.executable, os.path.join(REPO_ROOT, "scripts", script), "--input", args.scan]
        cmd += ["--output_dir", out_dir, "--overwrite", "True", "--progress", "False", *flags]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - start
        if proc.returncode != 0:
            print(f"real_scan: {label} failed:\n{proc.stderr.strip()}", file=sys.stderr)
            failed += 1
            continue
        with h5py.File(os.path.join(out_dir, os.path.basename(args.scan)), "r") as f:
            out = np.asarray(f["reconstruction"][0], dtype=np.float64)
            ratio = float(np.nanmean(f.attrs["noise_residual_ratio"]))
        m = score(out, ref)
        rows.append({"method": label, **m, "noise_residual_ratio": ratio, "seconds": seconds})
        a = float((out * ref).sum() / (out * out).sum())
        panels.append(np.clip(a * out / ref.max(), 0, 1))
        print(
            f"{label}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, residual/noise {ratio:.2f}, "
            f"{seconds:.0f} s"
        )
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "real_scan.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "psnr", "ssim", "noise_residual_ratio", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    from PIL import Image

    strip = np.concatenate([np.pad(pnl, ((0, 0), (0, 4))) for pnl in panels], axis=1)
    Image.fromarray((strip * 255 + 0.5).astype(np.uint8)).save(
        os.path.join(args.results_dir, "real_scan.png")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
