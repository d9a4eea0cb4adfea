"""Reconstruction benchmark: baselines and diffusion reconstructions on a validation split -> results/.

For each coil setting (single-coil, multi-coil) and acceleration (4×: random mask, centre fraction 0.08;
8×: equispaced_fraction, centre fraction 0.04, fastMRI's conventions; the fraction variant samples W/8
columns in total, plain equispaced would add the centre block on top), every method is run through the
product's own command-line scripts (scripts/baseline_recon.py, scripts/image_sample.py, as subprocesses
with this Python), and its output volumes are scored against the targets stored in the input files
(reconstruction_esc for single-coil, reconstruction_rss for multi-coil) with fastMRI's metrics
(``improved_diffusion.evaluation.score_run``). Helpers beside this script: bench_inputs.py (reduced input
copies), recon_report.py (rows, tables, figure), training_info.py (checkpoint facts for the paper).

Methods: zero_filled, sense (multi-coil only), l1_wavelet, bart_pics (BART's ``pics -l1`` with
``ecalib`` maps, the outside reference; skipped with a note when the ``bart`` command is missing),
ddim_project (DDIM, x̂0 projected onto the measurements), ddim_replace (DDIM, noisy k-space replacement),
and with --ancestral, ancestral_project (the full-length ancestral chain with learned variances, for the
DDIM-vs-many-steps comparison).

Writes (see docs/results.md):
    results/recon_metrics.csv    tidy: one row per method × coil × acceleration (mean ± std over volumes)
    results/recon_per_volume.csv one row per method × setting × volume
    results/recon_table.md       the same table in markdown
    results/recon_figure.png     one slice, every method, |error| maps, std maps beside them
    results/benchmark_info.json  data, model, training and run details quoted by the paper

Runs are resumable: each method × setting keeps its outputs under ``--work_dir`` and a ``summary.json``;
a finished one is reused unless its command changed or --overwrite is given, and an interrupted one
continues where the script left off (the scripts skip volumes whose output exists).

Example (the real run; docs/results.md lists the reduced smoke run)::

    .venv/bin/python benchmarks/recon_benchmark.py --model_path logs/demo/ema_0.9999_020000.pt \\
        --data_dir demo_data --num_samples 4 --t0 0.2 --ancestral
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recon_report  # noqa: E402
from bench_inputs import TARGET_KEYS, data_info, list_h5, prepare_inputs  # noqa: E402
from training_info import training_info  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from improved_diffusion.evaluation import score_run  # noqa: E402
from improved_diffusion.inference import DEMO_MODEL  # noqa: E402
from improved_diffusion.io_util import atomic_write_text  # noqa: E402
from improved_diffusion.reconstruction import DEFAULT_T0  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

SCRIPTS = os.path.join(REPO_ROOT, "scripts")

# acceleration -> (mask type, centre fraction): fastMRI's knee 4× and brain 8× protocols.
PROTOCOLS: Dict[int, Tuple[str, float]] = {4: ("random", 0.08), 8: ("equispaced_fraction", 0.04)}
# Regularization weights per (method, coil, acceleration) in normalized units, chosen by PSNR on one demo
# TRAINING volume (demo_<coil>_train_002.h5, slices 4 and 6, the files' own noise; maps estimated as in the
# benchmark) by `benchmarks/tune_lambda.py --noise_level 0` on a grid from 3e-5 to 0.1 in ~3x steps, never on
# the validation files (docs/results.md has the sweep). BART's maps fail on 8x equispaced masks at 128 columns
# (5 centre columns: 5-7 dB at every λ), so its 8x multi-coil value is only the grid's best.
BASELINE_LAMBDA: Dict[Tuple[str, str, int], float] = {
    ("l1_wavelet", "singlecoil", 4): 3e-4,
    ("l1_wavelet", "singlecoil", 8): 1e-3,
    ("l1_wavelet", "multicoil", 4): 1e-4,
    ("l1_wavelet", "multicoil", 8): 3e-5,
    ("sense", "multicoil", 4): 1e-3,
    ("sense", "multicoil", 8): 3e-4,
    # BART pics -l1 (same objective and units as l1_wavelet; its own sweep, on the same volume and grid)
    ("bart_pics", "singlecoil", 4): 1e-3,
    ("bart_pics", "singlecoil", 8): 3e-3,
    ("bart_pics", "multicoil", 4): 3e-4,
    ("bart_pics", "multicoil", 8): 1e-1,
}
# Diffusion options per (coil, acceleration) on top of image_sample.py's defaults: none since the
# noise-aware data consistency (its prior_scale was chosen on a demo training volume, docs/results.md).
DIFFUSION_ARGS: Dict[Tuple[str, int], List[str]] = {}
ALL_METHODS = (
    "zero_filled",
    "sense",
    "l1_wavelet",
    "bart_pics",
    "ddim_project",
    "ddim_replace",
    "ancestral_project",
)
# the classical methods of scripts/baseline_recon.py --method: name -> label
BASELINES = {
    "zero_filled": "Zero-filled",
    "sense": "SENSE",
    "l1_wavelet": "L1-wavelet",
    "bart_pics": "BART L1-wavelet",
}
BART_METHODS = ("bart_pics",)  # need the `bart` command line
MAPS_NOTES = {
    "estimate": "estimated per slice from the fully sampled centre of the undersampled k-space "
    "(the sensitivity maps stored in the files, computed from fully sampled data, were not used)",
    "file": "the sensitivity maps stored in the input files (computed by datasets/prepare_fastmri.py from "
    "the fully sampled k-space, which a real accelerated scan would not have)",
}


@dataclass
class Method:
    """How one method is run.

    Attributes:
        name: the ``method`` column of the CSV.
        label: human-readable name for tables and figures.
        script: the script in scripts/ that runs it.
        args: its method-specific flags.
        diffusion: True for the diffusion reconstructions (K samples, std maps, NFE).
    """

    name: str
    label: str
    script: str
    args: List[str] = field(default_factory=list)
    diffusion: bool = False


def build_methods(args: argparse.Namespace) -> List[Method]:
    """The methods to run, in table order, from the CLI options."""
    ddim = ["--use_ddim", "True", "--timestep_respacing", f"ddim{args.ddim_steps}", "--eta", str(args.eta)]
    ancestral = ["--use_ddim", "False", "--timestep_respacing", str(args.ancestral_steps or "")]
    common = ["--model_path", args.model_path]
    common += ["--start_step", str(args.start_step)] if args.start_step >= 0 else []
    common += ["--t0", args.t0] if args.t0 else []
    common += ["--sample_seed", str(args.seed), "--png", "False"]
    if args.batch_size:
        common += ["--batch_size", str(args.batch_size)]
    common += shlex.split(args.sample_args)
    k_ddim = ["--num_samples", str(args.num_samples)]
    k_ancestral = ["--num_samples", str(args.ancestral_samples or args.num_samples)]
    base_extra = ["--png", "False"] + shlex.split(args.baseline_args)
    steps = args.ancestral_steps or "T"
    methods = [
        Method(m, label, "baseline_recon.py", ["--method", m] + base_extra) for m, label in BASELINES.items()
    ]
    # name -> (label, sampler flags, DC mode, K flags)
    diffusion = {
        "ddim_project": (f"DDIM-{args.ddim_steps}, projection", ddim, "project", k_ddim),
        "ddim_replace": (f"DDIM-{args.ddim_steps}, replace", ddim, "replace", k_ddim),
        "ancestral_project": (f"Ancestral-{steps}, projection", ancestral, "project", k_ancestral),
    }
    methods += [
        Method(name, label, "image_sample.py", sampler + ["--dc", dc] + k + common, diffusion=True)
        for name, (label, sampler, dc, k) in diffusion.items()
    ]
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(ALL_METHODS)}")
    if args.ancestral and "ancestral_project" not in wanted:
        wanted.append("ancestral_project")
    chosen = [m for m in methods if m.name in wanted]
    if any(m.diffusion for m in chosen) and not args.model_path:
        raise ValueError("--model_path is needed for the diffusion methods (or leave them out of --methods)")
    return chosen


def drop_unavailable(methods: List[Method]) -> Tuple[List[Method], List[str]]:
    """Leave out the BART methods when the ``bart`` command is missing; returns (kept, notes)."""
    if not any(m.name in BART_METHODS for m in methods):
        return methods, []
    from improved_diffusion.mri.bart import bart_available

    if bart_available():
        return methods, []
    skipped = [m.name for m in methods if m.name in BART_METHODS]
    note = f"{', '.join(skipped)} skipped: the 'bart' command (BART) is not installed (apt-get install bart)"
    return [m for m in methods if m.name not in BART_METHODS], [note]


# --------------------------------------------------------------------------------------------- one run


def method_command(
    method: Method, coil: str, input_dir: str, out_dir: str, acceleration: int, overwrite: bool
) -> List[str]:
    """The subprocess command line of one method on one setting."""
    mask_type, center_fraction = PROTOCOLS[acceleration]
    cmd = [
        sys.executable,
        os.path.join(SCRIPTS, method.script),
        "--input",
        input_dir,
        "--output_dir",
        out_dir,
    ]
    cmd += ["--mask_type", mask_type, "--center_fractions", str(center_fraction)]
    cmd += ["--accelerations", str(acceleration)] + method.args
    lamda = BASELINE_LAMBDA.get((method.name, coil, acceleration))
    if lamda is not None and "--lamda" not in method.args:  # --baseline_args "--lamda X" overrides
        cmd += ["--lamda", str(lamda)]
    if method.diffusion:  # flags given in --sample_args override these
        extra = DIFFUSION_ARGS.get((coil, acceleration), [])
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag not in method.args:
                cmd += [flag, value]
    if overwrite:
        cmd += ["--overwrite", "True"]
    return cmd


def _signature(cmd: Sequence[str], input_dir: str) -> str:
    """Identifies a run: its command (without --overwrite) and the input files' names, sizes, mtimes."""
    parts = [c for i, c in enumerate(cmd) if c != "--overwrite" and (i == 0 or cmd[i - 1] != "--overwrite")]
    files = [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in list_h5(input_dir)]
    return hashlib.sha256(json.dumps([parts[1:], files]).encode()).hexdigest()[:16]


