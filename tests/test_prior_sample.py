"""scripts/prior_sample.py on a tiny randomly initialized model saved with its config.json."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from tiny import load_module, write_checkpoint

prior_sample = load_module("scripts/prior_sample.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    return write_checkpoint(str(log_dir), {"lr": 1e-4, "augment": "none"}, name="ema_0.9999_000010.pt")


def run(tiny_model, out, *extra):
    argv = ["--model_path", tiny_model, "--output_dir", str(out), "--timestep_respacing", "ddim4"]
    return prior_sample.main(argv + ["--progress", "False", *extra])


def test_writes_samples_grid_and_info(tiny_model, tmp_path, capsys):
    assert run(tiny_model, tmp_path / "a", "--num_samples", "5", "--batch_size", "2") == 0
    assert "5 samples 16x16" in capsys.readouterr().out
    with np.load(tmp_path / "a" / "samples.npz") as f:
        arr, mag = f["arr_0"], f["magnitude"]
    assert arr.shape == (5, 16, 16, 2) and arr.dtype == np.float32 and mag.shape == (5, 16, 16)
    np.testing.assert_allclose(mag, np.hypot(arr[..., 0], arr[..., 1]), rtol=1e-5)
    assert np.isfinite(arr).all() and np.abs(arr).max() <= 1 + 1e-6  # clip_denoised keeps x0 in [-1, 1]
    grid = np.asarray(Image.open(tmp_path / "a" / "samples.png"))
    assert grid.shape == (2 * 18 - 2, 3 * 18 - 2) and grid.dtype == np.uint8  # 3 columns, 2 rows, gaps
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["shape"] == [16, 16] and info["num_network_evaluations_per_sample"] == 4
    assert not [p for p in os.listdir(tmp_path / "a") if p.endswith(".tmp")]

    # same seed: same samples, whatever the batch size (DDIM with eta 0 draws nothing but the start noise)
    assert run(tiny_model, tmp_path / "b", "--num_samples", "5", "--batch_size", "5") == 0
    with np.load(tmp_path / "b" / "samples.npz") as f:
        np.testing.assert_allclose(f["arr_0"], arr, atol=1e-5)
    assert run(tiny_model, tmp_path / "c", "--num_samples", "2", "--seed", "1", "--use_ddim", "False") == 0
    with np.load(tmp_path / "c" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 2) and not np.allclose(f["arr_0"], arr[:2])
    assert run(tiny_model, tmp_path / "d", "--num_samples", "1", "--sample_size", "8,12", "--eta", "1") == 0
    with np.load(tmp_path / "d" / "samples.npz") as f:
        assert f["arr_0"].shape == (1, 8, 12, 2)


def test_bad_inputs_are_one_error_line(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    (bad / "config.json").write_text(
        json.dumps(json.load(open(os.path.join(os.path.dirname(tiny_model), "config.json"))))
    )
    no_config = tmp_path / "lonely.pt"
    no_config.write_bytes(b"x")
    cases = [
        (["--model_path", str(tmp_path / "missing.pt")], "no such file"),
        (["--model_path", str(bad / "model.pt")], "cannot load the checkpoint"),
        (["--model_path", str(no_config)], "no config.json"),
        (["--model_path", tiny_model, "--num_channels", "64"], "conflicts with the checkpoint's config"),
        (["--model_path", tiny_model, "--sample_size", "9"], "multiples of 2"),
        (["--model_path", tiny_model, "--num_samples", "0"], "must be >= 1"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()
        common = [
            "--output_dir",
            str(tmp_path / "out"),
            "--progress",
            "False",
            "--timestep_respacing",
            "ddim4",
        ]
        assert prior_sample.main(argv + common) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
