"""Read the results files the paper quotes and turn them into named, formatted values.

Every number in the paper comes from here, read at build time from ``results/``; nothing is typed into the
prose. The files and what they hold are listed in ``RESULT_FILES`` (written by
``benchmarks/recon_benchmark.py``, ``benchmarks/record_train_speed.py``, ``benchmarks/heldout_summary.py``,
``benchmarks/real_scan.py`` and ``scripts/prior_sample.py``, see docs/results.md); those of
``OPTIONAL_RESULTS`` may be missing from any build.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# name -> (path relative to the results dir, what writes it)
# Optional: a second recon_benchmark.py run (--results_dir results/ddim_vs_ancestral) that puts DDIM beside
# the many-step ancestral chain with its own settings (e.g. K = 1, or a subset of slices with --max_slices),
# since the long chain with the main run's K on every slice can be too slow.
STEPS_FILE = os.path.join("ddim_vs_ancestral", "recon_metrics.csv")

RESULT_FILES: Dict[str, tuple] = {
    "recon_metrics": ("recon_metrics.csv", "benchmarks/recon_benchmark.py"),
    "recon_figure": ("recon_figure.png", "benchmarks/recon_benchmark.py"),
    "benchmark_info": ("benchmark_info.json", "benchmarks/recon_benchmark.py"),
    "train_speed": ("train_speed.csv", "benchmarks/record_train_speed.py"),
    "heldout_summary": ("heldout_summary.csv", "benchmarks/heldout_summary.py"),
    "real_scan": ("real_scan.csv", "benchmarks/real_scan.py"),
    "real_scan_figure": ("real_scan.png", "benchmarks/real_scan.py"),
    "prior_samples": ("prior_samples.png", "scripts/prior_sample.py (grid PNG copied here)"),
    "prior_samples_info": ("prior_samples.json", "scripts/prior_sample.py (samples.json copied here)"),
}
# Results the paper shows when they exist: a missing one is a marked placeholder box (or [MISSING: key])
# in every build, without the DRAFT banner, instead of stopping the normal build.
OPTIONAL_RESULTS = frozenset(
    ("heldout_summary", "real_scan", "real_scan_figure", "prior_samples", "prior_samples_info")
)
# CSV files that "::: table csv NAME" may render, with the columns each must have.
CSV_TABLES: Dict[str, List[str]] = {
    "heldout_summary": ["split", "method", "acceleration", "psnr", "ssim"],
    "real_scan": ["method", "psnr", "ssim"],
}

# Columns the reconstruction CSV must have (one row per method x coil x acceleration); one list, shared with
# the benchmark that writes the CSV.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from recon_report import CSV_COLUMNS as RECON_COLUMNS  # noqa: E402

# Number of decimals used when a column is quoted.
DECIMALS = {
    "nmse": 4,
    "psnr": 2,
    "ssim": 3,
    "sec_per_slice": 2,
    "std_err_corr": 2,
    "center_fraction": 2,
    "noise_residual_ratio": 2,
}


class MissingResultsError(FileNotFoundError):
    """Raised when results files the paper needs are absent."""


@dataclass
class Results:
    """Everything the paper quotes.

    Attributes:
        values: flat ``key -> formatted string`` map used by ``{{key}}`` placeholders.
        lists: generated bullet lists (``::: list NAME`` blocks), e.g. one sentence per setting.
        recon_rows: rows of recon_metrics.csv (strings), in file order.
        train_speed_rows: rows of train_speed.csv (strings), in file order.
        steps_rows: rows for the DDIM-versus-ancestral comparison: ``STEPS_FILE`` when that optional run
            exists, else ``recon_rows``.
        csv_rows: rows (strings) of each ``CSV_TABLES`` file that exists, for ``::: table csv NAME``.
        paths: name -> absolute path of each results file.
        missing: names of the required results files that were not found.
        missing_optional: names of the ``OPTIONAL_RESULTS`` files that were not found.
    """

    values: Dict[str, str] = field(default_factory=dict)
    lists: Dict[str, List[str]] = field(default_factory=dict)
    recon_rows: List[Dict[str, str]] = field(default_factory=list)
    train_speed_rows: List[Dict[str, str]] = field(default_factory=list)
    steps_rows: List[Dict[str, str]] = field(default_factory=list)
    csv_rows: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)
    paths: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    missing_optional: List[str] = field(default_factory=list)


def fmt_number(value: Any, decimals: int = 2) -> str:
    """Format a number for prose: integers as integers, floats with ``decimals``; '' or None -> 'n/a'."""
    if value is None or value == "":
        return "n/a"
    x = float(value)
    if math.isnan(x):
        return "n/a"
    if x.is_integer() and decimals == 0:
        return str(int(x))
    return f"{x:.{decimals}f}"


def _decimals_for(column: str) -> int:
    for prefix, d in DECIMALS.items():
        if column.startswith(prefix):
            return d
    return 0


def read_csv_rows(path: str, required: List[str]) -> List[Dict[str, str]]:
    """Read a CSV into a list of dicts, checking that the ``required`` columns exist."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        lacking = [c for c in required if c not in columns]
        if lacking:
            raise ValueError(f"{path}: missing columns {lacking}")
        return list(reader)


