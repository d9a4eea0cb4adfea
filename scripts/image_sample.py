"""Reconstruct undersampled MRI with a trained diffusion prior (posterior sampling with data consistency).

Model and diffusion options come from the checkpoint's config.json (written at training time), never from
flags; only sampling options are flags. Fully sampled inputs are undersampled retrospectively with the
mask flags; inputs that carry a ``mask`` are used as they are. See docs/reconstruction.md.

Example (the defaults are the recommended recipe: DDIM-50 with eta 1 from t0 = 0.18 (base step 180), K = 4,
noise-aware DC with the discrepancy-principle final step; the committed demo checkpoint is the default
``--model_path``):
    python scripts/image_sample.py --input demo_data/singlecoil_val \
        --output_dir recon_out/diffusion --mask_type random --accelerations 4 --center_fractions 0.08
Distributed: ``mpiexec -n 2 python scripts/image_sample.py ...`` or ``torchrun --nproc_per_node 2 ...``
(slices are sharded over ranks; rank 0 writes).
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from improved_diffusion import dist_util
from improved_diffusion.data_consistency import CLIP_MODES, DC_MODES
from improved_diffusion.fastmri_data import BadFileError
from improved_diffusion.inference import DEMO_MODEL, load_model
from improved_diffusion.recon_inputs import SliceInput, Volume, list_inputs, mask_spec_from_args
from improved_diffusion.recon_outputs import SliceOutput
from improved_diffusion.recon_runner import (
    INPUT_HELP,
    RUN_FLAG_CHOICES,
    RUN_FLAG_HELP,
    print_report,
    report_error,
    run_files,
    run_flags,
    seed_for_slice,
)
from improved_diffusion.reconstruction import (
    DEFAULT_T0,
    OPTION_HELP,
    RECOMMENDED_RESPACING,
    SINGLE_COIL_ADAPT_STEPS,
    ReconOptions,
    parse_t0,
    reconstruct_slice,
    resolve_start_step,
)
from improved_diffusion.script_util import (
    HelpFormatter,
    add_dict_to_argparser,
    add_upstream_flags,
    check_model_flags,
    load_config,
)

# Upstream's image_sample.py flag, mapped onto --clip (a note line says how).
UPSTREAM_SAMPLE_FLAGS = {
    "clip_denoised": (True, "True keeps --clip (x0 bounded before data consistency), False sets --clip none"),
}


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
        seed=-1,
        # sampling
        use_ddim=recon.sampler == "ddim",
        timestep_respacing=RECOMMENDED_RESPACING,
        eta=recon.eta,
        t0="",
        start_step=-1,
        num_samples=recon.num_samples,
        batch_size=recon.batch_size,
        sample_seed=0,
        # noise and data consistency
        noise_std=-1.0,
        dc=recon.dc,
        prior_scale=recon.prior_scale,
        cg_tol=recon.cg_tol,
        cg_iters=recon.cg_iters,
        final_dc=recon.final_dc,
        clip=recon.clip,
        clip_value=recon.clip_value,
        # test-time adaptation of the prior (automatic: single-coil data only)
        adapt_steps=recon.adapt_steps,
        adapt_lr=recon.adapt_lr,
        adapt_params=recon.adapt_params,
        # field of view and coils
        fov_rows=recon.fov_rows,
        num_virtual_coils=recon.num_virtual_coils,
        refine_maps=recon.refine_maps,  # outer iterations of the joint map refinement; 0 = off
        zero_outside_maps=recon.zero_outside_maps,
        # outputs
        overwrite=False,
        png=True,
        max_png_per_file=4,
        progress=True,
    )


SAMPLE_HELP: Dict[str, str] = {
    **RUN_FLAG_HELP,
    "model_path": "checkpoint .pt with the config.json of its training run beside it (model flags come "
    "from there)",
    "use_ddim": "DDIM sampling (else ancestral p_sample over the respaced steps, with learned variances)",
    "timestep_respacing": "steps to sample over: 'ddimN' (N evenly spaced), 'N' or 'a,b,c' (upstream's "
    "rule); '' = all training steps",
    "eta": "DDIM eta: 0 deterministic, 1 ancestral-like",
    "t0": f"start as a fraction in (0, 1] of the base chain, with a decimal point (1.0 = from pure noise); "
    f"'' = {DEFAULT_T0} unless --start_step is given; the chain starts at the respaced step nearest to base "
    "step round(t0 T) - 1",
    "start_step": "start at this step of the base chain (e.g. 199 of 1000; the respaced step nearest to "
    "it); -1 = use --t0; excludes --t0",
    "num_samples": "K posterior samples per slice (their mean is the output, their spread the std map)",
    "batch_size": "samples per network batch (0 = all K at once); NFE per sample is unchanged",
    "sample_seed": "seed of the sampling noise, combined with the file name and slice (shard-independent)",
    "dc": "data consistency: project (x0 made consistent before each step), replace (measured k-space put "
    "into x_{t-1}) or none",
    "prior_scale": "error of the prior's x0 relative to the step's noise level (weight of the "
    "measurements in each DC step)",
    "cg_tol": "multi-coil CG solves stop when their residual has fallen by this factor",
    "cg_iters": "iteration cap of the CG solves",
    "final_dc": "end every sample with the discrepancy-principle DC step (fit to the noise level)",
    "clip": "bound on x0 before DC (upstream's --clip_denoised True is magnitude-like, False is none)",
    "clip_value": "the bound, in normalized units (image / scale)",
    "adapt_steps": "test-time adaptation: at most this many Adam steps fitting part of the prior to the "
    f"scan's measurements after a one-sample first pass; 0 = off; -1 = {SINGLE_COIL_ADAPT_STEPS} for "
    "single-coil data, off for multi-coil data, where it adds nothing (docs/reconstruction.md)",
    "adapt_lr": "learning rate of the test-time adaptation",
    "adapt_params": "what adapts: norm (GroupNorm scales/shifts), out (output block) or norm,out",
}
SAMPLE_CHOICES: Dict[str, Sequence[Any]] = {**RUN_FLAG_CHOICES, "dc": DC_MODES, "clip": CLIP_MODES}


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", nargs="+", type=str, required=True, help=INPUT_HELP)
    add_dict_to_argparser(
        parser, sample_defaults(), help_texts={**SAMPLE_HELP, **OPTION_HELP}, choices=SAMPLE_CHOICES
    )
    add_upstream_flags(parser, UPSTREAM_SAMPLE_FLAGS)  # so copy-pasted upstream commands run
    return parser


def apply_clip_denoised(args: argparse.Namespace) -> Optional[str]:
    """Map upstream's ``--clip_denoised`` onto ``--clip``; returns the note line (None when not given)."""
    if args.clip_denoised is None:
        return None
    if args.clip_denoised:
        return f"note: --clip_denoised True: x0 is bounded by --clip {args.clip} before data consistency"
    args.clip = "none"
    return "note: --clip_denoised False: --clip none (x0 is not bounded before data consistency)"


