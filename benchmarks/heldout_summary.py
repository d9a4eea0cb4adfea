"""Collect every held-out result under results/heldout/ into one tidy CSV, results/heldout_summary.csv.

Two kinds of input file are read, anywhere below ``--heldout_dir``:

* ``recon_metrics.csv`` of ``benchmarks/recon_benchmark.py`` (columns ``recon_report.CSV_COLUMNS``; one row
  per method x acceleration, mean and std over volumes already computed), with the ``benchmark_info.json``
  beside it for the regularization weight;
* ``evaluate_<R>x.csv`` of ``scripts/evaluate.py --output_csv`` (columns ``method, predictions_dir, file,
  target, nmse, psnr, ssim``; one row per volume plus ``mean``/``std`` rows per folder). The per-volume rows
  are averaged here per (method, predictions folder): mean and population std (ddof = 0), as everywhere else.

The split is the folder directly below ``--heldout_dir`` (``multicoil8_sigma0.002``), without a suffix
that names a variant of the run (``multicoil8_sigma0.002_noise_matched_lambda`` -> ``multicoil8_sigma0.002``,
the λ column tells the runs apart and ``source`` names the file)::

    .venv/bin/python benchmarks/heldout_summary.py      # results/heldout -> results/heldout_summary.csv
    .venv/bin/python benchmarks/heldout_summary.py --heldout_dir /tmp/h --output /tmp/h/summary.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, REPO_ROOT)
from recon_benchmark import BASELINE_LAMBDA  # noqa: E402
from recon_report import CSV_COLUMNS as RECON_COLUMNS  # noqa: E402

from improved_diffusion.evaluation import FOLDER_FIELDS, SUMMARY_ROWS  # noqa: E402
from improved_diffusion.io_util import atomic_write_text  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

COLUMNS = [
    "split",
    "method",
    "acceleration",
    "lambda",
    "psnr",
    "psnr_std",
    "ssim",
    "ssim_std",
    "volumes",
    "source",
]
SPLIT_NAME = re.compile(r"^((singlecoil|multicoil(\d+))_sigma([0-9.]*[0-9]))")
EVALUATE_NAME = re.compile(r"^evaluate_(\d+)x\.csv$")
# methods that take a regularization weight (recon_benchmark.py passes them --lamda)
LAMBDA_METHODS = ("sense", "l1_wavelet", "bart_pics")
# row order within a split and acceleration: the baselines as in the benchmark, then everything else
METHOD_ORDER = ("zero_filled",) + LAMBDA_METHODS


class SummaryError(ValueError):
    """An input file that cannot be summarized (one line naming the file and the problem)."""


def split_name(folder: str) -> str:
    """The held-out split of a folder name below results/heldout (a run-variant suffix dropped)."""
    m = SPLIT_NAME.match(folder)
    return m.group(1) if m else folder


def split_key(split: str) -> tuple:
    """Sort key of a split: coil count, then noise level (unparsed names last, by name)."""
    m = SPLIT_NAME.match(split)
    if m is None:
        return (1, 0, 0.0, split)
    return (0, int(m.group(3) or 1), float(m.group(4)), split)


def format_lambda(value: str) -> str:
    """A regularization weight as the docs write it: ``3e-4``, ``1e-2``, ``0.5``."""
    x = float(value)
    if x == 0 or 0.1 <= abs(x) < 1000:
        return f"{x:g}"
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _read_rows(path: str, required: Sequence[str]) -> List[Dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in required if c not in (reader.fieldnames or [])]
            if lacking:
                raise SummaryError(f"{path}: missing columns {lacking}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SummaryError(f"{path}: cannot read CSV: {err}") from None


def command_lambda(info_path: str) -> str:
    """The ``--lamda`` a recorded recon_benchmark.py command passed (in ``--baseline_args``), or ''."""
    if not os.path.isfile(info_path):
        return ""
    try:
        with open(info_path) as f:
            command = json.load(f).get("run", {}).get("command", "")
    except (OSError, ValueError, AttributeError) as err:
        raise SummaryError(f"{info_path}: not a benchmark_info.json object: {err}") from None
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--baseline_args" and i + 1 < len(words):
            args = shlex.split(words[i + 1])
            if "--lamda" in args and args.index("--lamda") + 1 < len(args):
                value = args[args.index("--lamda") + 1]
                try:
                    return format_lambda(value)
                except ValueError:
                    raise SummaryError(f"{info_path}: --lamda '{value}' is not a number") from None
    return ""


def default_lambda(method: str, coil: str, acceleration: int) -> str:
    """The per-setting λ recon_benchmark.py passes when its command gives none (``BASELINE_LAMBDA``)."""
    lam = BASELINE_LAMBDA.get((method, coil, acceleration))
    return "" if lam is None else format_lambda(str(lam))


def recon_rows(path: str, split: str, source: str) -> List[Dict[str, str]]:
    """Summary rows of one recon_metrics.csv."""
    explicit = command_lambda(os.path.join(os.path.dirname(path), "benchmark_info.json"))
    out = []
    for row in _read_rows(path, RECON_COLUMNS):
        try:
            acc = int(float(row["acceleration"]))
        except ValueError:
            raise SummaryError(f"{path}: acceleration '{row['acceleration']}' is not a number") from None
        lam = ""
        if row["method"] in LAMBDA_METHODS:
            lam = explicit or default_lambda(row["method"], row["coil"], acc)
        out.append(
            {
                "split": split,
                "method": row["method"],
                "acceleration": str(acc),
                "lambda": lam,
                "psnr": row["psnr_mean"],
                "psnr_std": row["psnr_std"],
                "ssim": row["ssim_mean"],
                "ssim_std": row["ssim_std"],
                "volumes": row["num_volumes"],
                "source": source,
            }
        )
    return out


def evaluate_rows(path: str, split: str, source: str, acceleration: str) -> List[Dict[str, str]]:
    """Summary rows of one evaluate.py CSV: mean and std over its volume rows, per method and folder."""
    groups: Dict[tuple, List[Dict[str, str]]] = {}
    for row in _read_rows(path, FOLDER_FIELDS):
        if row["file"] in SUMMARY_ROWS:  # evaluate.py's per-folder mean/std, not volumes
            continue
        groups.setdefault((row["method"], row["predictions_dir"]), []).append(row)
    if not groups:
        raise SummaryError(f"{path}: no per-volume rows")
    out = []
    for (method, _folder), rows in groups.items():
        stats = {}
        for m in ("psnr", "ssim"):
            try:
                v = np.array([float(r[m]) for r in rows], dtype=np.float64)
            except ValueError:
                raise SummaryError(f"{path}: a '{m}' value of method '{method}' is not a number") from None
            stats[m], stats[m + "_std"] = repr(float(v.mean())), repr(float(v.std()))
        out.append(
            {
                "split": split,
                "method": method,
                "acceleration": acceleration,
                "lambda": "",
                **stats,
                "volumes": str(len(rows)),
                "source": source,
            }
        )
    return out


def collect(heldout_dir: str, relative_to: Optional[str] = None) -> List[Dict[str, str]]:
    """Every summary row below ``heldout_dir``, by split, acceleration, method (baselines first), source.

    Args:
        heldout_dir: the folder of the held-out results (results/heldout).
        relative_to: ``source`` paths are relative to this folder (default: the parent of ``heldout_dir``,
            so they read ``heldout/<split>/...`` as the paths in results/).
    """
    if not os.path.isdir(heldout_dir):
        raise SummaryError(f"{heldout_dir}: not a folder")
    base = relative_to if relative_to is not None else os.path.dirname(os.path.abspath(heldout_dir))
    rows: List[Dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(heldout_dir):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, heldout_dir)
        if rel_dir == ".":
            continue  # files directly in heldout_dir belong to no split
        split = split_name(rel_dir.split(os.sep)[0])
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            source = os.path.relpath(path, base).replace(os.sep, "/")
            if name == "recon_metrics.csv":
                rows += recon_rows(path, split, source)
            elif name.startswith("evaluate_") and name.endswith(".csv"):
                m = EVALUATE_NAME.match(name)
                if m is None:
                    raise SummaryError(f"{path}: expected a name evaluate_<R>x.csv (e.g. evaluate_4x.csv)")
                rows += evaluate_rows(path, split, source, m.group(1))
    rows.sort(
        key=lambda r: (split_key(r["split"]), int(r["acceleration"]), _method_key(r["method"]), r["source"])
    )
    return rows


def _method_key(method: str) -> tuple:
    known = method in METHOD_ORDER
    return (0, METHOD_ORDER.index(method), "") if known else (1, 0, method)


def write_summary(rows: List[Dict[str, str]], path: str) -> None:
    """Write the rows as CSV (atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--heldout_dir",
        type=str,
        default=os.path.join(REPO_ROOT, "results", "heldout"),
        help="folder searched recursively for recon_metrics.csv and evaluate_<R>x.csv",
    )
    parser.add_argument(
        "--output",
        type=str,
        default=os.path.join(REPO_ROOT, "results", "heldout_summary.csv"),
        help="the tidy CSV to write",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    try:
        rows = collect(args.heldout_dir)
    except SummaryError as err:
        print(f"heldout_summary: error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(
            f"heldout_summary: error: {args.heldout_dir}: no recon_metrics.csv or evaluate_<R>x.csv",
            file=sys.stderr,
        )
        return 2
    write_summary(rows, args.output)
    print(f"heldout_summary: {len(rows)} rows from {len({r['source'] for r in rows})} files -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
