"""Run benchmarks/train_speed.py and record its result as one row of results/train_speed.csv.

Each call measures one named configuration and replaces the row of that name (other rows are kept), so
the CSV collects e.g. the demo model on this CPU and the same model on a GPU machine. Flags after ``--``
go to train_speed.py unchanged; ``--config`` takes the model flags from a training run's config.json, so
the speed is measured for exactly the model that was trained.

    .venv/bin/python benchmarks/record_train_speed.py --name demo_cpu --config logs/demo/config.json
    .venv/bin/python benchmarks/record_train_speed.py --name small_cpu -- --image_size 64 --num_channels 32
    .venv/bin/python benchmarks/record_train_speed.py --name demo_cuda --config logs/demo -- --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from improved_diffusion.io_util import atomic_write  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

TRAIN_SPEED = os.path.join(REPO_ROOT, "benchmarks", "train_speed.py")

COLUMNS = [
    "name",
    "device",
    "precision",
    "threads",
    "clock",
    "image_size",
    "num_channels",
    "batch_size",
    "params_m",
    "sec_per_step",
    "samples_per_sec",
    "upstream_sec_per_step",
    "speedup",
    "speedup_min",
    "speedup_max",
    "repeats",
    "peak_mem_gb",
]
# train_speed.py flags that a training config.json provides (same names in both).
CONFIG_FLAGS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "channel_mult",
    "learn_sigma",
    "use_scale_shift_norm",
    "diffusion_steps",
    "noise_schedule",
    "batch_size",
    "microbatch",
)


def flags_from_config(path: str) -> List[str]:
    """train_speed.py flags for the model and batch size of a training run (config.json or its folder)."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--config {path}: no config.json there")
    with open(cfg_path) as f:
        config = json.load(f)
    flags: List[str] = []
    for key in CONFIG_FLAGS:
        if key in config and config[key] is not None:
            flags += [f"--{key}", str(config[key])]
    return flags


def row_from_result(name: str, result: Dict[str, Any]) -> Dict[str, Any]:
    """One CSV row from train_speed.py's JSON result."""
    cfg = result.get("config", {})
    sec = float(result["ours_s_per_step"])
    batch = int(cfg.get("batch_size", 0) or 0)
    return {
        "name": name,
        "device": result.get("device", ""),
        "precision": result.get("precision_used", cfg.get("precision", "")),
        "threads": result.get("torch_threads", ""),
        "clock": cfg.get("clock", "wall"),
        "image_size": cfg.get("image_size", ""),
        "num_channels": cfg.get("num_channels", ""),
        "batch_size": batch,
        "params_m": round(int(result.get("parameters", 0)) / 1e6, 3),
        "sec_per_step": round(sec, 4),
        "samples_per_sec": round(batch / sec, 3) if batch else "",
        "upstream_sec_per_step": round(float(result["upstream_s_per_step"]), 4)
        if "upstream_s_per_step" in result
        else "",
        "speedup": round(float(result["speedup"]), 3) if "speedup" in result else "",
        # the range of the per-repeat ratios: how much the machine's load moved the number
        "speedup_min": round(float(result["speedup_min"]), 3) if "speedup_min" in result else "",
        "speedup_max": round(float(result["speedup_max"]), 3) if "speedup_max" in result else "",
        "repeats": cfg.get("repeats", ""),
        "peak_mem_gb": round(float(result["peak_memory_gb"]), 2) if "peak_memory_gb" in result else "",
    }


def update_csv(path: str, row: Dict[str, Any]) -> None:
    """Replace (or append) the row with ``row['name']`` in the CSV at ``path``, atomically."""
    rows: List[Dict[str, Any]] = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("name") != row["name"]]
    rows.append(row)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--name", type=str, default="demo_cpu", help="row name in the CSV (an existing row is replaced)"
    )
    p.add_argument(
        "--config",
        type=str,
        default="",
        help="training config.json (or its log dir) for the model flags ('' = train_speed.py's defaults)",
    )
    p.add_argument(
        "--out", type=str, default=os.path.join(REPO_ROOT, "results", "train_speed.csv"), help="the CSV"
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    p = create_argparser()
    args = p.parse_args(argv)
    if not args.name or "," in args.name:
        p.error("--name must be non-empty and without commas")
    try:
        flags = flags_from_config(args.config) if args.config else []
    except ValueError as err:
        print(f"record_train_speed: error: {err}", file=sys.stderr)
        return 2
    fd, json_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        # flags given after -- come last, so they override the config's
        cmd = [sys.executable, TRAIN_SPEED] + flags + passthrough + ["--json", json_path]
        print("[record_train_speed]", " ".join(cmd))
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
        if proc.returncode != 0:
            print(
                f"record_train_speed: error: train_speed.py failed (exit {proc.returncode})", file=sys.stderr
            )
            return 1
        with open(json_path) as f:
            result = json.load(f)
    finally:
        os.remove(json_path)
    row = row_from_result(args.name, result)
    update_csv(args.out, row)
    print(f"[record_train_speed] {args.name}: {row['sec_per_step']} s/step -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
