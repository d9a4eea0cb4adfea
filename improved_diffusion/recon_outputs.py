"""Outputs of the reconstruction scripts: h5, PNG previews and metrics CSV, all written atomically.

Outputs per input file, same file name, in the output folder (all written atomically):

* ``<name>.h5``: ``reconstruction`` (slices, h, w) float32 magnitude at the target's crop (the full image
  when there is no target), ``reconstruction_std`` (same shape), ``reconstruction_complex``
  (slices, H, W) complex64 on the full grid, ``mask``; attrs describe the method and the run, with per
  slice ``noise_std`` (complex std of a whitened k-space sample), ``noise_residual_ratio``
  (``‖A x − y‖ / (noise_std sqrt(N))``, about 1 when the output fits the data to the noise level) and
  ``calib_misfit`` (how well the maps explain the calibration data, 1 = to the noise level), for the
  diffusion ``start_step`` (the base-chain step the reverse chain started at), and ``options_hash``: a short
  hash of everything that affects the result (method, checkpoint, sampling and DC options, mask spec,
  ``--noise_std``). An existing output with the same hash is skipped; one with another hash (or none) is
  redone, with one line saying so; ``--overwrite`` redoes every file;
* ``png/<stem>_sliceNNN.png`` previews: zero-filled | reconstruction | target | |error| | std;
* ``metrics/<stem>.csv`` per-slice and per-volume NMSE/PSNR/SSIM against the target, and a summary
  ``metrics.csv`` of the volume rows of this run's input files (written now or skipped as up to date).
"""

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from .evaluation import METRIC_FIELDS, center_crop_np, metric_rows, nanmean
from .io_util import atomic_write
from .recon_inputs import MaskSpec, Volume


@dataclass
class SliceOutput:
    """One reconstructed slice (numpy, full k-space grid, the input's intensity units).

    ``magnitude`` is what the output's ``reconstruction`` holds: the RSS-equivalent magnitude for
    multi-coil data (:mod:`improved_diffusion.mri.coils`), ``|mean|`` for single-coil data.
    """

    mean: np.ndarray  # (H, W) complex
    magnitude: np.ndarray  # (H, W) real
    std: np.ndarray  # (H, W) real
    zero_filled: np.ndarray  # (H, W) real magnitude
    seconds: float = 0.0
    nfe: int = 0
    residual: float = float("nan")
    noise_std: float = float("nan")
    noise_source: str = ""
    noise_ratio: float = float("nan")
    calib_misfit: float = float("nan")
    start_step: int = -1  # the diffusion's base start step; -1 for the baselines


def output_path(output_dir: str, volume_name: str) -> str:
    return os.path.join(output_dir, volume_name)


