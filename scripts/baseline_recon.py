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
  shifts), the outside reference: maps from ``bart ecalib`` on the masked k-space (or the file's
  ``sens_maps``), λ in the same normalized units (``-w 1``: BART does not rescale the data again). Needs
  the ``bart`` command (e.g. ``apt-get install bart``); see improved_diffusion/mri/bart.py.

Single-coil data use one all-ones map. The default λ values are generic starting points; the best λ
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
from improved_diffusion.fastmri_data import BadFileError, scale_from_kspace
from improved_diffusion.recon_io import (
    SliceOutput,
    Volume,
    list_inputs,
    mask_spec_from_args,
    print_report,
    report_error,
    run_files,
)
from improved_diffusion.script_util import add_dict_to_argparser

METHODS = ("zero_filled", "sense", "l1_wavelet", "bart_pics")
# Regularization weights in normalized units (image / scale); generic defaults (see the docstring).
DEFAULT_LAMBDA = {"zero_filled": 0.0, "sense": 0.01, "l1_wavelet": 0.001, "bart_pics": 0.001}


def baseline_defaults() -> Dict[str, Any]:
    """Every flag of this script (besides ``--input``) with its default."""
    return dict(
        method="l1_wavelet",
        lamda=-1.0,  # -1: the method's default (DEFAULT_LAMBDA)
        max_iter=100,
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


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="h5 files and/or folders of h5 files")
    add_dict_to_argparser(parser, baseline_defaults())
    return parser


def reconstruct_baseline(
    kspace: np.ndarray,
    mask: np.ndarray,
    maps: Optional[np.ndarray],
    method: str,
    lamda: float,
    max_iter: int = 100,
) -> Dict[str, np.ndarray]:
    """One slice with a classical method.

    Args:
        kspace: masked k-space ``(H, W)`` or ``(C, H, W)`` complex.
        mask: mask broadcastable to it (``(W,)`` or ``(H, W)``).
        maps: ``(C, H, W)`` maps for multi-coil data (None for single-coil).
        method: one of ``zero_filled``, ``sense``, ``l1_wavelet``, ``bart_pics``.
        lamda: regularization weight in normalized units.
        max_iter: iterations of the sigpy solver (of ``bart pics`` for ``bart_pics``).

    Returns:
        ``{"image": (H, W) complex64, "zero_filled": (H, W) complex64}`` in the input's intensity units, and
        ``"residual"``: the relative data residual ``‖A x − y‖ / ‖y‖`` of the image.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    ksp = np.asarray(kspace, dtype=np.complex64)
    if ksp.ndim == 2:
        ksp = ksp[None]
    if maps is None:
        if ksp.shape[0] != 1:
            raise ValueError(f"multi-coil k-space {ksp.shape} needs sensitivity maps")
        mps = np.ones_like(ksp)
    else:
        mps = np.asarray(maps, dtype=np.complex64)
        if mps.shape != ksp.shape:
            raise ValueError(f"sensitivity maps {mps.shape} do not match k-space {ksp.shape}")
    weights = np.ascontiguousarray(np.broadcast_to(np.asarray(mask, dtype=np.float32), ksp.shape))
    scale = float(scale_from_kspace(torch.from_numpy(ksp * weights)))
    y = ksp * weights / scale
    op = MeasurementOperator(torch.from_numpy(y), torch.from_numpy(weights), torch.from_numpy(mps))
    zero_filled = op.zero_filled()[0].numpy()
    if method == "zero_filled":
        image = zero_filled
    elif method == "bart_pics":
        from improved_diffusion.mri.bart import pics_l1

        image = pics_l1(y, mask, mps, lamda, iters=max_iter)
    else:
        import sigpy.mri.app as app  # lazy: sigpy/numba import costs seconds

        if method == "sense":
            solver = app.SenseRecon(y, mps, lamda=lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        else:
            solver = app.L1WaveletRecon(y, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        image = np.asarray(solver.run())
    residual = float(op.residual(torch.from_numpy(np.asarray(image, dtype=np.complex64))[None])[0])
    return {
        "residual": residual,
        "image": (image * scale).astype(np.complex64),
        "zero_filled": (zero_filled * scale).astype(np.complex64),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    dist_util.setup_dist()
    lamda = DEFAULT_LAMBDA.get(args.method, 0.0) if args.lamda < 0 else args.lamda
    try:
        if args.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
        maps_estimator = None
        if args.method == "bart_pics":
            from improved_diffusion.mri import bart

            if not bart.bart_available():
                raise ValueError(
                    "--method bart_pics needs the 'bart' command (BART), which is not on the PATH; "
                    "install it, e.g. 'apt-get install -y bart'"
                )

            def maps_estimator(kspace, mask):
                return torch.from_numpy(bart.ecalib(kspace, mask))

        paths = list_inputs(args.input)
        spec = mask_spec_from_args(args)

        def reconstruct(volume: Volume, slice_idx: int, kspace, maps) -> SliceOutput:
            try:
                out = reconstruct_baseline(
                    kspace,
                    volume.mask,
                    None if maps is None else maps.numpy(),
                    args.method,
                    lamda,
                    args.max_iter,
                )
            except ValueError as err:
                raise BadFileError(f"{volume.path}: slice {slice_idx}: {err}") from None
            return SliceOutput(
                mean=out["image"],
                std=np.zeros(out["image"].shape, dtype=np.float32),
                zero_filled=out["zero_filled"],
                seconds=0.0,
                residual=out["residual"],
            )

        attrs = {"method": args.method, "lamda": lamda, "max_iter": args.max_iter, "num_samples": 1}
        if args.method == "bart_pics":
            attrs.update(bart_version=bart.bart_version(), maps="file sens_maps, else bart ecalib -m1")
        result = run_files(
            paths,
            spec,
            args.output_dir,
            reconstruct,
            attrs,
            overwrite=args.overwrite,
            png=args.png,
            max_png_per_file=args.max_png_per_file,
            progress=args.progress,
            maps_estimator=maps_estimator,
        )
    except (BadFileError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    if dist_util.is_main_process():
        print_report(result, args.output_dir, f"{args.method} (lambda {lamda:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