def recon_key(row: Dict[str, str]) -> str:
    """The key prefix of a reconstruction row, e.g. ``recon.singlecoil.4x.ddim_project``."""
    return f"recon.{row['coil']}.{int(float(row['acceleration']))}x.{row['method']}"


def _flatten(prefix: str, obj: Any, out: Dict[str, str]) -> None:
    """Flatten nested JSON into dotted keys; floats keep 2 decimals (3 significant digits below 0.01, so a
    learning rate of 2e-4 does not print as 0.00), ints stay ints."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, bool):
        out[prefix] = "yes" if obj else "no"
    elif isinstance(obj, int):
        out[prefix] = str(obj)
    elif isinstance(obj, float):
        out[prefix] = f"{obj:.3g}" if 0 < abs(obj) < 0.01 else fmt_number(obj, 2)
    elif isinstance(obj, (list, tuple)):
        out[prefix] = "×".join(str(v) for v in obj) if all(isinstance(v, int) for v in obj) else str(obj)
    elif obj is None:
        out[prefix] = "n/a"
    else:
        out[prefix] = str(obj)


def recon_values(rows: List[Dict[str, str]]) -> Dict[str, str]:
    """Formatted values of every reconstruction row, plus ``<metric>`` = 'mean ± std' strings."""
    values: Dict[str, str] = {}
    for row in rows:
        key = recon_key(row)
        for col in RECON_COLUMNS:
            if col in ("method", "coil"):
                continue
            raw = row.get(col, "")
            if col in ("label", "mask", "target"):
                values[f"{key}.{col}"] = raw
            else:
                values[f"{key}.{col}"] = fmt_number(raw, _decimals_for(col))
        for metric in ("nmse", "psnr", "ssim", "std_err_corr"):
            mean, std = row.get(f"{metric}_mean", ""), row.get(f"{metric}_std", "")
            if mean not in ("", None):
                d = _decimals_for(metric)
                values[f"{key}.{metric}"] = f"{fmt_number(mean, d)} ± {fmt_number(std, d)}"
    return values


def find_row(
    rows: List[Dict[str, str]], coil: str, acceleration: int, method: str
) -> Optional[Dict[str, str]]:
    """The reconstruction row of one setting and method, or None."""
    for row in rows:
        if (
            row["coil"] == coil
            and int(float(row["acceleration"])) == acceleration
            and row["method"] == method
        ):
            return row
    return None


def load_results(results_dir: str) -> Results:
    """Load every results file that exists; record the names of the missing ones.

    Args:
        results_dir: folder holding the files of ``RESULT_FILES``.

    Returns:
        A :class:`Results`; ``missing`` lists what was not found (the caller decides whether that is fatal).
    """
    res = Results()
    for name, (rel, _writer) in RESULT_FILES.items():
        path = os.path.abspath(os.path.join(results_dir, rel))
        res.paths[name] = path
        if not os.path.isfile(path):
            (res.missing_optional if name in OPTIONAL_RESULTS else res.missing).append(name)

    if "recon_metrics" not in res.missing:
        res.recon_rows = read_csv_rows(res.paths["recon_metrics"], RECON_COLUMNS)
        res.values.update(recon_values(res.recon_rows))
    steps_path = os.path.join(results_dir, STEPS_FILE)
    if os.path.isfile(steps_path):
        res.steps_rows = read_csv_rows(steps_path, RECON_COLUMNS)
    else:
        res.steps_rows = res.recon_rows
    if "benchmark_info" not in res.missing:
        with open(res.paths["benchmark_info"]) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError(f"{res.paths['benchmark_info']}: expected a JSON object")
        _flatten("", info, res.values)
        run = info.get("run", {})
        start = run.get("start_step", -1) if isinstance(run, dict) else -1
        # A run names its start by --start_step or by --t0; the text gives whichever it used.
        res.values["run.start"] = (
            f"base step {start}" if isinstance(start, int) and start >= 0 else f"t₀ = {run.get('t0', '')}"
        )
    if "train_speed" not in res.missing:
        res.train_speed_rows = read_csv_rows(res.paths["train_speed"], ["name", "sec_per_step"])
        for row in res.train_speed_rows:
            for col, raw in row.items():
                if col != "name":
                    res.values[f"speed.{row['name']}.{col}"] = _speed_value(col, raw)
    for name, required in CSV_TABLES.items():
        if os.path.isfile(res.paths[name]):
            res.csv_rows[name] = read_csv_rows(res.paths[name], required)
    if os.path.isfile(res.paths["prior_samples_info"]):
        with open(res.paths["prior_samples_info"]) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError(f"{res.paths['prior_samples_info']}: expected a JSON object")
        _flatten("prior", info, res.values)
        res.values["prior.checkpoint"] = os.path.basename(str(info.get("model_path", "")))
    return res


def _speed_value(col: str, raw: str) -> str:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        return raw
    if col.startswith(("sec", "samples_per", "steps_per", "images_per")):
        return fmt_number(x, 3 if abs(x) < 1 else 2)
    return fmt_number(x, 0) if x.is_integer() else fmt_number(x, 2)


BASELINES = ("zero_filled", "sense", "l1_wavelet", "bart_pics")
COIL_NAMES = {"singlecoil": "single-coil", "multicoil": "multi-coil"}


def _settings(rows: List[Dict[str, str]]) -> List[tuple]:
    """(coil, acceleration) pairs in file order, without repeats."""
    seen: List[tuple] = []
    for row in rows:
        s = (row["coil"], int(float(row["acceleration"])))
        if s not in seen:
            seen.append(s)
    return seen


def _psnr(row: Dict[str, str]) -> str:
    return f"{fmt_number(row['psnr_mean'], 2)} dB"


def _is_diffusion(row: Dict[str, str]) -> bool:
    return row["method"] not in BASELINES


def setting_summary(rows: List[Dict[str, str]], coil: str, acceleration: int) -> str:
    """One generated sentence per setting: every method's PSNR and which is best (by the numbers)."""
    these = [r for r in rows if r["coil"] == coil and int(float(r["acceleration"])) == acceleration]
    if not these:
        return f"No {COIL_NAMES.get(coil, coil)} {acceleration}× results were found."
    first = these[0]
    parts = ", ".join(f"{r['label']} {_psnr(r)}" for r in these)
    best_psnr = max(these, key=lambda r: float(r["psnr_mean"]))
    best_ssim = max(these, key=lambda r: float(r["ssim_mean"]))
    return (
        f"{COIL_NAMES.get(coil, coil).capitalize()}, {acceleration}× ({first['mask']} mask, centre fraction "
        f"{fmt_number(first['center_fraction'], 2)}; target {first['target']}): {parts}. "
        f"The highest mean PSNR was reached by {best_psnr['label']} and the highest mean SSIM by "
        f"{best_ssim['label']} ({fmt_number(best_ssim['ssim_mean'], 3)})."
    )