def recon_options(args: argparse.Namespace) -> ReconOptions:
    """The :class:`ReconOptions` of the flags (validated: one ValueError line naming the bad flag)."""
    t0 = str(args.t0).strip() or None
    start_step = None if int(args.start_step) < 0 else int(args.start_step)
    if t0 is not None and start_step is not None:
        raise ValueError(f"--t0 {t0} and --start_step {start_step}: give one start, not both")
    if t0 is not None:
        try:
            parse_t0(t0)
        except ValueError as err:
            raise ValueError(f"--{err}") from None
    options = ReconOptions(
        dc=args.dc,
        sampler="ddim" if args.use_ddim else "ancestral",
        t0=t0,
        start_step=start_step,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        prior_scale=args.prior_scale,
        cg_tol=args.cg_tol,
        cg_iters=args.cg_iters,
        final_dc=args.final_dc,
        clip=args.clip,
        clip_value=args.clip_value,
        eta=args.eta,
        adapt_steps=args.adapt_steps,
        adapt_lr=args.adapt_lr,
        adapt_params=args.adapt_params,
        fov_rows=args.fov_rows,
        num_virtual_coils=args.num_virtual_coils,
        refine_maps=args.refine_maps,
        zero_outside_maps=args.zero_outside_maps,
    )
    options.validate()
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args, unknown = parser.parse_known_args(argv)
    try:
        dist_util.setup_dist()
    except (ValueError, dist_util.LauncherError) as err:
        return report_error(err)
    try:
        note = apply_clip_denoised(args)
        if note and dist_util.is_main_process():
            print(note)
        paths = list_inputs(args.input)
        spec = mask_spec_from_args(args)
        config_path = args.model_path
        config = load_config(args.model_path) if args.model_path else {}
        check_model_flags(unknown, config, config_path)
        options = recon_options(args)
        model, diffusion, config = load_model(args.model_path, args.timestep_respacing, dist_util.dev())
        # a start outside this diffusion's chain is refused now, not at the first slice
        resolve_start_step(diffusion, t0=options.t0, start_step=options.start_step)

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
                recon_rows=volume.recon_rows,
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
                start_step=r.base_start_step,
            )

        method_attrs = {
            "method": "diffusion",
            "checkpoint": os.path.abspath(args.model_path),
            "sampler": options.sampler,
            "timestep_respacing": args.timestep_respacing or str(config["diffusion_steps"]),
            # the start as asked for (the base step it gave is the output's start_step attr)
            "t0": options.t0 or ("" if options.start_step is not None else str(DEFAULT_T0)),
            "start_step": -1 if options.start_step is None else options.start_step,
            "dc": options.dc,
            "prior_scale": options.prior_scale,
            "cg_tol": options.cg_tol,
            "cg_iters": options.cg_iters,
            "final_dc": options.final_dc,
            "clip": options.clip,
            "clip_value": options.clip_value,
            "eta": options.eta,
            "num_samples": options.num_samples,
            "batch_size": options.batch_size,  # the noise draws follow the batches
            "sample_seed": args.sample_seed,
            "fov_rows": options.fov_rows,
            "num_virtual_coils": options.num_virtual_coils,
            "refine_maps": options.refine_maps,
            "zero_outside_maps": options.zero_outside_maps,
            # as asked (-1: automatic, see the flag's help)
            "adapt_steps": options.adapt_steps,
            "adapt_lr": options.adapt_lr,
            "adapt_params": options.adapt_params,
        }
        result = run_files(paths, spec, reconstruct=reconstruct, method_attrs=method_attrs, **run_flags(args))
    except (BadFileError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    if dist_util.is_main_process():
        print_report(result, args.output_dir, f"diffusion ({options.sampler}, dc={options.dc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
