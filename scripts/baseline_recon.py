"""Classical baselines on exactly the inputs, masks and outputs of scripts/image_sample.py.

Methods (sigpy; data divided by the same intensity scale as the diffusion model sees, so λ does not depend
on the scanner's units):

* ``zero_filled``: ``A^H y`` -- the inverse FFT of the zero-filled k-space (single-coil) or its SENSE coil
  combination ``Σ_c conj(S_c) F^H y_c`` (multi-coil);
* ``sense``: ``sigpy.mri.app.SenseRecon``, ``min_x ½‖M F S x − y‖² + ½λ‖x‖²`` by conjugate gradients
  (Pruessmann et al. 1999);
* ``l1_wavelet``: ``sigpy.mri.app.L1WaveletRecon``, ``min_x ½‖M F S x − y‖² + λ‖Ψ x‖₁`` (Daubechies-4
  wavelets, proximal gradient; Lustig et al. 2007, "Sparse MRI");
* ``bart_pics``: the same problem solved by BART (``bart pics -l1 -r λ``, FISTA with BART's random wavelet
  shifts), the outside reference: maps from ``bart ecalib`` on the masked, prewhitened k-space (or the
  file's ``sens_maps``), λ in the same normalized units (``-w 1``: BART does not rescale the data again).
  Needs the ``bart`` command (e.g. ``apt-get install bart``); see improved_diffusion/mri/bart.py.

The measurements go through the same preparation as the diffusion reconstruction
(:func:`improved_diffusion.mri.coils.prepare_slice`: noise model, coil prewhitening, ESPIRiT maps on the
whole fully sampled centre), so every method sees the same data and maps. Single-coil data use one
all-ones map. The default λ values are generic starting points; the best λ
depends on coils and acceleration, and benchmarks/recon_benchmark.py passes per-setting values chosen on a
demo TRAINING volume (``BASELINE_LAMBDA``; the sweep is in docs/results.md), never on validation files.

Example:
    python scripts/baseline_recon.py --method l1_wavelet --input demo_data/multicoil_val \
        --output_dir recon_out/l1
"""

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.data_consistency import MeasurementOperator
from improved_diffusion.fastmri_data import BadFileError
from improved_diffusion.mri.coils import prepare_slice
from improved_diffusion.mri.fov import resolve_fov_rows
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
)
from improved_diffusion.reconstruction import OPTION_HELP, ReconOptions
from improved_diffusion.script_util import HelpFormatter, add_dict_to_argparser
from improved_diffusion.transforms import scale_from_kspace

METHODS = ("zero_filled", "sense", "l1_wavelet", "bart_pics")
# Regularization weights in normalized units (image / scale); generic defaults (see the docstring).
DEFAULT_LAMBDA = {"zero_filled": 0.0, "sense": 0.01, "l1_wavelet": 0.001, "bart_pics": 0.001}


def baseline_defaults() -> Dict[str, Any]:
    """Every flag of this script (besides ``--input``) with its default."""
    return dict(
        method="l1_wavelet",
        lamda=-1.0,
        max_iter=100,
        noise_std=-1.0,  # complex std of a k-space sample; 0 = noiseless; -1 = noise scan or estimate
        # the field of view and coils of the diffusion reconstruction (ReconOptions' defaults)
        fov_rows=ReconOptions.fov_rows,
        num_virtual_coils=ReconOptions.num_virtual_coils,
        refine_maps=0,  # outer iterations of the joint map refinement (mri/jsense.py); 0 = off
        output_dir="recon_out",
        mask_type="random",
        center_fractions="0.08",
        accelerations="4",
        seed=-1,
        overwrite=False,
        png=True,
        max_png_per_file=4,
        progress=True,
    )


BASELINE_HELP: Dict[str, str] = {
    **RUN_FLAG_HELP,
    "method": "the classical reconstruction (module docstring)",
    "lamda": "regularization weight in normalized units (image / scale); -1 = the method's default "
    + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LAMBDA.items() if m != "zero_filled"),
    "max_iter": "iterations of the sigpy solver (of bart pics for bart_pics)",
}


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", nargs="+", type=str, required=True, help=INPUT_HELP)
    add_dict_to_argparser(
        parser,
        baseline_defaults(),
        help_texts={**BASELINE_HELP, **OPTION_HELP},
        choices={**RUN_FLAG_CHOICES, "method": METHODS},
    )
    return parser


