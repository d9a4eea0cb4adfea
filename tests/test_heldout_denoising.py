"""benchmarks/heldout_denoising.py: the x̂0 PSNR of a prior on fixed noisy inputs."""

import numpy as np
import pytest
from tiny import load_module, random_volume, write_checkpoint

heldout_denoising = load_module("benchmarks/heldout_denoising.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hd")
    data = root / "data"
    data.mkdir()
    random_volume(str(data / "a.h5"), slices=2, size=16)
    random_volume(str(data / "b.h5"), slices=1, size=16, seed=1)
    model = write_checkpoint(str(root), {"augment": "none"}, name="ema_0.999_000001.pt")
    return str(model), str(data)


def test_untrained_model_scores_the_closed_form(setup):
    # A fresh UNet's last convolution is zero: ε̂ = 0, so x̂0 = x_t / sqrt(ᾱ_t) and the complex error is
    # sqrt((1 - ᾱ_t) / ᾱ_t) ε: E|err|² = 2 (1 - ᾱ_t) / ᾱ_t per pixel, the PSNR of pure noise at that level.
    model, data = setup
    psnr = heldout_denoising.denoising_psnr(model, data, [2, 10], seed=0)
    from improved_diffusion.inference import load_model

    _, diffusion, _ = load_model(model, timestep_respacing="")
    slices = heldout_denoising.slices_of(data)
    for t in (2, 10):
        abar = diffusion.alphas_cumprod[t]
        expected = np.mean(
            [
                10 * np.log10(float(slices[i][0].pow(2).sum(0).max()) / (2 * (1 - abar) / abar))
                for i in range(3)
            ]
        )
        assert abs(psnr[t] - expected) < 0.3  # 256 pixels of noise per slice
    assert psnr[2] > psnr[10]  # less noise, better x̂0


def test_same_noise_for_every_run(setup):
    model, data = setup
    a = heldout_denoising.denoising_psnr(model, data, [5], seed=3)
    b = heldout_denoising.denoising_psnr(model, data, [5], seed=3)
    assert a == b


def test_cli_writes_csv_and_refuses_bad_steps(setup, tmp_path, capsys):
    model, data = setup
    out = tmp_path / "d.csv"
    argv = ["--model_paths", model, "--data_dir", data, "--timesteps", "1,4", "--output_csv", str(out)]
    assert heldout_denoising.main(argv + ["--labels", "tiny"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("label,model_path,data_dir,mean_psnr,psnr_t1,psnr_t4") and len(lines) == 2
    assert heldout_denoising.main(["--model_paths", model, "--data_dir", data, "--timesteps", "40"]) == 2
    assert "outside its 20 diffusion steps" in capsys.readouterr().err
