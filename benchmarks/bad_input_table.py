"""Bad input files, run through scripts/image_train.py and scripts/image_sample.py: what each one prints.

Every case writes one small bad file (or a checkpoint that does not fit), runs both scripts on it in this
process (tiny model, CPU, a few seconds in all) and records the exit status, the ``error:`` lines on stderr
and the files the run left behind. ``tests/test_bad_input.py`` asserts on the same runs; this script writes
them as the table of docs/bad_input.md::

    python benchmarks/bad_input_table.py --output docs/bad_input.md

Paths of the temporary files are shown as ``<file>`` (the bad input) and ``<checkpoint>``.
"""

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):  # the package, and the tests' tiny model
    if _path not in sys.path:
        sys.path.insert(0, _path)

from tiny import TINY_FLAGS, coil_maps, phantom, write_checkpoint  # noqa: E402

from improved_diffusion.io_util import atomic_write_text  # noqa: E402
from improved_diffusion.mri.fftc import fft2c  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402

SLICES, COILS, H, W = 2, 3, 16, 16
BAD_SLICE = 1  # value errors sit in the second slice, so the line must name it (not just the first)
TRAIN_ARGS = TINY_FLAGS + [
    "--batch_size=2",  # both slices of the file: the first batch meets the bad slice
    "--max_steps=2",
    "--deterministic=True",
    "--log_interval=1",
]
SAMPLE_ARGS = ["--timestep_respacing", "4", "--num_samples", "1", "--progress", "False"]
SAMPLE_ARGS += ["--mask_type", "random", "--accelerations", "4", "--center_fractions", "0.25"]
CHECKPOINT_FILES = ("model", "ema_", "opt")


# ----------------------------------------------------------------------------------------------------------
# Good files, and the bad ones made from them
# ----------------------------------------------------------------------------------------------------------


def write_good(path: str, multicoil: bool = False) -> str:
    """A fully sampled volume of SLICES slices (multi-coil with normalized ``sens_maps``)."""
    img = np.stack([phantom(H, W, 1.0), phantom(H, W, 0.7)])
    with h5py.File(path, "w") as f:
        if multicoil:
            maps = coil_maps(COILS, H, W)
            f["kspace"] = fft2c(torch.from_numpy(maps[None] * img[:, None])).numpy()
            f["sens_maps"] = np.broadcast_to(maps, (SLICES, COILS, H, W)).copy()
        else:
            f["kspace"] = fft2c(torch.from_numpy(img)).numpy()
    return path


