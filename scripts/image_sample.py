"""Reconstruct undersampled MRI with a trained diffusion prior (posterior sampling with data consistency).

Model and diffusion options come from the checkpoint's config.json (written at training time), never from
flags; only sampling options are flags. Fully sampled inputs are undersampled retrospectively with the
mask flags; inputs that carry a ``mask`` are used as they are. See docs/reconstruction.md.

Example (the defaults are the recommended recipe: DDIM-50 with eta 1 from t0 = 0.2, K = 4, noise-aware DC
with the discrepancy-principle final step; the committed demo checkpoint is the default ``--model_path``):
    python scripts/image_sample.py --input demo_data/singlecoil_val \
        --output_dir recon_out/diffusion --mask_type random --accelerations 4 --center_fractions 0.08
Distributed: ``mpiexec -n 2 python scripts/image_sample.py ...`` or ``torchrun --nproc_per_node 2 ...``
(slices are sharded over ranks; rank 0 writes).
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from improved_diffusion import dist_util
from improved_diffusion.fastmri_data import BadFileError
from improved_diffusion.recon_io import (
    SliceInput,
    SliceOutput,
    Volume,
    list_inputs,
    mask_spec_from_args,
    print_report,
    report_error,
    run_files,
    seed_for_slice,
)
from improved_diffusion.reconstruction import RECOMMENDED_RESPACING, ReconOptions, reconstruct_slice
from improved_diffusion.script_util import (
    LEGACY_MODEL_OPTIONS,
    add_dict_to_argparser,
    create_model_and_diffusion,
    load_config,
    model_and_diffusion_defaults,
    model_options_from_config,
    str2bool,
)

# The committed demo model (README "Train" has the command that made it): the default, so the quick start
# reconstructs the demo data without training first.
DEMO_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo", "ema_0.999_002321.pt"
)


def sample_defaults() -> Dict[str, Any]:
    """Every flag of this script (besides ``--input``) with its default (ReconOptions' defaults)."""
    recon = ReconOptions()
    return dict(
        model_path=DEMO_MODEL,
        output_dir="recon_out",
        # retrospective undersampling of fully sampled inputs (fastMRI's names and defaults for knee 4x)
        mask_type="random",
        center_fractions="0.08",
        accelerations="4",
        seed=-1,  # mask seed; -1 = fastMRI's per-file seed from the file name
        # sampling
        use_ddim=recon.sampler == "ddim",
        timestep_respacing=RECOMMENDED_RESPACING,
        eta=recon.eta,
        t0=str(recon.t0),
        num_samples=recon.num_samples,
        batch_size=recon.batch_size,
        sample_seed=0,
        # noise and data consistency
        noise_std=-1.0,  # complex std of a k-space sample; 0 = noiseless; -1 = noise scan or estimate
        dc=recon.dc,
        prior_scale=recon.prior_scale,
        cg_tol=recon.cg_tol,
        cg_iters=recon.cg_iters,
        final_dc=recon.final_dc,
        clip=recon.clip,
        clip_value=recon.clip_value,
        # outputs
        overwrite=False,
        png=True,
        max_png_per_file=4,
        progress=True,
    )


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="h5 files and/or folders of h5 files")
    add_dict_to_argparser(parser, sample_defaults())
    return parser


