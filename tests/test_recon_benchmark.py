"""Smoke tests of benchmarks/recon_benchmark.py and recon_report.py with tiny fake data and fake scripts.

The real scripts need a trained model; here a stand-in script (same CLI shape, written into tmp) writes
output volumes, so the orchestration, scoring, resuming and report files are tested in seconds.
"""

import csv
import json
import os
import sys
import textwrap

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "paper"))

import recon_benchmark as rb  # noqa: E402
import recon_report  # noqa: E402
import record_train_speed  # noqa: E402, F401
from bench_inputs import prepare_inputs  # noqa: E402
from training_info import training_info  # noqa: E402

from improved_diffusion.evaluation import std_error_correlation  # noqa: E402

FAKE_SCRIPT = textwrap.dedent(
    """
    import argparse, os, h5py, numpy as np
    p = argparse.ArgumentParser()
    p.add_argument("--input", nargs="+")
    p.add_argument("--output_dir")
    p.add_argument("--overwrite", default="False")
    p.add_argument("--num_samples", type=int, default=0)
    args, _ = p.parse_known_args()
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write(args.output_dir + "\\n")
    os.makedirs(args.output_dir, exist_ok=True)
    folder = args.input[0]
    for name in sorted(os.listdir(folder)):
        out = os.path.join(args.output_dir, name)
        if os.path.exists(out) and args.overwrite != "True":
            continue
        with h5py.File(os.path.join(folder, name), "r") as f:
            key = "reconstruction_rss" if f["kspace"].ndim == 4 else "reconstruction_esc"
            target = f[key][()]
        rng = np.random.default_rng(0)
        err = 0.05 * rng.standard_normal(target.shape)
        with h5py.File(out, "w") as f:
            f["reconstruction"] = (target + err).astype(np.float32)
            f["reconstruction_std"] = (np.abs(err) + 0.01 * rng.random(target.shape)).astype(np.float32)
            f.attrs["nfe"] = 7 if args.num_samples else 0
            f.attrs["num_samples"] = args.num_samples
            f.attrs["seconds_per_slice"] = 0.25
    """
)


def make_volume(path, slices=4, coils=0, size=16, seed=0):
    rng = np.random.default_rng(seed)
    shape = (slices, coils, size, size) if coils else (slices, size, size)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    target = rng.random((slices, size, size)).astype(np.float32) + 0.5
    with h5py.File(path, "w") as f:
        f["kspace"] = kspace
        f["reconstruction_rss" if coils else "reconstruction_esc"] = target
        f.attrs["acquisition"] = "fake"


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for coil, coils in (("singlecoil", 0), ("multicoil", 3)):
        (data / f"{coil}_val").mkdir(parents=True)
        for i in range(2):
            make_volume(data / f"{coil}_val" / f"vol{i}.h5", coils=coils, seed=i)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("baseline_recon.py", "image_sample.py"):
        (scripts / name).write_text(FAKE_SCRIPT)
    monkeypatch.setattr(rb, "SCRIPTS", str(scripts))
    return tmp_path


def calls(tmp_path):
    path = tmp_path / "scripts" / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_std_error_correlation():
    rng = np.random.default_rng(0)
    err = rng.random((3, 8, 8))
    r = std_error_correlation(2 * err + 1, err)
    np.testing.assert_allclose(r, 1.0)
    r = std_error_correlation(-err, err)
    np.testing.assert_allclose(r, -1.0)
    assert np.isnan(std_error_correlation(np.ones((8, 8)), err[0]))[0]
    with pytest.raises(ValueError, match="shape"):
        std_error_correlation(err, err[0])


def test_summarize_mean_std_over_volumes():
    kwargs = dict(
        method="m",
        label="M",
        coil="singlecoil",
        acceleration=4,
        mask="random",
        center_fraction=0.08,
        target="reconstruction_esc",
        per_volume=[{"nmse": 0.1, "psnr": 20.0, "ssim": 0.5}, {"nmse": 0.3, "psnr": 22.0, "ssim": 0.7}],
        num_slices=8,
        nfe=10,
        num_samples=2,
        sec_per_slice=1.5,
        corr_per_slice=[0.2, 0.4, float("nan")],
    )
    row = recon_report.summarize(**kwargs)
    assert row["psnr_mean"] == pytest.approx(21.0) and row["psnr_std"] == pytest.approx(1.0)
    assert row["std_err_corr_mean"] == pytest.approx(0.3)  # NaN slices are left out
    with pytest.raises(ValueError, match="no volumes"):
        recon_report.summarize(**{**kwargs, "per_volume": []})