def run_method(
    method: Method,
    coil: str,
    acceleration: int,
    input_dir: str,
    work_dir: str,
    overwrite: bool,
    dry_run: bool = False,
) -> Optional[Dict[str, Any]]:
    """Run one method on one setting (or reuse its finished run) and return its summary dict."""
    run_dir = os.path.join(work_dir, f"{coil}_{acceleration}x", method.name)
    out_dir = os.path.join(run_dir, "recon")
    summary_path = os.path.join(run_dir, "summary.json")
    cmd = method_command(method, coil, input_dir, out_dir, acceleration, overwrite)
    signature = _signature(cmd, input_dir)
    if not overwrite and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("signature") == signature:
            return summary
        overwrite = True  # the command or the inputs changed: redo every volume
        cmd = method_command(method, coil, input_dir, out_dir, acceleration, overwrite)
    print(f"[recon_benchmark] {coil} {acceleration}x {method.name}: {' '.join(shlex.quote(c) for c in cmd)}")
    if dry_run:
        return None
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{method.name} on {coil} {acceleration}x failed (exit {proc.returncode}); command above"
        )
    summary = {"volumes": score_run(out_dir, input_dir, TARGET_KEYS[coil]), "target": TARGET_KEYS[coil]}
    summary.update(signature=signature, wall_seconds=time.time() - start, command=cmd[1:])
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return summary


