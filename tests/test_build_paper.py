"""Smoke tests of paper/build_paper.py on tiny fake results (no model, no benchmark run)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "paper"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import build_paper  # noqa: E402
import paper_pdf  # noqa: E402
import recon_report  # noqa: E402
import record_train_speed  # noqa: E402
import results_values  # noqa: E402

SOURCE = os.path.join(ROOT, "paper", "paper.md")

FAKE_INFO = {
    "created": "2000-01-01 00:00 UTC",
    "data": {
        "dir": "demo_data",
        "image_shape": [16, 16],
        "singlecoil": {"volumes": 2, "slices": 6},
        "multicoil": {"volumes": 2, "slices": 6, "coils": 4},
    },
    "model": {
        "checkpoint": "ema_0.9999_000010.pt",
        "params_m": 0.1,
        "image_size": 16,
        "num_channels": 8,
        "num_res_blocks": 1,
        "attention_resolutions": "8",
        "diffusion_steps": 100,
        "noise_schedule": "cosine",
        "learn_sigma": True,
    },
    "training": {
        "steps": 10,
        "batch_size": 2,
        "lr": 0.0001,
        "ema_rate": "0.9999",
        "device": "cpu",
        "wall_hours": 0.01,
    },
    "run": {
        "device": "cpu",
        "torch": "2.x",
        "num_samples": 2,
        "t0": "0.2",
        "ddim_steps": 5,
        "eta": 1.0,
        "center_fraction_4x": 0.08,
        "center_fraction_8x": 0.04,
        "maps_note": "estimated",
    },
    "figure": {"coil": "single-coil", "acceleration": 4, "fname": "a.h5", "slice": 1, "error_gain": 5},
}


def _row(method, label, coil, acc, psnr, diffusion):
    per_volume = [
        {"nmse": 0.01, "psnr": psnr - 0.5, "ssim": 0.8},
        {"nmse": 0.02, "psnr": psnr + 0.5, "ssim": 0.9},
    ]
    return recon_report.summarize(
        method=method,
        label=label,
        coil=coil,
        acceleration=acc,
        mask="random" if acc == 4 else "equispaced_fraction",
        center_fraction=0.08 if acc == 4 else 0.04,
        target="reconstruction_esc" if coil == "singlecoil" else "reconstruction_rss",
        per_volume=per_volume,
        num_slices=6,
        nfe=5 if diffusion else 0,
        num_samples=2 if diffusion else 0,
        sec_per_slice=0.5,
        corr_per_slice=[0.3, 0.5] if diffusion else None,
    )


HELDOUT_CSV = (
    "split,method,acceleration,lambda,psnr,psnr_std,ssim,ssim_std,volumes,source\n"
    "multicoil8_sigma0.002,sense,4,1e-2,28.0,2.0,0.75,0.05,5,heldout/a/recon_metrics.csv\n"
    "multicoil8_sigma0.002,bart_pics,4,1e-3,29.5,4.0,0.78,0.1,5,heldout/a/recon_metrics.csv\n"
    "multicoil8_sigma0.002,ddim_project,4,,30.0,2.5,0.73,0.15,5,heldout/a/recon_metrics.csv\n"
)
REAL_SCAN_CSV = (
    "method,psnr,ssim,noise_residual_ratio,seconds\n"
    "diffusion (defaults),33.07209,0.8744,0.9917,76.29\nSENSE,31.846,0.7998,0.79,12.27\n"
)
OPTIONAL_FILES = (
    "heldout_summary.csv",
    "real_scan.csv",
    "real_scan.png",
    "prior_samples.png",
    "prior_samples.json",
)


def make_fake_results(folder, with_ancestral=True, with_optional=True):
    """Write every results file the paper reads, with made-up numbers, into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for coil in ("singlecoil", "multicoil"):
        for acc in (4, 8):
            rows.append(_row("zero_filled", "Zero-filled", coil, acc, 20.0, False))
            rows.append(_row("l1_wavelet", "L1-wavelet", coil, acc, 24.0, False))
            rows.append(_row("ddim_project", "DDIM + projection", coil, acc, 25.0, True))
            if with_ancestral:
                rows.append(_row("ancestral_project", "Ancestral + projection", coil, acc, 25.3, True))
    recon_report.write_csv(rows, os.path.join(folder, "recon_metrics.csv"))
    rng = np.random.default_rng(0)
    target = rng.random((16, 16))
    recon_report.make_figure(
        target,
        {"Zero-filled": target * 0.9, "DDIM + projection": target},
        {"DDIM + projection": np.full((16, 16), 0.01)},
        os.path.join(folder, "recon_figure.png"),
    )
    with open(os.path.join(folder, "benchmark_info.json"), "w") as f:
        json.dump(FAKE_INFO, f)
    for name, dev, sec in (("demo_cpu", "cpu", 1.25), ("demo_cuda", "cuda:0 (H100)", 0.05)):
        result = {
            "config": {"batch_size": 4, "image_size": 128, "num_channels": 64},
            "device": dev,
            "torch_threads": 2,
            "precision_used": "fp32",
            "parameters": 4_700_000,
            "ours_s_per_step": sec,
        }
        record_train_speed.update_csv(
            os.path.join(folder, "train_speed.csv"), record_train_speed.row_from_result(name, result)
        )
    if with_optional:
        folder = Path(folder)
        (folder / "heldout_summary.csv").write_text(HELDOUT_CSV)
        (folder / "real_scan.csv").write_text(REAL_SCAN_CSV)
        for png in ("real_scan.png", "prior_samples.png"):
            (folder / png).write_bytes((folder / "recon_figure.png").read_bytes())
        info = {"model_path": "/x/ema_0.999_000010.pt", "flags": {"num_samples": 16, "eta": 0.0}}
        info["num_network_evaluations_per_sample"] = 50
        (folder / "prior_samples.json").write_text(json.dumps(info))
    return rows