def test_subset_keeps_central_slices_and_name(tmp_path):
    make_volume(tmp_path / "a.h5", slices=7)
    out = prepare_inputs(str(tmp_path), str(tmp_path / "work"), "singlecoil", max_files=1, max_slices=3)
    with h5py.File(os.path.join(out, "a.h5"), "r") as f, h5py.File(tmp_path / "a.h5", "r") as g:
        np.testing.assert_array_equal(f["kspace"][()], g["kspace"][2:5])
        np.testing.assert_array_equal(f["reconstruction_esc"][()], g["reconstruction_esc"][2:5])
        assert f.attrs["acquisition"] == "fake"
    assert prepare_inputs(str(tmp_path), str(tmp_path / "w"), "singlecoil", 0, 0) == str(tmp_path)


def fake_checkpoint(folder):
    """A tiny state dict with a config.json and a progress.csv beside it, as scripts/image_train.py leaves."""
    import torch

    from improved_diffusion.script_util import model_and_diffusion_defaults, save_config

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        **model_and_diffusion_defaults(),
        "batch_size": 2,
        "lr": 1e-4,
        "ema_rate": "0.999",
        "data_dir": "x",
    }
    save_config(config, str(folder))
    torch.save({"w": torch.zeros(10, 3), "b": torch.zeros(5)}, folder / "ema_0.999_000120.pt")
    (folder / "progress.csv").write_text("step,loss,time_elapsed\n60,1.0,30\n120,0.5,72\n")
    return folder / "ema_0.999_000120.pt"