def abstract_summary(rows: List[Dict[str, str]]) -> str:
    """Generated abstract sentence: the main diffusion method against the best baseline in each setting."""
    parts = []
    for coil, acc in _settings(rows):
        these = [r for r in rows if r["coil"] == coil and int(float(r["acceleration"])) == acc]
        diff = [r for r in these if _is_diffusion(r)]
        base = [r for r in these if not _is_diffusion(r)]
        if not diff or not base:
            continue
        main = find_row(these, coil, acc, "ddim_project") or diff[0]
        best_base = max(base, key=lambda r: float(r["psnr_mean"]))
        delta = float(main["psnr_mean"]) - float(best_base["psnr_mean"])
        parts.append(
            f"{COIL_NAMES.get(coil, coil)} {acc}×: {main['label']} {_psnr(main)} vs. {best_base['label']} "
            f"{_psnr(best_base)} ({delta:+.2f} dB)"
        )
    if not parts:
        return "No diffusion-versus-baseline comparison is available in the results."
    return "Mean PSNR on the demo validation split: " + "; ".join(parts) + "."


def ddim_vs_ancestral_items(rows: List[Dict[str, str]], tolerance_db: float = 0.5) -> List[str]:
    """One generated sentence per setting where both DDIM and the many-step ancestral sampler ran."""
    items = []
    for coil, acc in _settings(rows):
        ddim = find_row(rows, coil, acc, "ddim_project")
        anc = find_row(rows, coil, acc, "ancestral_project")
        if ddim is None or anc is None:
            continue
        delta = float(ddim["psnr_mean"]) - float(anc["psnr_mean"])
        verdict = "within" if abs(delta) <= tolerance_db else "not within"
        items.append(
            f"{COIL_NAMES.get(coil, coil).capitalize()} {acc}×: {ddim['label']} "
            f"({fmt_number(ddim['nfe'], 0)} NFE) {_psnr(ddim)} vs. {anc['label']} "
            f"({fmt_number(anc['nfe'], 0)} NFE) {_psnr(anc)}: {delta:+.2f} dB, {verdict} {tolerance_db} dB "
            f"({fmt_number(anc['num_slices'], 0)} slices, K = {fmt_number(anc['num_samples'], 0)})."
        )
    return items