def summary_row(method: Method, coil: str, acceleration: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    """The tidy CSV row of one run's summary."""
    vols = summary["volumes"]
    slices = sum(v["num_slices"] for v in vols)
    # seconds per slice: slice-weighted mean of the per-volume means the script recorded
    secs = [v["seconds_per_slice"] * v["num_slices"] for v in vols if np.isfinite(v["seconds_per_slice"])]
    sec_per_slice = float(np.sum(secs) / slices) if secs else float("nan")
    corr = [r for v in vols for r in v["corr"]]
    mask_type, center_fraction = PROTOCOLS[acceleration]
    return recon_report.summarize(
        method=method.name,
        label=method.label,
        coil=coil,
        acceleration=acceleration,
        mask=mask_type,
        center_fraction=center_fraction,
        target=summary["target"],
        per_volume=vols,
        num_slices=slices,
        nfe=max((v["nfe"] for v in vols), default=0) if method.diffusion else 0,
        num_samples=max((v["num_samples"] for v in vols), default=0) if method.diffusion else 0,
        sec_per_slice=sec_per_slice,
        corr_per_slice=corr if method.diffusion and corr else None,
    )


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def figure_data(
    work_dir: str, coil: str, acceleration: int, methods: List[Method], input_dir: str, slice_idx: int
) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, Any]]:
    """Target, reconstructions and std maps of one slice of the first volume of one setting."""
    src = list_h5(input_dir)[0]
    name = os.path.basename(src)
    with h5py.File(src, "r") as f:
        n = f[TARGET_KEYS[coil]].shape[0]
        s = n // 2 if slice_idx < 0 else min(slice_idx, n - 1)
        target = np.asarray(f[TARGET_KEYS[coil]][s], dtype=np.float64)
    recons, stds = {}, {}
    for m in methods:
        out = os.path.join(work_dir, f"{coil}_{acceleration}x", m.name, "recon", name)
        if not os.path.isfile(out):
            continue
        with h5py.File(out, "r") as f:
            recons[m.label] = np.asarray(f["reconstruction"][s], dtype=np.float64)
            if m.diffusion and "reconstruction_std" in f and int(f.attrs.get("num_samples", 0) or 0) > 1:
                stds[m.label] = np.asarray(f["reconstruction_std"][s], dtype=np.float64)
    meta = {"coil": recon_report.COIL_LABELS[coil], "acceleration": acceleration, "fname": name, "slice": s}
    return target, recons, stds, meta