def test_benchmark_end_to_end_with_fake_scripts(fake_env, tmp_path):
    results = tmp_path / "results"
    argv = [
        "--data_dir",
        str(fake_env / "data"),
        "--work_dir",
        str(tmp_path / "work"),
        "--results_dir",
        str(results),
        "--methods",
        "zero_filled,sense,ddim_project",
        "--model_path",
        str(fake_checkpoint(tmp_path / "log")),
        "--num_samples",
        "2",
        "--max_slices",
        "2",
    ]
    assert rb.main(argv) == 0
    with open(results / "recon_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # sense is not run single-coil: 2 coils x 2 accelerations x 3 methods - 2
    assert len(rows) == 10
    assert set(rows[0]) == set(recon_report.CSV_COLUMNS)
    ddim = [r for r in rows if r["method"] == "ddim_project"]
    assert all(r["nfe"] == "7" and r["num_samples"] == "2" for r in ddim)
    assert all(float(r["std_err_corr_mean"]) > 0.5 for r in ddim)  # the fake std follows the fake error
    assert all(r["std_err_corr_mean"] == "" for r in rows if r["method"] == "zero_filled")
    assert {r["target"] for r in rows} == {"reconstruction_esc", "reconstruction_rss"}
    assert all(r["num_slices"] == "4" and r["num_volumes"] == "2" for r in rows)
    for name in ("recon_table.md", "recon_figure.png", "benchmark_info.json", "recon_per_volume.csv"):
        assert (results / name).stat().st_size > 0
    info = json.loads((results / "benchmark_info.json").read_text())
    assert info["data"]["multicoil"]["coils"] == 3 and info["data"]["singlecoil"]["slices"] == 4
    assert info["training"]["steps"] == 120
    n_calls = len(calls(fake_env))
    assert n_calls == 10

    # every placeholder of paper/paper.md is filled from what the benchmark wrote (train_speed aside)
    import build_paper
    import results_values

    res = results_values.load_results(str(results))
    results_values.add_generated_text(res)
    with open(os.path.join(ROOT, "paper", "paper.md")) as f:
        keys = set(build_paper.PLACEHOLDER.findall(f.read()))
    # placeholders of the optional results files (held-out summary, prior samples) are not the benchmark's
    optional = {k for k in keys if build_paper.key_source(k) in results_values.OPTIONAL_RESULTS}
    lacking = sorted(k for k in keys - optional if not k.startswith("speed.") and k not in res.values)
    assert lacking == []

    # resumable: a second run reuses every finished run
    assert rb.main(argv) == 0
    assert len(calls(fake_env)) == n_calls
    # a changed option (K) reruns the diffusion method only, with --overwrite
    assert rb.main(argv[:-4] + ["--num_samples", "3", "--max_slices", "2"]) == 0
    assert len(calls(fake_env)) == n_calls + 4


def test_stored_maps_are_dropped_by_default(tmp_path):
    make_volume(tmp_path / "m.h5", coils=2)
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f["sens_maps"] = np.ones((4, 2, 16, 16), np.complex64)
    out = prepare_inputs(str(tmp_path), str(tmp_path / "w"), "multicoil", 0, 0)
    with h5py.File(os.path.join(out, "m.h5"), "r") as f:
        assert "sens_maps" not in f and f["kspace"].shape == (4, 2, 16, 16)
    assert prepare_inputs(str(tmp_path), str(tmp_path / "w"), "multicoil", 0, 0, drop_maps=False) == str(
        tmp_path
    )


def test_training_info_from_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from improved_diffusion.script_util import save_config

    log = tmp_path / "log"
    save_config(
        {"image_size": 16, "num_channels": 8, "batch_size": 2, "lr": 1e-4, "ema_rate": "0.999"}, str(log)
    )
    torch.save({"w": torch.zeros(10, 3), "b": torch.zeros(5)}, log / "ema_0.999_000120.pt")
    with open(log / "progress.csv", "w") as f:
        f.write("step,loss,time_elapsed\n60,1.0,30\n120,0.5,72\n")
    info = training_info(str(log / "ema_0.999_000120.pt"))
    assert info["model"]["params"] == 35 and info["training"]["steps"] == 120
    assert info["training"]["wall_hours"] == pytest.approx(0.02)
    assert "progress.csv" in info["training"]["wall_time_source"]
    # without a time column the recorded wall_time.json wins over the file-time estimate
    with open(log / "progress.csv", "w") as f:
        f.write("step,loss\n60,1.0\n120,0.5\n")
    (log / "wall_time.json").write_text('{"wall_hours": 4.6, "note": "from the logs"}')
    info = training_info(str(log / "ema_0.999_000120.pt"))
    assert info["training"]["wall_hours"] == 4.6
    assert info["training"]["wall_time_source"] == "wall_time.json"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        rb.parse_args(["--accelerations", "5"])
    args = rb.parse_args(["--methods", "ddim_project", "--model_path", ""])
    with pytest.raises(ValueError, match="model_path"):
        rb.build_methods(args)
    with pytest.raises(ValueError, match="unknown"):
        rb.build_methods(rb.parse_args(["--methods", "nope"]))


def test_record_train_speed_replaces_its_row(tmp_path, monkeypatch):
    import record_train_speed as rts

    fake = tmp_path / "train_speed.py"
    fake.write_text(
        textwrap.dedent(
            """
            import json, sys
            args = sys.argv[1:]
            out = args[args.index("--json") + 1]
            bs = int(args[args.index("--batch_size") + 1]) if "--batch_size" in args else 2
            res = {"config": {"batch_size": bs, "image_size": 16, "num_channels": 8}, "device": "cpu",
                   "torch_threads": 2, "precision_used": "fp32", "parameters": 12345, "ours_s_per_step": 0.5}
            json.dump(res, open(out, "w"))
            """
        )
    )
    monkeypatch.setattr(rts, "TRAIN_SPEED", str(fake))
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "config.json").write_text(json.dumps({"batch_size": 4, "image_size": 16, "lr": 1}))
    assert rts.flags_from_config(str(tmp_path / "log")) == ["--image_size", "16", "--batch_size", "4"]
    out = tmp_path / "train_speed.csv"
    assert rts.main(["--name", "a", "--config", str(tmp_path / "log"), "--out", str(out)]) == 0
    assert rts.main(["--name", "b", "--out", str(out)]) == 0
    assert rts.main(["--name", "a", "--out", str(out), "--", "--batch_size", "8"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["b", "a"]
    assert rows[1]["batch_size"] == "8" and rows[1]["samples_per_sec"] == "16.0"
    assert rows[0]["params_m"] == "0.012" and rows[0]["sec_per_step"] == "0.5"
    assert rts.main(["--name", "c", "--config", str(tmp_path / "nope"), "--out", str(out)]) == 2