def options_hash(method_attrs: Dict[str, Any], spec: MaskSpec, noise_std: Optional[float]) -> str:
    """12 hex digits of SHA-256 over everything that affects an output: the method and its options
    (``method_attrs``: checkpoint, sampler, DC, seeds, ...), the mask spec and the ``--noise_std``
    override."""
    payload = {
        "method": {k: method_attrs[k] for k in sorted(method_attrs)},
        "mask": {
            "mask_type": spec.mask_type,
            "center_fractions": [float(c) for c in spec.center_fractions],
            "accelerations": [float(a) for a in spec.accelerations],
            "seed": spec.seed,
        },
        "noise_std": noise_std,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stored_options_hash(path: str) -> Optional[str]:
    """The ``options_hash`` attr of an existing output, or None (missing, unreadable or older file)."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("options_hash")
    except OSError:
        return None
    return None if value is None else str(value)


def write_recon_h5(
    path: str,
    reconstruction: np.ndarray,
    reconstruction_std: np.ndarray,
    reconstruction_complex: np.ndarray,
    mask: np.ndarray,
    attrs: Dict[str, Any],
) -> None:
    """Write one output volume (see the module docstring) atomically."""

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("reconstruction", data=reconstruction.astype(np.float32))
            f.create_dataset("reconstruction_std", data=reconstruction_std.astype(np.float32))
            f.create_dataset("reconstruction_complex", data=reconstruction_complex.astype(np.complex64))
            f.create_dataset("mask", data=mask.astype(np.float32))
            for key, value in attrs.items():
                f.attrs[key] = "" if value is None else value

    atomic_write(path, write)


def write_csv(path: str, rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> None:
    """Write rows (dicts) as CSV with a header, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)

    atomic_write(path, write)


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _to_uint8(img: np.ndarray, vmax: float) -> np.ndarray:
    return (np.clip(img / max(vmax, 1e-12), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_preview_png(path: str, panels: Sequence[Tuple[str, Optional[np.ndarray], float]]) -> None:
    """Side-by-side grayscale PNG of labelled magnitude panels ``(title, image (h, w) or None, vmax)``.

    Panels that are None are skipped; each is scaled to [0, vmax].
    """
    from PIL import Image, ImageDraw  # lazy: only the scripts write previews

    panels = [(t, p, v) for t, p, v in panels if p is not None]
    # Small images are enlarged (nearest neighbour) so the labels fit.
    zoom = max(1, -(-128 // max(p.shape[0] for _, p, _ in panels)))
    if zoom > 1:
        panels = [(t, np.kron(p, np.ones((zoom, zoom))), v) for t, p, v in panels]
    h = max(p.shape[0] for _, p, _ in panels)
    gap, label_h = 4, 14
    width = sum(p.shape[1] for _, p, _ in panels) + gap * (len(panels) - 1)
    canvas = Image.new("L", (width, h + label_h), color=0)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, img, vmax in panels:
        canvas.paste(Image.fromarray(_to_uint8(img, vmax)), (x, label_h))
        draw.text((x + 2, 1), title, fill=255)
        x += img.shape[1] + gap

    def write(tmp: str) -> None:
        canvas.save(tmp, format="PNG")

    atomic_write(path, write)


def write_metrics_summary(output_dir: str, names: Sequence[str]) -> Optional[str]:
    """Collect the volume rows of ``metrics/<stem>.csv`` of the volumes ``names`` (this run's files, not
    whatever else the folder holds) into ``metrics.csv``; returns its path, or None without any rows."""
    rows = []
    for name in sorted(names):
        path = os.path.join(output_dir, "metrics", os.path.splitext(name)[0] + ".csv")
        if os.path.isfile(path):
            rows.extend(r for r in read_csv(path) if r["slice"] == "volume")
    if not rows:
        return None
    path = os.path.join(output_dir, "metrics.csv")
    write_csv(path, rows, METRIC_FIELDS)
    return path


def write_volume(
    volume: Volume,
    outputs: Dict[int, SliceOutput],
    output_dir: str,
    method_attrs: Dict[str, Any],
    png: bool,
    max_png_per_file: int,
) -> Dict[str, Any]:
    """Assemble the slices of one volume and write its h5, previews and metrics (rank 0)."""
    order = range(volume.num_slices)
    mean = np.stack([outputs[i].mean for i in order])
    crop = volume.target_shape
    recon = center_crop_np(np.stack([outputs[i].magnitude for i in order]), crop).astype(np.float32)
    std = center_crop_np(np.stack([outputs[i].std for i in order]), crop).astype(np.float32)
    zero_filled = center_crop_np(np.stack([outputs[i].zero_filled for i in order]), crop)
    seconds = float(np.mean([outputs[i].seconds for i in order]))
    nfe = int(max(outputs[i].nfe for i in order))
    residual = float(np.nanmean([outputs[i].residual for i in order]))
    noise_ratio = np.array([outputs[i].noise_ratio for i in order], dtype=np.float64)
    start_step = int(outputs[0].start_step)
    attrs = dict(method_attrs)
    if start_step >= 0:
        attrs["start_step"] = start_step
    attrs.update(
        mask_type=volume.mask_type,
        acceleration=volume.acceleration,
        effective_acceleration=volume.effective_acceleration,
        num_low_frequencies=-1 if volume.num_low_frequencies is None else volume.num_low_frequencies,
        nfe=nfe,
        seconds_per_slice=seconds,
        data_residual=residual,
        noise_std=np.array([outputs[i].noise_std for i in order], dtype=np.float64),
        noise_source=outputs[0].noise_source,
        noise_residual_ratio=noise_ratio,
        calib_misfit=np.array([outputs[i].calib_misfit for i in order], dtype=np.float64),
        target_key=volume.target_key or "",
        input_file=os.path.abspath(volume.path),
    )
    target = volume.read_target()
    stem = os.path.splitext(volume.name)[0]
    summary = {
        "file": volume.name,
        "seconds_per_slice": seconds,
        "nfe": nfe,
        "data_residual": residual,
        "noise_residual_ratio": nanmean(noise_ratio),
    }
    if target is not None:
        rows = metric_rows(
            volume.name, target, recon, volume.target_key, noise_ratio, start_step if start_step >= 0 else ""
        )
        write_csv(os.path.join(output_dir, "metrics", stem + ".csv"), rows, METRIC_FIELDS)
        summary.update({k: rows[-1][k] for k in ("nmse", "psnr", "ssim")}, target=volume.target_key)
    if png and max_png_per_file > 0:
        n = volume.num_slices
        picks = sorted(set(np.linspace(0, n - 1, min(n, max_png_per_file)).round().astype(int).tolist()))
        for i in picks:
            vmax = float(target[i].max()) if target is not None else float(recon[i].max())
            err = None if target is None else np.abs(recon[i] - target[i])
            panels = [
                ("zero-filled", zero_filled[i], vmax),
                ("recon", recon[i], vmax),
                ("target", None if target is None else target[i], vmax),
                ("|error| x5", err, vmax / 5),
                ("std x5", std[i] if std[i].any() else None, vmax / 5),
            ]
            write_preview_png(os.path.join(output_dir, "png", f"{stem}_slice{i:03d}.png"), panels)
    # the h5 last: it marks the volume done, so a failure above leaves nothing that a rerun would skip
    write_recon_h5(output_path(output_dir, volume.name), recon, std, mean, volume.mask, attrs)
    return summary