def _unknown_flags(tokens: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``["--a", "1", "--b=2", "x"]`` -> ``[("a", "1"), ("b", "2"), (None, "x")]`` (stray values get None)."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if not eq:
                value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
                i += 0 if value is None else 1
            out.append((key, value))
        else:
            out.append((None, tok))
        i += 1
    return out


def check_model_flags(unknown: Sequence[str], config: Dict[str, Any], config_path: str) -> None:
    """Model flags on the command line must agree with the checkpoint's config (else a clear error)."""
    defaults = model_and_diffusion_defaults()
    for key, value in _unknown_flags(unknown):
        if key is None or key not in defaults:
            shown = f"--{key}" if key is not None else value
            raise ValueError(f"unrecognized argument {shown!r} (see --help)")
        want = config.get(key, LEGACY_MODEL_OPTIONS.get(key, defaults[key]))
        try:
            given = str2bool(value) if isinstance(defaults[key], bool) else type(defaults[key])(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            given = value
        if given != want:
            raise ValueError(
                f"--{key} {value} conflicts with the checkpoint's config {config_path} ({key}={want!r}); "
                "model flags come from the checkpoint's config.json, drop the flag"
            )


def load_model(model_path: str, timestep_respacing: str, device: torch.device):
    """The checkpoint's model (eval mode, on ``device``) and its diffusion respaced for sampling.

    Returns:
        ``(model, diffusion, config)``.
    """
    if not model_path:
        raise ValueError("--model_path is required (a checkpoint .pt with config.json beside it)")
    config = load_config(model_path)
    options = model_options_from_config(config, model_path)
    if int(options["in_channels"]) != 2:
        raise ValueError(
            f"{model_path}: config has in_channels={options['in_channels']}, but reconstruction feeds "
            "complex images as 2 channels (real, imaginary)"
        )
    if options["class_cond"]:
        raise ValueError(f"{model_path}: class-conditional models are not supported for reconstruction")
    options["timestep_respacing"] = timestep_respacing
    model, diffusion = create_model_and_diffusion(**options)
    state = dist_util.load_state_dict(model_path, map_location="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{model_path}: weights do not match the model built from its config.json ({first[0]} "
            f"{first[1].strip() if len(first) > 1 else ''})"
        ) from None
    model.to(device)
    model.eval()
    return model, diffusion, config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args, unknown = parser.parse_known_args(argv)
    dist_util.setup_dist()
    try:
        paths = list_inputs(args.input)
        spec = mask_spec_from_args(args)
        config_path = args.model_path
        config = load_config(args.model_path) if args.model_path else {}
        check_model_flags(unknown, config, config_path)
        options = ReconOptions(
            dc=args.dc,
            sampler="ddim" if args.use_ddim else "ancestral",
            t0=args.t0,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            prior_scale=args.prior_scale,
            cg_tol=args.cg_tol,
            cg_iters=args.cg_iters,
            final_dc=args.final_dc,
            clip=args.clip,
            clip_value=args.clip_value,
            eta=args.eta,
        )
        options.validate()
        model, diffusion, config = load_model(args.model_path, args.timestep_respacing, dist_util.dev())

        def reconstruct(volume: Volume, slice_idx: int, inp: SliceInput) -> SliceOutput:
            opts = dataclasses.replace(options, seed=seed_for_slice(args.sample_seed, volume.name, slice_idx))
            r = reconstruct_slice(
                torch.from_numpy(inp.kspace),
                torch.from_numpy(inp.mask),
                model,
                diffusion,
                maps=inp.maps,
                options=opts,
                noise_std=inp.noise_std,
                noise_scan=inp.noise_scan,
            )
            return SliceOutput(
                mean=r.mean.numpy(),
                magnitude=r.magnitude.numpy(),
                std=r.std.numpy(),
                zero_filled=r.zero_filled.numpy(),
                nfe=r.nfe,
                residual=r.residual,
                noise_std=r.noise_std,
                noise_source=r.noise_source,
                noise_ratio=r.noise_ratio,
                calib_misfit=r.calib_misfit,
            )

        method_attrs = {
            "method": "diffusion",
            "checkpoint": os.path.abspath(args.model_path),
            "sampler": options.sampler,
            "timestep_respacing": args.timestep_respacing or str(config["diffusion_steps"]),
            "t0": str(args.t0),
            "dc": options.dc,
            "prior_scale": options.prior_scale,
            "cg_tol": options.cg_tol,
            "cg_iters": options.cg_iters,
            "final_dc": options.final_dc,
            "clip": options.clip,
            "clip_value": options.clip_value,
            "eta": options.eta,
            "num_samples": options.num_samples,
            "sample_seed": args.sample_seed,
        }
        result = run_files(
            paths,
            spec,
            args.output_dir,
            reconstruct,
            method_attrs,
            overwrite=args.overwrite,
            noise_std=args.noise_std if args.noise_std >= 0 else None,
            png=args.png,
            max_png_per_file=args.max_png_per_file,
            progress=args.progress,
        )
    except (BadFileError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    if dist_util.is_main_process():
        print_report(result, args.output_dir, f"diffusion ({options.sampler}, dc={options.dc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