def reconstruct_baseline(
    kspace: np.ndarray,
    mask: np.ndarray,
    maps: Optional[np.ndarray],
    method: str,
    lamda: float,
    max_iter: int = 100,
    noise_std: Optional[float] = None,
    noise_scan: Optional[np.ndarray] = None,
    fov_rows: Optional[int] = None,
    num_virtual_coils: int = ReconOptions.num_virtual_coils,
    refine_maps: int = 0,
) -> Dict[str, Any]:
    """One slice with a classical method.

    Args:
        kspace: masked k-space ``(H, W)`` or ``(C, H, W)`` complex, as measured.
        mask: mask broadcastable to it (``(W,)`` or ``(H, W)``).
        maps: stored ``(C, H, W)`` maps of the coils, or None (estimated; single-coil data need none).
        method: one of ``zero_filled``, ``sense``, ``l1_wavelet``, ``bart_pics``.
        lamda: regularization weight in normalized units.
        max_iter: iterations of the sigpy solver (of ``bart pics`` for ``bart_pics``).
        noise_std, noise_scan: the noise (see :func:`improved_diffusion.mri.coils.prepare_slice`).
        fov_rows, num_virtual_coils: readout crop and coil compression, as in ``prepare_slice``.
        refine_maps: outer iterations of the joint map refinement (``prepare_slice``); 0 = off.

    Returns:
        On the reconstruction grid (H = ``fov_rows`` when cropped):
        ``{"image": (H, W) complex64, "magnitude": (H, W), "zero_filled": (H, W)}`` (magnitudes as
        RSS of the unwhitened coil images) in the input's intensity units, ``"residual"``: the relative data
        residual ``‖A x − y‖ / ‖y‖`` of the image, ``"noise_ratio"``: ``‖A x − y‖ / (sigma sqrt(N))``, and
        the ``"data"`` (:class:`~improved_diffusion.mri.coils.CoilData`) it was computed from.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    estimator = None
    if method == "bart_pics":
        from improved_diffusion.mri import bart

        estimator = bart.ecalib
    data = prepare_slice(
        kspace,
        mask,
        maps,
        noise_scan=noise_scan,
        noise_std=noise_std,
        estimate_maps=estimator,
        fov_rows=fov_rows,
        num_virtual_coils=num_virtual_coils,
        refine_maps=refine_maps,
    )
    ksp = data.kspace if data.multicoil else data.kspace[None]
    mps = data.maps if data.multicoil else np.ones_like(ksp)
    mask = data.mask
    weights = np.ascontiguousarray(np.broadcast_to(mask, ksp.shape[-2:]))
    scale = float(scale_from_kspace(torch.from_numpy(ksp)))
    y = ksp * weights / scale
    op = MeasurementOperator(
        torch.from_numpy(y), torch.from_numpy(weights), torch.from_numpy(mps), sigma=data.sigma / scale
    )
    zero_filled = op.zero_filled()[0].numpy()
    if method == "zero_filled":
        image = zero_filled
    elif method == "bart_pics":
        image = bart.pics_l1(y, mask, mps, lamda, iters=max_iter)
    else:
        import sigpy.mri.app as app  # lazy: sigpy/numba import costs seconds

        if method == "sense":
            solver = app.SenseRecon(y, mps, lamda=lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        else:
            solver = app.L1WaveletRecon(y, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        image = np.asarray(solver.run())
    image_t = torch.from_numpy(np.asarray(image, dtype=np.complex64))[None]
    return {
        "residual": float(op.residual(image_t)[0]),
        "noise_ratio": float(op.noise_ratio(image_t)[0]),
        "image": (image * scale).astype(np.complex64),
        "magnitude": (np.abs(image) * data.intensity * scale).astype(np.float32),
        "zero_filled": (np.abs(zero_filled) * data.intensity * scale).astype(np.float32),
        "data": data,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    try:
        dist_util.setup_dist()
    except (ValueError, dist_util.LauncherError) as err:
        return report_error(err)
    lamda = DEFAULT_LAMBDA.get(args.method, 0.0) if args.lamda < 0 else args.lamda
    try:
        if args.method == "bart_pics":
            from improved_diffusion.mri import bart

            if not bart.bart_available():
                raise ValueError(
                    "--method bart_pics needs the 'bart' command (BART), which is not on the PATH; "
                    "install it, e.g. 'apt-get install -y bart'"
                )
        paths = list_inputs(args.input)
        spec = mask_spec_from_args(args)

        def reconstruct(volume: Volume, slice_idx: int, inp: SliceInput) -> SliceOutput:
            out = reconstruct_baseline(
                inp.kspace,
                inp.mask,
                inp.maps,
                args.method,
                lamda,
                args.max_iter,
                inp.noise_std,
                inp.noise_scan,
                resolve_fov_rows(args.fov_rows, volume.recon_rows, volume.shape[0]),
                args.num_virtual_coils,
                args.refine_maps,
            )
            return SliceOutput(
                mean=out["image"],
                magnitude=out["magnitude"],
                std=np.zeros(out["magnitude"].shape, dtype=np.float32),
                zero_filled=out["zero_filled"],
                residual=out["residual"],
                noise_std=out["data"].sigma,
                noise_source=out["data"].noise_source,
                noise_ratio=out["noise_ratio"],
                calib_misfit=out["data"].calib_misfit,
            )

        attrs = {
            "method": args.method,
            "lamda": lamda,
            "max_iter": args.max_iter,
            "num_samples": 1,
            "fov_rows": args.fov_rows,
            "num_virtual_coils": args.num_virtual_coils,
            "refine_maps": args.refine_maps,
        }
        if args.method == "bart_pics":
            attrs.update(bart_version=bart.bart_version(), maps="file sens_maps, else bart ecalib -m1")
        result = run_files(paths, spec, reconstruct=reconstruct, method_attrs=attrs, **run_flags(args))
    except (BadFileError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    if dist_util.is_main_process():
        print_report(result, args.output_dir, f"{args.method} (lambda {lamda:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
