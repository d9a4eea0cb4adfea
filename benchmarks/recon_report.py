"""Aggregation, tables and the figure of the reconstruction benchmark (used by recon_benchmark.py).

Pure functions on numpy arrays and dicts, so they can be tested without a model:

* :func:`summarize` — per-volume metrics of a method and setting -> a CSV row (mean ± std over volumes);
* :func:`write_csv`, :func:`write_per_volume_csv`, :func:`write_markdown_table` — results/recon_metrics.csv,
  results/recon_per_volume.csv and results/recon_table.md;
* :func:`make_figure` — results/recon_figure.png (one slice, every method, |error| maps, std maps).
"""

from __future__ import annotations

import csv
import io
from typing import Dict, List, Optional, Sequence

import numpy as np

from improved_diffusion.io_util import atomic_write, atomic_write_text

# The columns of results/recon_metrics.csv, in order (paper/results_values.py reads the same list).
CSV_COLUMNS = [
    "method",
    "label",
    "coil",
    "acceleration",
    "mask",
    "center_fraction",
    "target",
    "num_volumes",
    "num_slices",
    "nmse_mean",
    "nmse_std",
    "psnr_mean",
    "psnr_std",
    "ssim_mean",
    "ssim_std",
    "nfe",
    "num_samples",
    "sec_per_slice",
    "std_err_corr_mean",
    "std_err_corr_std",
]

# The columns of results/recon_per_volume.csv (one row per method, setting and volume).
PER_VOLUME_COLUMNS = ["method", "coil", "acceleration", "file", "num_slices", "nmse", "psnr", "ssim"]
PER_VOLUME_COLUMNS += ["seconds_per_slice", "nfe", "num_samples"]

COIL_LABELS = {"singlecoil": "single-coil", "multicoil": "multi-coil"}


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and population standard deviation (ddof=0) of finite values; (nan, nan) if there are none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def summarize(
    *,
    method: str,
    label: str,
    coil: str,
    acceleration: int,
    mask: str,
    center_fraction: float,
    target: str,
    per_volume: List[Dict[str, float]],
    num_slices: int,
    nfe: int,
    num_samples: int,
    sec_per_slice: float,
    corr_per_slice: Optional[Sequence[float]] = None,
) -> Dict[str, object]:
    """One tidy CSV row: metrics as mean ± std over volumes, correlation as mean ± std over slices.

    Args:
        per_volume: one ``{"nmse", "psnr", "ssim"}`` dict per volume (fastMRI conventions, per volume).
        corr_per_slice: std/|error| correlations of every slice (diffusion methods with K > 1), else None.
    """
    if not per_volume:
        raise ValueError(f"{method} {coil} {acceleration}x: no volumes to summarize")
    row: Dict[str, object] = {
        "method": method,
        "label": label,
        "coil": coil,
        "acceleration": int(acceleration),
        "mask": mask,
        "center_fraction": float(center_fraction),
        "target": target,
        "num_volumes": len(per_volume),
        "num_slices": int(num_slices),
    }
    for metric in ("nmse", "psnr", "ssim"):
        m, s = mean_std([v[metric] for v in per_volume])
        row[f"{metric}_mean"] = m
        row[f"{metric}_std"] = s
    row["nfe"] = int(nfe)
    row["num_samples"] = int(num_samples)
    row["sec_per_slice"] = float(sec_per_slice)
    if corr_per_slice is not None and len(corr_per_slice) > 0:
        m, s = mean_std(list(corr_per_slice))
        row["std_err_corr_mean"], row["std_err_corr_std"] = m, s
    else:
        row["std_err_corr_mean"], row["std_err_corr_std"] = "", ""
    return row


def _fmt_cell(value: object) -> str:
    if isinstance(value, float):
        return "" if not np.isfinite(value) else repr(float(value))
    return str(value)


