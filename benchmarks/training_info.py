"""Model and training facts of a diffusion checkpoint for results/benchmark_info.json (quoted by the paper).

Read from the checkpoint itself (parameter count), its ``config.json`` and its log folder's
``progress.csv`` (training wall time), as scripts/image_train.py leaves them.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict

WALL_TIME_FILE = "wall_time.json"
WALL_TIME_COLUMNS = ("time_elapsed", "elapsed_s", "elapsed_sec", "wall_s", "wall_time", "time")


def training_info(model_path: str) -> Dict[str, Any]:
    """Model and training facts from a checkpoint, its config.json and its log dir's progress.csv.

    The wall time comes from a progress.csv column of elapsed seconds when the training log has one, else
    from ``wall_time.json`` beside the checkpoint; otherwise it is estimated from file times (config.json
    written at the start of the last (re)start, the checkpoint at its end) and marked as such in
    ``wall_time_source``.
    """
    import torch

    from improved_diffusion.script_util import load_config

    config = load_config(model_path)
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    num_params = int(sum(v.numel() for v in state.values() if hasattr(v, "numel")))
    log_dir = os.path.dirname(os.path.abspath(model_path))
    digits = "".join(
        ch for ch in os.path.basename(model_path).rsplit(".", 1)[0].rsplit("_", 1)[-1] if ch.isdigit()
    )
    step = int(digits) if digits else None
    wall_hours, source = None, "unknown"
    progress = os.path.join(log_dir, "progress.csv")
    if os.path.isfile(progress):
        with open(progress, newline="") as f:
            rows = list(csv.DictReader(f))
        col = next((c for c in WALL_TIME_COLUMNS if rows and c in rows[0]), None)
        if col is not None:
            upto = [
                r for r in rows if r.get(col) and (step is None or int(float(r.get("step") or 0)) <= step)
            ]
            if upto:
                wall_hours, source = float(upto[-1][col]) / 3600.0, f"progress.csv column '{col}'"
    # A checkpoint copied out of its log folder (or cloned: git sets the file times) keeps its wall time in
    # wall_time.json, {"wall_hours": h, "note": "..."}, written from the training logs.
    recorded = os.path.join(log_dir, WALL_TIME_FILE)
    if wall_hours is None and os.path.isfile(recorded):
        with open(recorded) as f:
            wall_hours, source = float(json.load(f)["wall_hours"]), WALL_TIME_FILE
    cfg_file = os.path.join(log_dir, "config.json")
    if wall_hours is None and os.path.isfile(cfg_file):
        wall_hours = max(os.path.getmtime(model_path) - os.path.getmtime(cfg_file), 0.0) / 3600.0
        source = "estimated from file times (config.json to checkpoint; since the last restart)"
    model_keys = (
        "image_size",
        "num_channels",
        "num_res_blocks",
        "attention_resolutions",
        "channel_mult",
        "diffusion_steps",
        "noise_schedule",
        "learn_sigma",
        "use_kl",
        "dropout",
    )
    model = {k: config[k] for k in model_keys if k in config}
    model.update(
        checkpoint=os.path.basename(model_path), params_m=round(num_params / 1e6, 2), params=num_params
    )
    training = {
        "steps": step,
        "batch_size": config.get("batch_size"),
        "lr": config.get("lr"),
        "ema_rate": str(config.get("ema_rate", "")),
        "data_dir": config.get("data_dir"),
        "crop_size": str(config.get("crop_size", "")),
        "device": config.get("device", "cpu (no CUDA device recorded)"),
        "wall_hours": None if wall_hours is None else round(wall_hours, 2),
        "wall_time_source": source,
    }
    return {"model": model, "training": training}
