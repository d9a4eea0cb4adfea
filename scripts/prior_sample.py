"""Draw unconditional samples from a trained prior, to see what it has learned (upstream's image_sample.py).

Model and diffusion options come from the checkpoint's config.json, never from flags (the same
``improved_diffusion.load_model`` as scripts/image_sample.py); only sampling options are flags. Writes to
``--output_dir``:

* ``samples.npz``: ``arr_0`` (N, H, W, 2) float32, the complex samples as (real, imaginary) in the last axis
  (upstream's NHWC layout, in the normalized units the model was trained on: image / scale), and
  ``magnitude`` (N, H, W) float32;
* ``samples.png``: a grid of the magnitudes, all on one grey scale (``--png_vmax``), so a prior that makes
  images too bright or too dark shows it;
* ``samples.json``: the flags, the checkpoint and magnitude statistics.

Example (the committed demo checkpoint is the default ``--model_path``)::

    python scripts/prior_sample.py --num_samples 16 --output_dir prior_samples
    python scripts/prior_sample.py --model_path logs/run1/ema_0.9999_050000.pt --use_ddim False \\
        --timestep_respacing 250 --num_samples 8
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from improved_diffusion.inference import DEMO_MODEL, load_model
from improved_diffusion.io_util import atomic_write, atomic_write_text
from improved_diffusion.mri.fftc import channels_to_complex
from improved_diffusion.script_util import (
    HelpFormatter,
    add_dict_to_argparser,
    check_model_flags,
    downsampling_factor,
    parse_size,
)


def sample_defaults() -> Dict[str, Any]:
    """Every flag of this script with its default."""
    return dict(
        model_path=DEMO_MODEL,
        output_dir="prior_samples",
        num_samples=16,
        batch_size=16,
        use_ddim=True,
        timestep_respacing="ddim50",
        eta=0.0,
        clip_denoised=True,
        seed=0,
        sample_size="",
        device="auto",
        png_vmax=1.0,
        progress=True,
    )


SAMPLE_HELP = {
    "model_path": "checkpoint .pt with the config.json of its training run beside it",
    "output_dir": "folder for samples.npz, samples.png and samples.json (created)",
    "num_samples": "how many samples to draw",
    "batch_size": "samples per network call",
    "use_ddim": "DDIM sampling (else ancestral sampling over the respaced steps)",
    "timestep_respacing": "steps to sample over: 'ddimN' (N evenly spaced), 'N' or 'a,b,c' (upstream's "
    "rule); '' = all training steps",
    "eta": "DDIM noise: 0 deterministic, 1 ancestral-like (with --use_ddim True)",
    "clip_denoised": "clip the predicted x0 to [-1, 1] at every step (as upstream)",
    "seed": "sample i starts from noise seeded by (seed, i); step noise is seeded per batch",
    "sample_size": "'' = the config's image_size, else 'H' or 'H,W' (multiples of the UNet's downsampling)",
    "device": "auto (CUDA if available), cpu or cuda",
    "png_vmax": "grey-scale maximum of the PNG grid in normalized magnitude units (<= 0: the samples' max)",
    "progress": "tqdm progress bar over the sampling steps",
}


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_dict_to_argparser(
        parser, sample_defaults(), help_texts=SAMPLE_HELP, choices={"device": ("auto", "cpu", "cuda")}
    )
    return parser


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    return torch.device(name)


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0])


def initial_noise(seed: int, indices: Sequence[int], shape: Tuple[int, int]) -> torch.Tensor:
    """(B, 2, H, W) N(0, 1): sample i's from its own generator seeded by (seed, i), whatever the batch."""
    out = [torch.randn(2, *shape, generator=torch.Generator().manual_seed(_seed(seed, i))) for i in indices]
    return torch.stack(out)


def magnitude_grid(magnitude: np.ndarray, vmax: float) -> np.ndarray:
    """(N, H, W) -> uint8 grid of ceil(sqrt(N)) columns with 2-pixel gaps, grey = clip(|x| / vmax)."""
    n, h, w = magnitude.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    gap = 2
    grid = np.zeros((rows * (h + gap) - gap, cols * (w + gap) - gap), np.uint8)
    scaled = np.clip(magnitude / vmax, 0, 1) * 255 if vmax > 0 else np.zeros_like(magnitude)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = scaled[i].round()
    return grid