def test_missing_results_fail_with_names(tmp_path):
    out = tmp_path / "paper.pdf"
    with pytest.raises(results_values.MissingResultsError) as err:
        build_paper.build_paper(SOURCE, str(tmp_path / "none"), str(out))
    assert "recon_metrics.csv" in str(err.value) and "train_speed.csv" in str(err.value)
    assert not out.exists()
    assert build_paper.main(["--results_dir", str(tmp_path / "none"), "--out", str(out)]) == 1


def test_allow_missing_renders_marked_draft(tmp_path):
    out = tmp_path / "draft.pdf"
    res, used = build_paper.build_paper(SOURCE, str(tmp_path / "none"), str(out), allow_missing=True)
    assert out.stat().st_size > 1000
    assert "recon_metrics" in res.missing and "recon_metrics" in used


def test_full_build_uses_results(tmp_path):
    make_fake_results(tmp_path / "results")
    out = tmp_path / "paper.pdf"
    res, used = build_paper.build_paper(SOURCE, str(tmp_path / "results"), str(out))
    assert used == [] and res.missing == []
    assert out.read_bytes()[:5] == b"%PDF-"
    assert res.values["recon.singlecoil.4x.ddim_project.psnr"] == "25.00 ± 0.50"
    fitz = pytest.importorskip("pymupdf")  # the dev extra installs it
    text = " ".join(page.get_text() for page in fitz.open(str(out)))
    assert "25.00 ± 0.50" in text and "MISSING" not in text and "DRAFT" not in text
    assert "30.00 ± 2.50" in text and "1e-3" in text  # the held-out csv table: mean ± std, λ as written
    assert "+0.50 dB" in text  # generated: diffusion 30.0 vs the best baseline, BART 29.5
    assert "33.07" in text and "0.99" in text  # the real-scan csv table