# ------------------------------------------------------------------------------------------------- main


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model_path",
        type=str,
        default=DEMO_MODEL,
        help="diffusion checkpoint (config.json beside it); default: the demo checkpoint",
    )
    p.add_argument(
        "--data_dir", type=str, default=os.path.join(REPO_ROOT, "demo_data"), help="holds <coil>_val/ folders"
    )
    p.add_argument(
        "--singlecoil_dir", type=str, default="", help="single-coil folder ('' = <data_dir>/singlecoil_val)"
    )
    p.add_argument(
        "--multicoil_dir", type=str, default="", help="multi-coil folder ('' = <data_dir>/multicoil_val)"
    )
    p.add_argument(
        "--coils", type=str, default="singlecoil,multicoil", help=f"comma list of {', '.join(TARGET_KEYS)}"
    )
    p.add_argument("--accelerations", type=str, default="4,8", help=f"comma list from {sorted(PROTOCOLS)}")
    p.add_argument(
        "--methods",
        type=str,
        default="zero_filled,sense,l1_wavelet,bart_pics,ddim_project,ddim_replace",
        help="comma list of the methods to run",
    )
    p.add_argument("--ancestral", action="store_true", help="also run ancestral_project (many steps)")
    p.add_argument("--ancestral_steps", type=int, default=0, help="respaced ancestral steps (0 = all T)")
    p.add_argument("--ddim_steps", type=int, default=50, help="DDIM respacing: ddim<N>")
    p.add_argument("--num_samples", type=int, default=4, help="K posterior samples per slice")
    p.add_argument(
        "--eta", type=float, default=1.0, help="DDIM eta (1.0 chosen on a training volume; docs/results.md)"
    )
    p.add_argument(
        "--ancestral_samples",
        type=int,
        default=0,
        help="K for ancestral_project (0: --num_samples); its chain is much longer",
    )
    p.add_argument(
        "--t0",
        type=str,
        default="",
        help=f"start fraction of the reverse chain (image_sample.py --t0; '' = its default {DEFAULT_T0})",
    )
    p.add_argument(
        "--start_step",
        type=int,
        default=-1,
        help="start at this base-chain step instead (image_sample.py --start_step; -1 = use --t0); the "
        "same step for DDIM and the ancestral chain when both contain it",
    )
    p.add_argument("--batch_size", type=int, default=0, help="image_sample.py --batch_size (0: its default)")
    p.add_argument("--seed", type=int, default=0, help="image_sample.py --sample_seed")
    p.add_argument(
        "--sample_args", type=str, default="", help="extra flags for image_sample.py, one quoted string"
    )
    p.add_argument(
        "--baseline_args", type=str, default="", help="extra flags for baseline_recon.py, one quoted string"
    )
    p.add_argument(
        "--maps",
        type=str,
        choices=("estimate", "file"),
        default="estimate",
        help="estimate: drop stored sens_maps so maps come from the undersampled centre; file: use them",
    )
    p.add_argument("--max_files", type=int, default=0, help="first N volumes per coil setting (0 = all)")
    p.add_argument("--max_slices", type=int, default=0, help="central N slices per volume (0 = all)")
    p.add_argument(
        "--work_dir",
        type=str,
        default=os.path.join(REPO_ROOT, "recon_out", "benchmark"),
        help="the runs' output folders",
    )
    p.add_argument(
        "--results_dir",
        type=str,
        default=os.path.join(REPO_ROOT, "results"),
        help="benchmark CSV, markdown table and figure go here",
    )
    p.add_argument(
        "--figure_setting",
        type=str,
        default="",
        help="coil,acceleration of the figure, e.g. singlecoil,8 ('' = multi-coil, first R)",
    )
    p.add_argument("--figure_slice", type=int, default=-1, help="slice of the figure's volume (-1: middle)")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument(
        "--keep_going", action="store_true", help="after a failed run, go on; write the others; exit 1"
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = create_argparser()
    args = p.parse_args(argv)
    if args.t0 and args.start_step >= 0:
        p.error(f"--t0 {args.t0} and --start_step {args.start_step}: give one start, not both")
    args.coil_list = [c.strip() for c in args.coils.split(",") if c.strip()]
    for c in args.coil_list:
        if c not in TARGET_KEYS:
            p.error(f"--coils: unknown {c!r}; choose from {sorted(TARGET_KEYS)}")
    try:
        args.acc_list = [int(a) for a in args.accelerations.split(",") if a.strip()]
    except ValueError:
        p.error(f"--accelerations must be integers, got {args.accelerations!r}")
    for a in args.acc_list:
        if a not in PROTOCOLS:
            p.error(f"--accelerations: {a} has no protocol; choose from {sorted(PROTOCOLS)}")
    if args.num_samples < 1:
        p.error("--num_samples must be >= 1")
    if args.figure_setting:
        coil, _, acc = args.figure_setting.partition(",")
        if coil not in args.coil_list or not acc.strip().isdigit() or int(acc) not in args.acc_list:
            p.error(f"--figure_setting {args.figure_setting!r}: expected '<coil>,<R>' among the settings run")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        methods = build_methods(args)
    except ValueError as err:
        print(f"recon_benchmark: error: {err}", file=sys.stderr)
        return 2
    methods, notes = drop_unavailable(methods)
    for note in notes:
        print(f"recon_benchmark: note: {note}", file=sys.stderr)
    if not methods:
        print("recon_benchmark: error: no method left to run", file=sys.stderr)
        return 2
    from tqdm import tqdm

    input_dirs = {}
    for coil in args.coil_list:
        src = getattr(args, f"{coil}_dir") or os.path.join(args.data_dir, f"{coil}_val")
        input_dirs[coil] = prepare_inputs(
            src, args.work_dir, coil, args.max_files, args.max_slices, drop_maps=args.maps == "estimate"
        )
    jobs = [
        (coil, acc, m)
        for coil in args.coil_list
        for acc in args.acc_list
        for m in methods
        if not (m.name == "sense" and coil == "singlecoil")  # SENSE with one unit coil is zero-filled
    ]
    rows, per_volume, failed = [], [], []
    for coil, acc, m in tqdm(jobs, desc="recon_benchmark", unit="run", file=sys.stderr):
        try:
            summary = run_method(m, coil, acc, input_dirs[coil], args.work_dir, args.overwrite, args.dry_run)
        except (RuntimeError, ValueError) as err:
            print(f"recon_benchmark: error: {err}", file=sys.stderr)
            if not args.keep_going:
                return 1
            failed.append(f"{coil} {acc}x {m.name}")
            continue
        if summary is None:
            continue
        rows.append(summary_row(m, coil, acc, summary))
        for v in summary["volumes"]:
            per_volume.append(
                {"method": m.name, "coil": coil, "acceleration": acc, **{k: v[k] for k in v if k != "corr"}}
            )
    if args.dry_run:
        return 0
    if not rows:
        print("recon_benchmark: error: no run finished; nothing written", file=sys.stderr)
        return 1

    res = args.results_dir
    recon_report.write_csv(rows, os.path.join(res, "recon_metrics.csv"))
    recon_report.write_per_volume_csv(per_volume, os.path.join(res, "recon_per_volume.csv"))
    header = (
        "Reconstruction benchmark (benchmarks/recon_benchmark.py): mean ± std over volumes; fastMRI "
        "NMSE/PSNR/SSIM against reconstruction_esc (single-coil) and reconstruction_rss (multi-coil); "
        "NFE per sample × K samples; r = per-slice Pearson correlation of the std map with |error| "
        "(mean ± std over slices)."
    )
    recon_report.write_markdown_table(rows, os.path.join(res, "recon_table.md"), header)

    # default: multi-coil (the setting where every method, SENSE included, runs), first acceleration
    fig_coil = "multicoil" if "multicoil" in args.coil_list else args.coil_list[0]
    fig_acc = args.acc_list[0]
    if args.figure_setting:
        fig_coil, fig_acc_s = args.figure_setting.split(",")
        fig_acc = int(fig_acc_s)
    target, recons, stds, meta = figure_data(
        args.work_dir, fig_coil, fig_acc, methods, input_dirs[fig_coil], args.figure_slice
    )
    gain = 5.0
    recon_report.make_figure(
        target,
        recons,
        stds,
        os.path.join(res, "recon_figure.png"),
        title=f"{meta['coil']}, {fig_acc}×, {meta['fname']} slice {meta['slice']}",
        error_gain=gain,
    )
    meta["error_gain"] = gain

    import torch

    info: Dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": data_info(input_dirs),
        "run": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "num_samples": args.num_samples,
            "ancestral_samples": args.ancestral_samples or args.num_samples,
            "t0": args.t0 or ("" if args.start_step >= 0 else str(DEFAULT_T0)),
            "start_step": args.start_step,  # -1: from t0; each output's h5 holds the base step used
            "ddim_steps": args.ddim_steps,
            "eta": args.eta,
            "ancestral_steps": args.ancestral_steps or "T",
            "center_fraction_4x": PROTOCOLS[4][1],
            "center_fraction_8x": PROTOCOLS[8][1],
            "maps": args.maps,
            "maps_note": MAPS_NOTES[args.maps],
            "max_files": args.max_files,
            "max_slices": args.max_slices,
            "methods": [m.name for m in methods],
            "command": " ".join(shlex.quote(a) for a in sys.argv),
        },
        "figure": meta,
    }
    if args.model_path:
        info.update(training_info(args.model_path))
    if failed:
        info["run"]["failed"] = failed
    if notes:
        info["run"]["notes"] = notes
    write_json(os.path.join(res, "benchmark_info.json"), info)
    print(
        f"[recon_benchmark] wrote {res}: recon_metrics.csv, recon_table.md, recon_figure.png, "
        "benchmark_info.json"
    )
    if failed:
        print(f"recon_benchmark: {len(failed)} run(s) failed and are missing from the results: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