def ddim_vs_ancestral(rows: List[Dict[str, str]], tolerance_db: float = 0.5) -> str:
    """Generated text comparing DDIM with the many-step ancestral sampler, or saying it was not run."""
    items = ddim_vs_ancestral_items(rows, tolerance_db)
    if not items:
        return (
            "The comparison with many-step ancestral sampling was not run for these results "
            "(recon_metrics.csv has no ancestral_project rows)."
        )
    return " ".join(items)


def uncertainty_items(rows: List[Dict[str, str]]) -> List[str]:
    """Generated sentences: per-slice Pearson correlation of the posterior std map with the |error| map."""
    items = []
    for row in rows:
        if row.get("std_err_corr_mean", "") in ("", None):
            continue
        items.append(
            f"{row['label']}, {COIL_NAMES.get(row['coil'], row['coil'])} "
            f"{int(float(row['acceleration']))}×: r = {fmt_number(row['std_err_corr_mean'], 2)} ± "
            f"{fmt_number(row['std_err_corr_std'], 2)} (mean ± std over slices)."
        )
    if not items:
        items.append("No std-map/error correlation is available (no diffusion rows with several samples).")
    return items


def _lambda_label(row: Dict[str, str]) -> str:
    return f"{row['method']} (λ {row['lambda']})" if row.get("lambda") else row["method"]