def test_optional_results_missing_still_build(tmp_path):
    make_fake_results(tmp_path / "results", with_optional=False)
    out = tmp_path / "paper.pdf"
    res, used = build_paper.build_paper(SOURCE, str(tmp_path / "results"), str(out))
    assert used == [] and res.missing == []
    assert sorted(res.missing_optional) == sorted(results_values.OPTIONAL_RESULTS)
    fitz = pytest.importorskip("pymupdf")
    text = " ".join(page.get_text() for page in fitz.open(str(out)))
    assert "DRAFT" not in text and "heldout_summary.csv is missing" in text and "MISSING" in text


def test_csv_table_cells():
    rows = [
        {
            "method": "a",
            "acceleration": "4",
            "lambda": "1e-3",
            "psnr": "30.123",
            "psnr_std": "1.5",
            "volumes": "5",
        },
        {"method": "b", "acceleration": "8", "lambda": "", "psnr": "", "psnr_std": "", "volumes": "5"},
    ]
    headings, cells = paper_pdf.csv_table_cells(rows, list(rows[0]))
    assert headings == ["method", "R", "λ", "PSNR (dB)", "volumes"]
    assert cells[0] == ["a", "4×", "1e-3", "30.12 ± 1.50", "5"]
    assert cells[1] == ["b", "8×", "–", "–", "5"]


def test_csv_table_directive(tmp_path):
    make_fake_results(tmp_path / "results")
    src = tmp_path / "t.md"
    src.write_text("# T\n\n::: table csv real_scan method,psnr\ncap\n:::\n")
    blocks = build_paper.parse_source(src.read_text())
    assert blocks[1] == ("csv_table", ("real_scan", "cap", ["method", "psnr"]))
    build_paper.build_paper(str(src), str(tmp_path / "results"), str(tmp_path / "t.pdf"))
    src.write_text("# T\n\n::: table csv real_scan method,nope\ncap\n:::\n")
    with pytest.raises(build_paper.PaperError, match="nope"):
        build_paper.build_paper(str(src), str(tmp_path / "results"), str(tmp_path / "t.pdf"))
    src.write_text("# T\n\n::: table csv no_such\ncap\n:::\n")
    with pytest.raises(build_paper.PaperError, match="no_such"):
        build_paper.build_paper(str(src), str(tmp_path / "results"), str(tmp_path / "t.pdf"))


def test_unknown_placeholder_is_an_error(tmp_path):
    make_fake_results(tmp_path / "results")
    src = tmp_path / "bad.md"
    src.write_text("# T\n\nA {{model.no_such_key}} here.\n")
    with pytest.raises(build_paper.PaperError, match="no_such_key"):
        build_paper.build_paper(str(src), str(tmp_path / "results"), str(tmp_path / "x.pdf"))


def test_generated_sentences_follow_the_numbers(tmp_path):
    rows = make_fake_results(tmp_path / "r1")
    str_rows = [{k: recon_report._fmt_cell(v) for k, v in r.items()} for r in rows]
    text = results_values.ddim_vs_ancestral(str_rows)
    assert "-0.30 dB, within 0.5 dB" in text
    abstract = results_values.abstract_summary(str_rows)
    assert "(+1.00 dB)" in abstract  # DDIM 25.0 vs best baseline L1 24.0
    make_fake_results(tmp_path / "r2", with_ancestral=False)
    res = results_values.load_results(str(tmp_path / "r2"))
    assert "not run" in results_values.ddim_vs_ancestral(res.recon_rows)


def test_parse_source_blocks():
    blocks = build_paper.parse_source(
        "# Title\n\nby\n\n## A\n\npara one\nline two\n\n- b1\n  cont\n- b2\n\n::: table recon\n:::\n"
        "::: figure recon_figure\ncap {{x}}\n:::\n"
    )
    kinds = [k for k, _ in blocks]
    assert kinds == ["title", "para", "h2", "para", "bullets", "table", "figure"]
    assert blocks[3][1] == "para one line two"
    assert blocks[4][1] == ["b1 cont", "b2"]
    assert blocks[6][1] == ("recon_figure", "cap {{x}}")
    with pytest.raises(build_paper.PaperError):
        build_paper.parse_source("::: figure recon_figure\nno end\n")