def _write_rows(path: str, rows: List[Dict[str, object]], columns: Sequence[str], cell=lambda v: v) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: cell(row.get(c, "")) for c in columns})
    atomic_write_text(path, buf.getvalue())


def write_csv(rows: List[Dict[str, object]], path: str) -> None:
    """Write the tidy CSV (columns ``CSV_COLUMNS``) atomically; NaN is written as an empty cell."""
    _write_rows(path, rows, CSV_COLUMNS, _fmt_cell)


def write_per_volume_csv(rows: List[Dict[str, object]], path: str) -> None:
    """Write results/recon_per_volume.csv (columns ``PER_VOLUME_COLUMNS``, values as they are) atomically."""
    _write_rows(path, rows, PER_VOLUME_COLUMNS)


def _pm(row: Dict[str, object], metric: str, decimals: int) -> str:
    m, s = row.get(f"{metric}_mean", ""), row.get(f"{metric}_std", "")
    if m == "" or m is None or not np.isfinite(float(m)):
        return "–"
    return f"{float(m):.{decimals}f} ± {float(s):.{decimals}f}"


def markdown_table(rows: List[Dict[str, object]]) -> str:
    """The reconstruction table as GitHub markdown (mean ± std over volumes)."""
    lines = [
        "| coil | R | mask (centre) | target | method | NMSE | PSNR (dB) | SSIM | NFE × K | s/slice | "
        "r(std, abs err) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nfe = f"{r['nfe']} × {r['num_samples']}" if int(r["num_samples"]) > 0 else "–"
        lines.append(
            f"| {COIL_LABELS.get(str(r['coil']), r['coil'])} | {r['acceleration']}× | {r['mask']} "
            f"({float(r['center_fraction']):.2f}) | {r['target']} | {r['label']} | {_pm(r, 'nmse', 4)} | "
            f"{_pm(r, 'psnr', 2)} | {_pm(r, 'ssim', 3)} | {nfe} | {float(r['sec_per_slice']):.2f} | "
            f"{_pm(r, 'std_err_corr', 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown_table(rows: List[Dict[str, object]], path: str, header: str = "") -> None:
    """Write results/recon_table.md atomically (``header`` is prepended as a paragraph)."""
    text = (header.strip() + "\n\n" if header else "") + markdown_table(rows)
    atomic_write_text(path, text)


def make_figure(
    target: np.ndarray,
    recons: Dict[str, np.ndarray],
    stds: Dict[str, np.ndarray],
    path: str,
    title: str = "",
    error_gain: float = 5.0,
) -> None:
    """One slice, every method: reconstruction, |error| × gain and (diffusion) std map on the error's scale.

    Args:
        target: ``(H, W)`` magnitude target.
        recons: label -> ``(H, W)`` magnitude reconstruction (in display order).
        stds: label -> ``(H, W)`` std map, only for methods with several samples.
        path: PNG to write (atomically).
        title: figure title.
        error_gain: error and std maps are shown ×gain on the image's grey scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(recons)
    ncols = len(labels) + 1
    nrows = 3 if stds else 2
    vmax = float(np.percentile(target, 99.5)) or 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.75 * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0, 0].imshow(target, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("target", fontsize=7)
    axes[1, 0].set_ylabel(f"|error| ×{error_gain:g}", fontsize=7)
    if stds:
        axes[2, 0].set_ylabel(f"std ×{error_gain:g}", fontsize=7)
    for j, label in enumerate(labels, start=1):
        rec = recons[label]
        axes[0, j].imshow(rec, cmap="gray", vmin=0, vmax=vmax)
        axes[0, j].set_title(label, fontsize=6.5)
        axes[1, j].imshow(np.abs(rec - target) * error_gain, cmap="inferno", vmin=0, vmax=vmax)
        if label in stds:
            axes[2, j].imshow(stds[label] * error_gain, cmap="inferno", vmin=0, vmax=vmax)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, w_pad=0.2, h_pad=0.3)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=200, format="png"))
    finally:
        plt.close(fig)
