"""benchmarks/heldout_summary.py on tiny fake held-out results (no reconstruction run)."""

import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import heldout_summary  # noqa: E402
import recon_report  # noqa: E402

from improved_diffusion.evaluation import FOLDER_FIELDS  # noqa: E402


def _recon_csv(folder, rows, command=""):
    os.makedirs(folder, exist_ok=True)
    out = []
    for method, acc, psnr in rows:
        out.append(
            recon_report.summarize(
                method=method,
                label=method,
                coil="multicoil",
                acceleration=acc,
                mask="random",
                center_fraction=0.08,
                target="reconstruction_rss",
                per_volume=[
                    {"nmse": 0.1, "psnr": psnr - 1, "ssim": 0.7},
                    {"nmse": 0.1, "psnr": psnr + 1, "ssim": 0.8},
                ],
                num_slices=4,
                nfe=0,
                num_samples=0,
                sec_per_slice=1.0,
                corr_per_slice=None,
            )
        )
    recon_report.write_csv(out, os.path.join(folder, "recon_metrics.csv"))
    with open(os.path.join(folder, "benchmark_info.json"), "w") as f:
        json.dump({"run": {"command": command}}, f)


def _evaluate_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FOLDER_FIELDS)
        w.writerows(rows)


def test_collect_recon_and_evaluate(tmp_path):
    heldout = tmp_path / "results" / "heldout"
    _recon_csv(heldout / "multicoil8_sigma0.002", [("sense", 4, 25.0), ("ddim_project", 4, 30.0)])
    _recon_csv(
        heldout / "multicoil8_sigma0.002_noise_matched_lambda" / "sense",
        [("sense", 4, 28.0)],
        command="benchmarks/recon_benchmark.py --methods sense --baseline_args '--lamda 1e-2'",
    )
    _evaluate_csv(
        str(heldout / "singlecoil_sigma0.002" / "evaluate_4x.csv"),
        [
            ["l1_wavelet", "out/l1", "a.h5", "reconstruction_esc", 0.1, 20.0, 0.5],
            ["l1_wavelet", "out/l1", "b.h5", "reconstruction_esc", 0.1, 22.0, 0.7],
            ["l1_wavelet", "out/l1", "mean", "reconstruction_esc", 0.1, 21.0, 0.6],
            ["l1_wavelet", "out/l1", "std", "reconstruction_esc", 0.0, 1.0, 0.1],
            ["diffusion (ddim, dc=project)", "out/d", "a.h5", "reconstruction_esc", 0.1, 24.0, 0.8],
        ],
    )
    out = tmp_path / "results" / "heldout_summary.csv"
    assert heldout_summary.main(["--heldout_dir", str(heldout), "--output", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == heldout_summary.COLUMNS
    key = [(r["split"], r["method"], r["acceleration"], r["lambda"]) for r in rows]
    assert key == [
        ("singlecoil_sigma0.002", "l1_wavelet", "4", ""),
        ("singlecoil_sigma0.002", "diffusion (ddim, dc=project)", "4", ""),
        ("multicoil8_sigma0.002", "sense", "4", "1e-3"),  # the benchmark's BASELINE_LAMBDA
        ("multicoil8_sigma0.002", "sense", "4", "1e-2"),  # --lamda of the recorded command
        ("multicoil8_sigma0.002", "ddim_project", "4", ""),
    ]
    l1 = rows[0]
    assert float(l1["psnr"]) == pytest.approx(21.0) and float(l1["psnr_std"]) == pytest.approx(1.0)  # ddof 0
    assert float(l1["ssim"]) == pytest.approx(0.6) and l1["volumes"] == "2"
    assert l1["source"] == "heldout/singlecoil_sigma0.002/evaluate_4x.csv"
    assert float(rows[3]["psnr"]) == pytest.approx(28.0) and rows[3]["volumes"] == "2"
    assert rows[3]["source"] == "heldout/multicoil8_sigma0.002_noise_matched_lambda/sense/recon_metrics.csv"


def test_bad_inputs_are_one_line(tmp_path, capsys):
    heldout = tmp_path / "heldout"
    _evaluate_csv(str(heldout / "singlecoil_sigma0.002" / "evaluate_four.csv"), [])
    out = tmp_path / "s.csv"
    assert heldout_summary.main(["--heldout_dir", str(heldout), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "evaluate_four.csv" in err and "evaluate_<R>x.csv" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    os.remove(heldout / "singlecoil_sigma0.002" / "evaluate_four.csv")
    (heldout / "singlecoil_sigma0.002" / "recon_metrics.csv").write_text("method,psnr\nx,1\n")
    assert heldout_summary.main(["--heldout_dir", str(heldout), "--output", str(out)]) == 2
    assert "missing columns" in capsys.readouterr().err and not out.exists()
    assert heldout_summary.main(["--heldout_dir", str(tmp_path / "none"), "--output", str(out)]) == 2


def test_split_and_lambda_names():
    assert (
        heldout_summary.split_name("multicoil15_sigma0.005_noise_matched_lambda") == "multicoil15_sigma0.005"
    )
    assert heldout_summary.split_name("other") == "other"
    assert [heldout_summary.format_lambda(v) for v in ("0.0003", "1e-2", "0.1", "0")] == [
        "3e-4",
        "1e-2",
        "0.1",
        "0",
    ]