def draw_samples(
    model,
    diffusion,
    *,
    num_samples: int,
    batch_size: int,
    shape: Tuple[int, int],
    use_ddim: bool,
    eta: float,
    clip_denoised: bool,
    seed: int,
    device: torch.device,
    progress: bool,
) -> np.ndarray:
    """(N, 2, H, W) float32 samples.

    The starting noise of sample i depends only on (seed, i); with DDIM and ``eta`` 0 nothing else is
    random, so the samples do not depend on ``batch_size``. The step noise (ancestral, or ``eta`` > 0)
    comes from the global torch generator, seeded here by (seed, first index of the batch).
    """
    from tqdm import tqdm

    steps = diffusion.num_timesteps
    batches = [list(range(i, min(i + batch_size, num_samples))) for i in range(0, num_samples, batch_size)]
    bar = tqdm(
        total=steps * len(batches), desc="sampling", unit="step", file=sys.stderr, disable=not progress
    )
    out = []
    with torch.no_grad():
        for idx in batches:
            torch.manual_seed(_seed(seed, idx[0], 1))
            noise = initial_noise(seed, idx, shape).to(device)
            kwargs = dict(noise=noise, clip_denoised=clip_denoised, device=device, progress=False)
            if use_ddim:
                loop = diffusion.ddim_sample_loop_progressive(model, noise.shape, eta=eta, **kwargs)
            else:
                loop = diffusion.p_sample_loop_progressive(model, noise.shape, **kwargs)
            sample = None
            for step in loop:
                sample = step["sample"]
                bar.update(1)
            out.append(sample.float().cpu())
    bar.close()
    return torch.cat(out).numpy()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, unknown = create_argparser().parse_known_args(argv)
    try:
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--num_samples and --batch_size must be >= 1")
        if args.eta < 0:
            raise ValueError(f"--eta must be >= 0, got {args.eta}")
        device = pick_device(args.device)
        model, diffusion, config = load_model(args.model_path, args.timestep_respacing, device)
        check_model_flags(unknown, config, args.model_path)  # model flags: only ones that agree
        size = int(config["image_size"])
        shape = parse_size(args.sample_size, "--sample_size") or (size, size)
        factor = downsampling_factor(config)
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(f"--sample_size {shape}: both sides must be multiples of {factor} for this UNet")
        os.makedirs(args.output_dir, exist_ok=True)
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    t0 = time.time()
    samples = draw_samples(
        model,
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        shape=shape,
        use_ddim=args.use_ddim,
        eta=args.eta,
        clip_denoised=args.clip_denoised,
        seed=args.seed,
        device=device,
        progress=args.progress,
    )
    elapsed = time.time() - t0
    complex_nhwc = np.ascontiguousarray(np.moveaxis(samples, 1, -1)).astype(np.float32)  # (N, H, W, 2)
    magnitude = np.abs(channels_to_complex(torch.from_numpy(samples)).numpy()).astype(np.float32)

    npz = os.path.join(args.output_dir, "samples.npz")

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
            np.savez(f, arr_0=complex_nhwc, magnitude=magnitude)

    atomic_write(npz, write_npz)
    from PIL import Image

    vmax = args.png_vmax if args.png_vmax > 0 else float(magnitude.max())
    png = os.path.join(args.output_dir, "samples.png")
    atomic_write(png, lambda tmp: Image.fromarray(magnitude_grid(magnitude, vmax)).save(tmp, format="PNG"))
    q = np.percentile(magnitude, [50, 99, 100])
    info = {
        "model_path": os.path.abspath(args.model_path),
        "flags": vars(args),
        "shape": list(shape),
        "num_network_evaluations_per_sample": int(diffusion.num_timesteps),
        "seconds": round(elapsed, 2),
        "magnitude": {"mean": float(magnitude.mean()), "median": q[0], "p99": q[1], "max": q[2]},
        "png_vmax": vmax,
    }
    js = os.path.join(args.output_dir, "samples.json")
    atomic_write_text(js, json.dumps(info, indent=1, default=float) + "\n")
    print(
        f"{args.num_samples} samples {shape[0]}x{shape[1]} in {elapsed:.1f} s -> {npz}, {png}; "
        f"|x| median {q[0]:.3f}, p99 {q[1]:.3f}, max {q[2]:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
