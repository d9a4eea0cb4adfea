"""How well a prior denoises slices it never saw: x̂0 PSNR at fixed noise levels, per checkpoint.

A cheap, low-variance measure of prior quality for ablations and model selection. Reconstruction PSNR
needs tens of seconds per slice and carries the sampler's randomness; this needs one network evaluation per
(slice, step). For every slice of ``--data_dir`` (the training loader's image: fully sampled k-space, the
same intensity scale rule, :class:`~improved_diffusion.fastmri_data.FastMRISliceDataset`) and every base
step ``t`` of ``--timesteps`` it draws ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` with a fixed noise per
(slice, step), so every checkpoint sees the same noisy inputs, and scores the model's unclipped x̂0:
``10 log10(max|x0|² / mean|x̂0 - x0|²)`` (complex error). The start of the default reconstruction recipe is
base step 180 (docs/reconstruction.md); the smaller steps are the ones DDIM passes on its way down.

    python benchmarks/heldout_denoising.py \\
        --model_paths logs/ft/ema_0.999_002321.pt,checkpoints/demo/ema_0.999_007000.pt

Prints one line per checkpoint and writes one row per (checkpoint, folder) to ``--output_csv``.
"""

import argparse
import csv
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from improved_diffusion.fastmri_data import FastMRISliceDataset, check_file, list_h5_files  # noqa: E402
from improved_diffusion.inference import load_model  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402


def _noise(seed: int, item: int, step: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise of (slice, step): the same for every checkpoint."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, item, step]).generate_state(1)[0]))
    return torch.randn(*shape, generator=g)


def slices_of(data_dir: str) -> FastMRISliceDataset:
    """Every slice of a folder, as training reads it (no augmentation)."""
    files = [check_file(path) for path in list_h5_files(data_dir)]
    if not files:
        raise ValueError(f"{data_dir}: no .h5 files")
    return FastMRISliceDataset(files)


@torch.no_grad()
def denoising_psnr(model_path: str, data_dir: str, timesteps: Sequence[int], seed: int) -> Dict[int, float]:
    """Mean over the slices of ``data_dir`` of the x̂0 PSNR (dB) at each base step of ``timesteps``."""
    model, diffusion, _ = load_model(model_path, timestep_respacing="")
    bad = [s for s in timesteps if not 0 <= s < diffusion.num_timesteps]
    if bad:
        raise ValueError(
            f"{model_path}: --timesteps {bad} outside its {diffusion.num_timesteps} diffusion steps"
        )
    data = slices_of(data_dir)
    t = torch.tensor(list(timesteps), dtype=torch.long)
    psnr: Dict[int, List[float]] = {int(s): [] for s in timesteps}
    for i in range(len(data)):
        x0, _ = data[i]
        x0 = x0.unsqueeze(0).expand(len(t), *x0.shape)
        noise = torch.stack([_noise(seed, i, int(s), x0.shape[1:]) for s in t])
        x_t = diffusion.q_sample(x0, t, noise=noise)
        out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False)
        err = (out["pred_xstart"] - x0).pow(2).sum(dim=1).mean(dim=(1, 2))  # complex |error|² per step
        peak = x0[0].pow(2).sum(dim=0).max()
        for s, e in zip(timesteps, err):
            psnr[int(s)].append(float(10 * torch.log10(peak / e)))
    return {s: float(np.mean(v)) for s, v in psnr.items()}


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--model_paths", type=str, required=True, help="comma list of checkpoints (config.json beside each)"
    )
    p.add_argument(
        "--data_dir",
        type=str,
        default=os.path.join(REPO_ROOT, "heldout_data", "singlecoil_sigma0.002"),
        help="comma list of folders of fastMRI-format h5 files to score on",
    )
    p.add_argument(
        "--timesteps", type=str, default="20,60,120,180,300", help="base diffusion steps (of 1000) to score"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the noise draws (the same for every checkpoint)"
    )
    p.add_argument(
        "--labels", type=str, default="", help="comma list of row labels, one per checkpoint ('' = paths)"
    )
    p.add_argument("--output_csv", type=str, default="", help="CSV to append rows to ('' = none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    models = [m for m in args.model_paths.split(",") if m]
    labels = args.labels.split(",") if args.labels else models
    if len(labels) != len(models):
        print(f"error: --labels has {len(labels)} entries for {len(models)} checkpoints", file=sys.stderr)
        return 2
    timesteps = [int(s) for s in args.timesteps.split(",")]
    rows = []
    for label, model_path in zip(labels, models):
        for data_dir in args.data_dir.split(","):
            try:
                psnr = denoising_psnr(model_path, data_dir, timesteps, args.seed)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            mean = float(np.mean(list(psnr.values())))
            steps = "  ".join(f"t{s} {v:.2f}" for s, v in psnr.items())
            print(f"{label}  {os.path.basename(data_dir.rstrip('/'))}: mean {mean:.2f} dB  ({steps})")
            row = {
                "label": label,
                "model_path": model_path,
                "data_dir": data_dir,
                "mean_psnr": round(mean, 3),
            }
            row.update({f"psnr_t{s}": round(v, 3) for s, v in psnr.items()})
            rows.append(row)
    if args.output_csv and rows:
        new = not os.path.exists(args.output_csv)
        with open(args.output_csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