def heldout_comparisons(rows: List[Dict[str, str]]) -> List[dict]:
    """Per split x acceleration: each diffusion row against the best baseline row (over methods and λ).

    The best baseline is picked by mean PSNR among every baseline row that was run on that split, including
    rows of several λ: that favours the baselines, so the differences are if anything understated.
    """
    settings: List[tuple] = []
    for row in rows:
        s = (row["split"], int(float(row["acceleration"])))
        if s not in settings:
            settings.append(s)
    out = []
    for split, acc in settings:
        these = [r for r in rows if r["split"] == split and int(float(r["acceleration"])) == acc]
        # evaluate.py rows carry their λ in the label ("bart_pics (lambda 1e-3)"): first word = method
        base = [r for r in these if r["method"].split()[0] in BASELINES]
        diff = [r for r in these if r["method"].split()[0] not in BASELINES]
        if not base or not diff:
            continue
        best = max(base, key=lambda r: float(r["psnr"]))
        for d in diff:
            out.append(
                {
                    "split": split,
                    "acceleration": acc,
                    "diffusion": d,
                    "baseline": best,
                    "delta_psnr": float(d["psnr"]) - float(best["psnr"]),
                    "delta_ssim": float(d["ssim"]) - float(best["ssim"]),
                }
            )
    return out


def heldout_items(rows: List[Dict[str, str]]) -> List[str]:
    """One generated sentence per held-out split x acceleration x diffusion method."""
    items = []
    for c in heldout_comparisons(rows):
        d, b = c["diffusion"], c["baseline"]
        items.append(
            f"{c['split']}, {c['acceleration']}×: {d['method']} {fmt_number(d['psnr'], 2)} dB / SSIM "
            f"{fmt_number(d['ssim'], 3)} against the best baseline, {_lambda_label(b)}, "
            f"{fmt_number(b['psnr'], 2)} dB / {fmt_number(b['ssim'], 3)}: {c['delta_psnr']:+.2f} dB, SSIM "
            f"{c['delta_ssim']:+.3f} ({fmt_number(d['volumes'], 0)} volumes)."
        )
    if not items:
        items.append("The held-out summary has no setting with both a diffusion and a baseline row.")
    return items


def heldout_abstract(rows: List[Dict[str, str]]) -> str:
    """Generated abstract sentence: the range of diffusion-minus-best-baseline PSNR over held-out settings."""
    comps = heldout_comparisons(rows)
    if not comps:
        return "The held-out summary has no diffusion-versus-baseline comparison."
    deltas = [c["delta_psnr"] for c in comps]
    higher_ssim = sum(c["delta_ssim"] > 0 for c in comps)
    return (
        f"On the held-out split ({len(comps)} settings of coils, noise level and acceleration) the diffusion "
        f"reconstruction's mean PSNR differed from the best classical baseline by {min(deltas):+.2f} to "
        f"{max(deltas):+.2f} dB, and its mean SSIM was higher in {higher_ssim} of {len(comps)} settings."
    )


# generated value / list name prefix -> the results file it is built from (for missing-file handling)
GENERATED_SOURCES = (
    ("text.heldout", "heldout_summary"),
    ("heldout", "heldout_summary"),
    ("prior.", "prior_samples_info"),
)


def add_generated_text(res: Results) -> None:
    """Add generated sentences (``text.*`` values, ``lists``); they state only what the numbers say."""
    if "heldout_summary" in res.csv_rows:
        res.values["text.heldout_abstract"] = heldout_abstract(res.csv_rows["heldout_summary"])
        res.lists["heldout"] = heldout_items(res.csv_rows["heldout_summary"])
    if "recon_metrics" in res.missing:
        return
    rows = res.recon_rows
    res.values["text.abstract_results"] = abstract_summary(rows)
    res.values["text.ddim_vs_ancestral"] = ddim_vs_ancestral(res.steps_rows)
    res.values["text.uncertainty"] = " ".join(uncertainty_items(rows))
    res.lists["settings"] = [setting_summary(rows, c, a) for c, a in _settings(rows)]
    anc = ddim_vs_ancestral_items(res.steps_rows)
    res.lists["ddim_vs_ancestral"] = anc if anc else [ddim_vs_ancestral(res.steps_rows)]
    res.lists["uncertainty"] = uncertainty_items(rows)
