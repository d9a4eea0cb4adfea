"""scripts/image_train.py on bad data: one line per bad file, no traceback, the index pass first."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from tiny import REPO, TINY_FLAGS, TORCHRUN_2, random_volume, script_env

from improved_diffusion.checkpoint import list_complete_checkpoints

SCRIPT = os.path.join(REPO, "scripts", "image_train.py")
TINY = TINY_FLAGS + ["--batch_size=2", "--log_interval=1"]


def train(data_dir, log_dir, *extra, timeout=180):
    cmd = [sys.executable, SCRIPT, f"--data_dir={data_dir}", f"--log_dir={log_dir}", *TINY, *extra]
    return subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=timeout)


def header_bad_files(d):
    """Files the index pass refuses: name -> expected fragment of its line."""
    good = random_volume(d / "good.h5")
    data = open(good, "rb").read()
    (d / "truncated.h5").write_bytes(data[: len(data) // 2])
    (d / "not_hdf5.h5").write_bytes(b"this is not hdf5 at all " * 40)
    with h5py.File(d / "no_kspace.h5", "w") as f:
        f["reconstruction_esc"] = np.zeros((2, 8, 8), np.float32)
    with h5py.File(d / "wrong_dims.h5", "w") as f:
        f["kspace"] = np.zeros((16, 16), np.complex64)
    return {
        "truncated.h5": "not a readable HDF5 file",
        "not_hdf5.h5": "not a readable HDF5 file",
        "no_kspace.h5": "missing key 'kspace'",
        "wrong_dims.h5": "must be (slices, H, W) or (slices, coils, H, W)",
    }


def value_bad_files(d):
    """Files that pass the index pass but hold bad values: name -> (bad slice, fragment)."""
    cases = {
        "nan_kspace.h5": (1, "'kspace' holds 2 NaN or inf values"),
        "inf_sens_maps.h5": (2, "'sens_maps' holds 1 NaN or inf values"),
        "zero_kspace.h5": (0, "'kspace' is all zero"),
    }
    for name, (slice_idx, _) in cases.items():
        path = random_volume(d / name, coils=2 if name == "inf_sens_maps.h5" else 0, seed=len(name))
        with h5py.File(path, "r+") as f:
            if name == "nan_kspace.h5":
                f["kspace"][slice_idx, 3, 3:5] = np.nan
            elif name == "inf_sens_maps.h5":
                f["sens_maps"][slice_idx, 0, 8, 8] = np.inf
            else:
                f["kspace"][slice_idx] = 0
    return cases


def _no_traceback(out):
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr


def test_index_pass_lists_every_bad_file_before_building_the_model(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    cases = header_bad_files(data)
    out = train(data, log, "--max_steps=1")
    assert out.returncode == 2, out.stdout + out.stderr
    _no_traceback(out)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(cases), out.stderr
    for name, fragment in cases.items():
        assert any(line.startswith(f"error: {data / name}: ") and fragment in line for line in errors), name
    assert "good.h5" not in out.stderr
    # Nothing was built or written: the index pass ran first.
    assert "creating model" not in out.stdout and not log.exists()


def test_skip_mode_skips_bad_files_and_trains(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    cases = header_bad_files(data)
    out = train(data, log, "--max_steps=1", "--on_bad_file=skip", "--fp16_scale_growth=1e-3")
    assert out.returncode == 0, out.stdout + out.stderr
    _no_traceback(out)
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipping bad file ")]
    assert sorted(line.split(":")[0].split()[-1] for line in skipped) == sorted(str(data / n) for n in cases)
    assert f"skipped {len(cases)} of {len(cases) + 1} files as bad (on_bad_file='skip')" in out.stderr
    assert "warnings.warn" not in out.stderr and "UserWarning" not in out.stderr
    # Upstream's flag is accepted and answered by one note.
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: --fp16_scale_growth")]
    assert notes == ["note: --fp16_scale_growth is ignored: " + notes[0].split("is ignored: ", 1)[1]]
    assert "GradScaler" in notes[0]
    assert [s.step for s in list_complete_checkpoints(str(log))] == [1]


@pytest.mark.parametrize("name", ["nan_kspace.h5", "inf_sens_maps.h5", "zero_kspace.h5"])
def test_bad_values_stop_training_with_one_line(tmp_path, name):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    random_volume(data / "good.h5")
    slice_idx, fragment = value_bad_files(data)[name]
    for other in {"nan_kspace.h5", "inf_sens_maps.h5", "zero_kspace.h5"} - {name}:
        os.remove(data / other)
    # One volume of 4 slices plus the bad one: a batch of 2 reaches the bad slice within 4 steps.
    out = train(data, log, "--max_steps=8", "--deterministic=True", "--save_interval=100")
    assert out.returncode == 2, out.stdout + out.stderr
    _no_traceback(out)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith(f"error: {data / name}: slice {slice_idx}: {fragment}"), errors[0]
    # A single process saves the steps done so far (the bad batch never reached the model).
    steps = [s.step for s in list_complete_checkpoints(str(log))]
    assert len(steps) <= 1 and all(0 < s < 8 for s in steps)


def test_bad_values_skip_mode_reports_each_file_once_and_trains(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    random_volume(data / "good.h5")
    cases = value_bad_files(data)
    out = train(data, log, "--max_steps=12", "--on_bad_file=skip", "--save_interval=100")
    assert out.returncode == 0, out.stdout + out.stderr
    _no_traceback(out)
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipping bad file ")]
    # 16 slices, 24 drawn in 12 steps with shuffling: every bad slice is met at least once (seed 0).
    assert len(skipped) == len(cases), out.stderr
    for name, (slice_idx, fragment) in cases.items():
        assert any(f"{data / name}: slice {slice_idx}: {fragment}" in line for line in skipped), name
    assert [s.step for s in list_complete_checkpoints(str(log))] == [12]


def test_bad_file_on_another_rank_stops_every_rank(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    random_volume(data / "a_good.h5")
    (data / "b_bad.h5").write_bytes(b"not hdf5 " * 100)  # files[1::2]: rank 1's
    random_volume(data / "c_good.h5", seed=1)
    cmd = [*TORCHRUN_2, SCRIPT]
    cmd += [f"--data_dir={data}", f"--log_dir={log}", *TINY, "--max_steps=1"]
    out = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data / 'b_bad.h5'}: not a readable HDF5"), (
        out.stderr
    )
    assert "creating model" not in out.stdout and not log.exists()
