"""Choose a baseline's λ on a *training* volume at a given noise level (never on the evaluation split).

Adds complex white noise of std ``noise_level × max|k|`` (max over the volume's k-space, the held-out set's
rule, datasets/make_heldout_data.py) to a few slices of one training file, undersamples them with the
benchmark's masks (4×: random, centre fraction 0.08; 8×: equispaced_fraction, 0.04; mask seed 1) and prints
the mean PSNR against the file's target for every method × λ, best per row marked with ``*``::

    .venv/bin/python benchmarks/tune_lambda.py \\
        --input demo_data/singlecoil_train/demo_singlecoil_train_002.h5 --noise_level 0.002 \\
        --methods l1_wavelet,bart_pics --lambdas 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1

The noise passed to the baselines is the total: the file's own (``--file_noise``, the demo set's 0.01) and
the added one.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import baseline_recon  # noqa: E402
from recon_benchmark import PROTOCOLS  # noqa: E402  (the benchmark's masks: the same here)

from improved_diffusion.evaluation import center_crop_np  # noqa: E402
from improved_diffusion.mri.metrics import psnr  # noqa: E402
from improved_diffusion.mri.subsample import create_mask_for_mask_type  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--input", type=str, required=True, help="one fastMRI-format training file")
    p.add_argument("--slices", type=str, default="4,6", help="comma list of slice indices")
    p.add_argument("--noise_level", type=float, default=0.002, help="added noise std / max|k| of the volume")
    p.add_argument("--file_noise", type=float, default=0.01, help="complex noise std already in the file")
    p.add_argument(
        "--methods", type=str, default="l1_wavelet,bart_pics", help="comma list of baseline methods"
    )
    p.add_argument(
        "--lambdas", type=str, default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="comma list of λ"
    )
    p.add_argument("--accelerations", type=str, default="4,8", help="comma list from 4, 8")
    p.add_argument(
        "--mask_type",
        type=str,
        default="",
        choices=("", "random", "equispaced_fraction", "poisson"),
        help="one mask type for every acceleration ('' = the benchmark's: 4x random, 8x "
        "equispaced_fraction), "
        "with the benchmark's centre fraction; poisson for 2-D Poisson scans such as ../shared/data's",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    slices = [int(s) for s in args.slices.split(",")]
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rng = np.random.default_rng(args.seed)
    try:
        with h5py.File(args.input, "r") as f:
            kspace = f["kspace"][()]
            target_key = "reconstruction_rss" if kspace.ndim == 4 else "reconstruction_esc"
            targets = f[target_key][()]
    except (OSError, KeyError) as err:
        print(f"error: {args.input}: {err}", file=sys.stderr)
        return 2
    sigma = args.noise_level * float(np.abs(kspace).max())
    total = float(np.hypot(sigma, args.file_noise))
    for acc in (int(a) for a in args.accelerations.split(",")):
        mask_type, cf = PROTOCOLS[acc]
        mask_type = args.mask_type or mask_type
        data = []
        for s in slices:
            k = kspace[s]
            noisy = k + sigma / np.sqrt(2) * (
                rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)
            )
            mask = create_mask_for_mask_type(mask_type, [cf], [acc])(k.shape, seed=1)[0].numpy()
            mask = mask.reshape(mask.shape[-2:] if mask.ndim == 2 else (-1,))  # (H, W) 2-D or (W,) columns
            data.append(((noisy * mask).astype(np.complex64), mask, targets[s]))
        for method in args.methods.split(","):
            scores: List[float] = []
            for lam in lambdas:
                values = []
                for k, mask, target in data:
                    out = baseline_recon.reconstruct_baseline(k, mask, None, method, lam, noise_std=total)
                    values.append(psnr(target, center_crop_np(out["magnitude"], target.shape), target.max()))
                scores.append(float(np.mean(values)))
            best = int(np.argmax(scores))
            cells = [
                f"{lam:g}:{p:.2f}{'*' if i == best else ''}"
                for i, (lam, p) in enumerate(zip(lambdas, scores))
            ]
            label = f"{acc}x" + (f" {args.mask_type}" if args.mask_type else "")
            print(f"noise {args.noise_level:g} x max|k|, {label}, {method}: " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