def _edit(path: str, key: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    with h5py.File(path, "r+") as f:
        value = edit(f[key][()])
        del f[key]
        f[key] = value


def _set_slice(value: np.ndarray, index: Tuple, new: complex) -> np.ndarray:
    value[index] = new
    return value


def truncated(path: str) -> None:
    data = open(write_good(path), "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def not_hdf5(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"this is not an HDF5 file\n" * 40)


def no_kspace(path: str) -> None:
    with h5py.File(path, "w") as f:
        f["reconstruction_esc"] = np.zeros((SLICES, H, W), np.float32)


def wrong_dims(path: str) -> None:
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((H, W), np.complex64)


def nan_kspace(path: str) -> None:
    _edit(write_good(path), "kspace", lambda k: _set_slice(k, (BAD_SLICE, 3, slice(3, 5)), np.nan))


def nan_sens_maps(path: str) -> None:
    _edit(write_good(path, True), "sens_maps", lambda m: _set_slice(m, (BAD_SLICE, 0, 8, 8), np.inf))


def nan_mask(path: str) -> None:
    with h5py.File(write_good(path), "a") as f:
        f["mask"] = np.where(np.arange(W) == 5, np.nan, 1.0).astype(np.float32)


def zero_kspace(path: str) -> None:
    _edit(write_good(path), "kspace", lambda k: _set_slice(k, BAD_SLICE, 0))


def maps_wrong_shape(path: str) -> None:
    _edit(write_good(path, True), "sens_maps", lambda m: m[..., :-1])


def maps_not_normalized(path: str) -> None:
    _edit(write_good(path, True), "sens_maps", lambda m: _set_slice(m, BAD_SLICE, 2 * m[BAD_SLICE]))


def maps_zero(path: str) -> None:
    _edit(write_good(path, True), "sens_maps", lambda m: _set_slice(m, BAD_SLICE, 0))


def mask_samples_nothing(path: str) -> None:
    with h5py.File(write_good(path), "a") as f:
        f["mask"] = np.zeros(W, np.float32)


@dataclass
class Case:
    """One bad input: ``make(path)`` writes it; ``na`` gives the reason a script is not run (per script)."""

    name: str
    what: str
    make: Optional[Callable[[str], None]]
    slice_idx: Optional[int] = None  # the slice the line must name (value errors)
    na: Dict[str, str] = field(default_factory=dict)


CASES: List[Case] = [
    Case("truncated", "file cut in half", truncated),
    Case("not_hdf5", "not an HDF5 file", not_hdf5),
    Case("no_kspace", "no `kspace` key", no_kspace),
    Case("wrong_dims", "`kspace` of shape (H, W)", wrong_dims),
    Case("nan_kspace", "NaN in `kspace` (slice 1)", nan_kspace, BAD_SLICE),
    Case("nan_sens_maps", "inf in `sens_maps` (slice 1)", nan_sens_maps, BAD_SLICE),
    Case("nan_mask", "NaN in `mask`", nan_mask),
    Case("zero_kspace", "all-zero `kspace` (slice 1)", zero_kspace, BAD_SLICE),
    Case("maps_wrong_shape", "`sens_maps` one column short", maps_wrong_shape),
    Case(
        "maps_not_normalized",
        "`sens_maps` with sum_c |S_c|^2 = 4 (slice 1)",
        maps_not_normalized,
        BAD_SLICE,
        na={
            "sample": "not an error: stored maps are normalized on load (sum_c |S_c|^2 = 1 on their support)"
        },
    ),
    Case("maps_zero", "all-zero `sens_maps` (slice 1)", maps_zero, BAD_SLICE),
    Case("mask_samples_nothing", "`mask` of zeros", mask_samples_nothing),
    Case("config", "checkpoint whose config does not match", None),
]


# ----------------------------------------------------------------------------------------------------------
# Running the scripts in this process
# ----------------------------------------------------------------------------------------------------------


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCRIPTS: Dict[str, object] = {}


def _script(name: str):
    if name not in _SCRIPTS:
        _SCRIPTS[name] = _load_script(name)
    return _SCRIPTS[name]


@dataclass
class Run:
    """What one script did on one case."""

    case: str
    script: str  # "train" or "sample"
    status: int
    stdout: str
    stderr: str
    bad_path: str  # the file the line must name
    outputs: List[str]  # files the run wrote (relative to its output folder); checkpoints, h5, PNG, CSV
    folder: str  # the run's temp folder (paths under it are shown as placeholders)

    @property
    def errors(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    def shown(self, text: str) -> str:
        """``text`` with the temp paths replaced by ``<file>`` and ``<checkpoint>``."""
        text = text.replace(os.path.join(self.folder, "ckpt"), "<checkpoint>")
        return text.replace(self.bad_path, "<file>").replace(self.folder, "<tmp>")


def call_script(name: str, argv: List[str]) -> Tuple[int, str, str]:
    """Run ``scripts/<name>.py``'s ``main(argv)`` in this process as the interpreter would run the script:
    exit status, stdout, stderr (a traceback included)."""
    main = _script(name).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv) or 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:  # SystemExit("message"): Python prints it and exits with 1
                print(exc.code, file=sys.stderr)
                status = 1
        except Exception:  # what a user would see: a traceback
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()


def _written(folder: str) -> List[str]:
    """Output files under ``folder``: checkpoints, h5, PNG, CSV (config.json and logs are not outputs)."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.startswith(CHECKPOINT_FILES) and name.endswith(".pt") or name.endswith((".h5", ".png")):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
            elif name.endswith(".csv") and name != "progress.csv":  # progress.csv: the training log
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


def run_case(case: Case, script: str, folder: str) -> Run:
    """Make ``case``'s input in ``folder`` (empty) and run ``script`` ("train" or "sample") on it."""
    data, out, ckpt_dir = (os.path.join(folder, n) for n in ("data", "out", "ckpt"))
    os.makedirs(data)
    os.makedirs(ckpt_dir)
    bad_path = os.path.join(data, f"{case.name}.h5")
    if case.make is not None:
        case.make(bad_path)
    if script == "train":
        argv = [f"--data_dir={data}", f"--log_dir={out}", *TRAIN_ARGS]
        if case.name == "config":
            # resuming a run of another model: its checkpoint and config.json have num_channels 16
            write_good(os.path.join(data, "good.h5"))
            bad_path = write_checkpoint(ckpt_dir, num_channels=16)
            argv.append(f"--resume_checkpoint={bad_path}")
        name = "image_train"
    else:
        if case.name == "config":
            # config.json says num_channels 16, the weights beside it are of num_channels 8
            write_good(os.path.join(data, "good.h5"))
            bad_path = write_checkpoint(ckpt_dir, config_overrides={"num_channels": 16})
        model = bad_path if case.name == "config" else write_checkpoint(ckpt_dir)
        argv = ["--model_path", model, "--input", data, "--output_dir", out, *SAMPLE_ARGS]
        name = "image_sample"
    status, stdout, stderr = call_script(name, argv)
    return Run(case.name, script, status, stdout, stderr, bad_path, _written(out), folder)


def run_all(root: str) -> List[Run]:
    """Every case through both scripts (where it applies), each in a folder of its own under ``root``."""
    runs = []
    for case in CASES:
        for script in ("train", "sample"):
            if script not in case.na:
                runs.append(run_case(case, script, os.path.join(root, f"{case.name}_{script}")))
    return runs


def markdown(runs: List[Run]) -> str:
    """docs/bad_input.md: one row per case and script."""
    by_key = {(r.case, r.script): r for r in runs}
    lines = [
        "# Bad input: what the scripts print",
        "",
        "Generated by `python benchmarks/bad_input_table.py --output docs/bad_input.md` from real runs of",
        "`scripts/image_train.py` and `scripts/image_sample.py`, one small bad file each (tiny model, CPU);",
        "`tests/test_bad_input.py` asserts the same runs and that this file matches them. `<file>` is the",
        "bad file's path, `<checkpoint>` the folder of a checkpoint. Every case exits with status 2 and",
        "prints exactly the one `error:` line shown, on stderr, with no traceback.",
        "",
        "No output is written: no checkpoint, no reconstruction h5, PNG or metrics CSV.",
        "",
        "- Problems in a file's keys, shapes or mask are found before any work: by training's index pass",
        "  over every file, before a log dir, config or model is made, and by reconstruction's check of",
        "  every input, before any slice is reconstructed. Each bad file is one line.",
        "- Values (NaN/inf, all zero, maps that are not normalized) are checked as each slice is read. In",
        "  training the log dir then already holds `config.json` and the log, and a single process saves",
        "  the steps done before the bad batch as a complete checkpoint (none here: the first batch holds",
        "  the bad slice). With `--on_bad_file skip` training leaves the file out instead, with one",
        "  `skipping bad file <file>: ...` line. Reconstruction writes each volume only after all its slices",
        "  are done, so a bad slice leaves no output for its file.",
        "- A checkpoint whose config does not match: training checks the config.json of the run it resumes",
        "  (and of `--log_dir`) against the flags before anything is written. Reconstruction takes the model",
        "  from the checkpoint's config.json, so the weights must fit it.",
        "",
        'docs/reconstruction.md ("Errors") and docs/training.md ("Bad data files") list the other',
        "refused inputs: flags, start steps, targets, launchers.",
        "",
        "| case | script | exit | line printed (stderr) | output written |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        for script in ("train", "sample"):
            label = {"train": "image_train", "sample": "image_sample"}[script]
            if script in case.na:
                cells = [case.what, label, "n/a", f"n/a: {case.na[script]}", ""]
            else:
                r = by_key[(case.name, script)]
                line = " / ".join(r.shown(e) for e in r.errors) or r.shown(r.stderr.strip()) or "(nothing)"
                written = ", ".join(r.outputs) or "none"
                if not r.outputs and script == "train" and os.path.isdir(os.path.join(r.folder, "out")):
                    written += " (the log dir holds config.json and the log)"
                cells = [case.what, label, str(r.status), f"`{line}`", written]
            # a pipe inside a table cell, even in code, must be escaped
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--output", type=str, default="", help="markdown file to write ('' = stdout)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        table = markdown(run_all(root))
    if args.output:
        atomic_write_text(args.output, table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
