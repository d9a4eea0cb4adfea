"""fastMRI-style scoring of reconstructions against targets: the one place for NMSE / PSNR / SSIM rows.

Used by the reconstruction outputs (``metrics/<stem>.csv`` per slice and volume, written as each volume is
done), scripts/evaluate.py (whole folders against target files, :func:`evaluate_folder`) and
benchmarks/recon_benchmark.py (one run's outputs with their uncertainty and cost, :func:`score_run`).
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
# the per-folder summary rows evaluate.py adds after the volume rows (their ``file`` column)
SUMMARY_ROWS = ("mean", "std")
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


def std_error_correlation(std_map: np.ndarray, abs_error: np.ndarray) -> np.ndarray:
    """Pearson correlation, per slice, between the posterior std map and the absolute error map.

    Args:
        std_map: ``(S, H, W)`` (or ``(H, W)``) pixel-wise standard deviation over the K samples.
        abs_error: same shape, ``|mean reconstruction - target|``.

    Returns:
        ``(S,)`` float64 correlations over all pixels of each slice; NaN where either map is constant
        (a correlation is undefined there, and we do not invent one).
    """
    s = np.asarray(std_map, dtype=np.float64)
    e = np.asarray(abs_error, dtype=np.float64)
    if s.shape != e.shape:
        raise ValueError(f"std map {s.shape} and error map {e.shape} differ in shape")
    if s.ndim == 2:
        s, e = s[None], e[None]
    if s.ndim != 3:
        raise ValueError(f"expected (S, H, W) or (H, W) maps, got {s.shape}")
    s = s.reshape(s.shape[0], -1)
    e = e.reshape(e.shape[0], -1)
    s = s - s.mean(axis=1, keepdims=True)
    e = e - e.mean(axis=1, keepdims=True)
    denom = np.sqrt((s * s).sum(axis=1) * (e * e).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (s * e).sum(axis=1) / denom
    r[denom == 0] = np.nan
    return r


def score_run(predictions_dir: str, targets_dir: str, target_key: str) -> List[Dict[str, Any]]:
    """Per-volume rows of one reconstruction run: metrics, uncertainty calibration and cost.

    Unlike :func:`evaluate_folder` this goes by the targets: every ``*.h5`` of ``targets_dir`` must have
    an output of the same name in ``predictions_dir``, of exactly the target's shape (a benchmark run
    scores every input, at the input's size).

    Args:
        predictions_dir: the run's outputs (``reconstruction``, optional ``reconstruction_std`` and the
            attrs ``num_samples``, ``nfe``, ``seconds_per_slice`` that scripts/ write).
        targets_dir: the input files, holding ``target_key``.
        target_key: ``reconstruction_esc`` or ``reconstruction_rss``.

    Returns:
        One dict per target file, sorted by name: ``file``, ``num_slices``, ``nmse``, ``psnr``, ``ssim``,
        ``seconds_per_slice``, ``nfe``, ``num_samples`` and ``corr``, the per-slice
        :func:`std_error_correlation` (empty without a std map from more than one sample).

    Raises:
        BadFileError: a missing output or target key, an unreadable file, mismatched shapes.
    """
    volumes = []
    for src in list_h5_files(targets_dir, recursive=False):
        name = os.path.basename(src)
        out = os.path.join(predictions_dir, name)
        if not os.path.isfile(out):
            raise BadFileError(f"{out}: missing output of the run (the script did not write it)")
        target, _, _ = read_volume(src, target_key, "target")
        recon, _, attrs = read_volume(out, "reconstruction", "output")
        if recon.shape != target.shape:
            raise BadFileError(
                f"{out}: reconstruction {recon.shape} does not match target {target.shape} in {src}"
            )
        m = volume_metrics(target, recon)
        num_samples = int(attrs.get("num_samples", 0) or 0)
        corr: List[float] = []
        if num_samples > 1:
            with open_h5(out) as f:
                std = f["reconstruction_std"][()] if "reconstruction_std" in f else None
            if std is not None:
                corr = [float(r) for r in std_error_correlation(std, np.abs(recon - target))]
        volumes.append(
            {
                "file": name,
                "num_slices": int(target.shape[0]),
                "nmse": float(m["nmse"]),
                "psnr": float(m["psnr"]),
                "ssim": float(m["ssim"]),
                "seconds_per_slice": float(attrs.get("seconds_per_slice", float("nan"))),
                "nfe": int(attrs.get("nfe", 0) or 0),
                "num_samples": num_samples,
                "corr": corr,
            }
        )
    return volumes
