"""fastMRI-style scoring of reconstructions against targets: the one place for NMSE / PSNR / SSIM rows.

Used by the reconstruction outputs (``metrics/<stem>.csv`` per slice and volume, written as each volume is
done), scripts/evaluate.py (whole folders against target files) and benchmarks/recon_benchmark.py.
Metrics per volume as fastMRI's evaluate.py (:func:`improved_diffusion.mri.metrics.volume_metrics`: data
range = volume max, SSIM 7x7 averaged over slices); when shapes differ, both are center-cropped to the
common size (fastMRI crops the target to the reconstruction).
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io_util import BadFileError, list_h5_files, open_h5
from .mri.metrics import volume_metrics
from .recon_inputs import TARGET_KEYS

METRICS = ("nmse", "psnr", "ssim")
# per-volume rows of evaluate_folder (evaluate.py adds mean and std rows per folder)
FOLDER_FIELDS = ("method", "predictions_dir", "file", "target", "nmse", "psnr", "ssim")
# per-slice and volume rows of the reconstruction outputs' metrics/<stem>.csv
METRIC_FIELDS = ("file", "slice", "target", "nmse", "psnr", "ssim", "noise_residual_ratio", "start_step")


def center_crop_np(x: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Center-crop the last two dims of a numpy array (fastMRI's rounding, as mri.fftc.center_crop)."""
    h, w = x.shape[-2:]
    ch, cw = shape
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def nanmean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there is none, without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def metric_rows(
    name: str,
    target: np.ndarray,
    recon: np.ndarray,
    target_key: str,
    noise_ratio: Sequence[float],
    start_step: Any = "",
) -> List[Dict[str, Any]]:
    """Per-slice rows and one ``volume`` row of NMSE/PSNR/SSIM (fastMRI's: data range = volume max).

    Args:
        name: the volume's file name.
        target, recon: ``(slices, h, w)`` magnitudes of the same shape.
        target_key: the target's dataset name (a column).
        noise_ratio: each slice's ``noise_residual_ratio`` (the volume row: their mean).
        start_step: the diffusion's base start step ("" for the baselines).
    """
    maxval = float(target.max())
    common = {"file": name, "target": target_key, "start_step": start_step}
    rows = []
    for i in range(target.shape[0]):
        m = volume_metrics(target[i : i + 1], recon[i : i + 1], maxval=maxval)
        rows.append({**common, "slice": i, **m, "noise_residual_ratio": noise_ratio[i]})
    m = volume_metrics(target, recon)
    rows.append({**common, "slice": "volume", **m, "noise_residual_ratio": nanmean(noise_ratio)})
    return rows


def read_volume(path: str, key: Optional[str], what: str) -> Tuple[np.ndarray, str, Dict[str, Any]]:
    """``(array, key, attrs)`` from an h5 file.

    With ``key`` None the target key follows the file's ``kspace``: 4-D (multi-coil) -> RSS, 3-D
    (single-coil) -> ESC, as fastMRI scores its challenges (its single-coil files hold both keys); a file
    without ``kspace`` takes whichever target it has.

    Raises:
        BadFileError: unreadable, or none of the keys (one line naming the file).
    """
    with open_h5(path) as f:
        keys = [key] if key else [TARGET_KEYS[True], TARGET_KEYS[False]]
        if not key and "kspace" in f:
            keys = [TARGET_KEYS[f["kspace"].ndim == 4]]
        for k in keys:
            if k in f:
                return np.asarray(f[k][()], dtype=np.float64), k, dict(f.attrs)
        raise BadFileError(f"{path}: {what} has none of the keys {keys} (keys: {sorted(f.keys())})")


def evaluate_folder(predictions_dir: str, targets_dir: str, target_key: str = "") -> List[Dict[str, Any]]:
    """Per-volume metric rows (:data:`FOLDER_FIELDS`) for one predictions folder, sorted by file name.

    Every ``*.h5`` there must hold ``reconstruction`` (slices, h, w); its target is the file of the same
    name in ``targets_dir``, key ``target_key`` or found by :func:`read_volume`.

    Raises:
        BadFileError: a missing folder or target, an unreadable file, mismatched slice counts.
    """
    if not os.path.isdir(predictions_dir):
        raise BadFileError(f"{predictions_dir}: predictions folder does not exist")
    names = [os.path.basename(p) for p in list_h5_files(predictions_dir, recursive=False)]
    if not names:
        raise BadFileError(f"{predictions_dir}: no .h5 predictions")
    rows = []
    for name in names:
        pred, _, attrs = read_volume(os.path.join(predictions_dir, name), "reconstruction", "prediction")
        target_path = os.path.join(targets_dir, name)
        if not os.path.isfile(target_path):
            raise BadFileError(f"{target_path}: no target file for prediction {name}")
        target, key, _ = read_volume(target_path, target_key or None, "target")
        if pred.ndim != 3 or target.ndim != 3 or pred.shape[0] != target.shape[0]:
            raise BadFileError(
                f"{os.path.join(predictions_dir, name)}: reconstruction {pred.shape} and target {key} "
                f"{target.shape} must be (slices, h, w) with the same number of slices"
            )
        common = (min(pred.shape[1], target.shape[1]), min(pred.shape[2], target.shape[2]))
        pred, target = center_crop_np(pred, common), center_crop_np(target, common)
        method = str(attrs.get("method", os.path.basename(os.path.normpath(predictions_dir))))
        if method == "diffusion":  # tell the samplers and data-consistency modes apart
            method += f" ({attrs.get('sampler', '?')}, dc={attrs.get('dc', '?')})"
        row = {"method": method, "predictions_dir": predictions_dir, "file": name, "target": key}
        row.update(volume_metrics(target, pred))
        rows.append(row)
    return rows


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Mean and (population) standard deviation over volumes of each metric (``<m>`` and ``<m>_std``)."""
    out = {}
    for m in METRICS:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        out[m], out[m + "_std"] = float(values.mean()), float(values.std())
    return out
