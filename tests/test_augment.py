"""improved_diffusion.augment: seeded complex-consistent augmentations, random patches, training flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import REPO, TINY_FLAGS, random_volume, script_env

from improved_diffusion import augment as A
from improved_diffusion.fastmri_data import FastMRISliceDataset, index_data, load_data
from improved_diffusion.mri.fftc import channels_to_complex, complex_to_channels

ALL = A.AugmentConfig(probabilities=tuple((n, 1.0) for n in A.AUGMENTATIONS))


def _image(h=24, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(h, w, generator=g), torch.randn(h, w, generator=g))


def test_parse_augment():
    assert A.parse_augment("none") == () and A.parse_augment("") == ()
    assert A.parse_augment("rot90:0.25,flip") == (("flip", 0.5), ("rot90", 0.25))
    everything = dict(A.parse_augment("all,noise:0"))
    assert set(everything) == set(A.AUGMENTATIONS) and everything["noise"] == 0 and everything["phase"] == 1
    with pytest.raises(ValueError, match="unknown augmentation 'twist'"):
        A.parse_augment("flip,twist")
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        A.parse_augment("flip:2")
    with pytest.raises(ValueError, match="name:probability"):
        A.parse_augment("flip:often")
    with pytest.raises(ValueError, match="elastic_grid"):
        A.AugmentConfig(elastic_grid=1)
    assert not A.AugmentConfig().enabled and A.AugmentConfig(patch_size=8).enabled


def test_deterministic_under_the_key_and_independent_per_augmentation():
    x = _image()
    key = A.sample_key(ALL, 0, 3, "dir/file_001.h5", 7)
    assert key == A.sample_key(ALL, 0, 3, "other/file_001.h5", 7)  # only the base name counts
    a, b = A.augment_image(x, ALL, key), A.augment_image(x, ALL, key)
    assert torch.equal(a, b)
    for other in (A.sample_key(ALL, 0, 4, "file_001.h5", 7), A.sample_key(ALL, 1, 3, "file_001.h5", 7)):
        assert not torch.allclose(A.augment_image(x, ALL, other), a)
    # switching noise off leaves every other draw as it was
    quiet = A.AugmentConfig(probabilities=tuple((n, 1.0) for n in A.AUGMENTATIONS if n != "noise"))
    r_all, r_quiet = A.AugmentRecord(), A.AugmentRecord()
    A.augment_image(x, ALL, key, r_all)
    A.augment_image(x, quiet, key, r_quiet)
    assert {k: v for k, v in r_all.applied.items() if k != "noise"} == r_quiet.applied
    # the global generators are not touched
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    A.augment_image(x, ALL, key)
    assert torch.equal(state, torch.get_rng_state()) and np.array_equal(np_state, np.random.get_state()[1])


def test_complex_and_channel_forms_agree_and_keep_shapes():
    x = _image(16, 20)
    cfg = A.AugmentConfig(probabilities=tuple((n, 1.0) for n in A.AUGMENTATIONS))
    for key in [(0, 0, 0, 1, s) for s in range(4)]:
        y = A.augment_image(x, cfg, key)
        assert y.is_complex() and y.shape == x.shape  # non-square: rot90 only by 180 degrees
        y2 = A.augment_image(complex_to_channels(x), cfg, key)
        assert y2.shape == (2, 16, 20) and torch.allclose(channels_to_complex(y2), y, atol=1e-6)


def test_flips_and_rot90_are_exact():
    x = _image(12, 12)
    assert torch.equal(A.flip(x, True, False), torch.flip(x, [0]))
    assert torch.equal(A.flip(complex_to_channels(x), False, True), complex_to_channels(torch.flip(x, [1])))
    for k in range(4):
        assert torch.equal(A.rot90(x, k), torch.rot90(x, k))
    cfg = A.AugmentConfig(probabilities=(("flip", 1.0), ("rot90", 1.0)))
    for s in range(6):
        r = A.AugmentRecord()
        y = A.augment_image(x, cfg, (0, 0, 0, 0, s), r)
        rows, cols = r.applied["flip"]
        expect = torch.rot90(A.flip(x, rows, cols), r.applied["rot90"])
        assert torch.equal(y, expect)


def test_rotation_by_90_matches_rot90_and_identity_warp():
    x = _image(9, 9)
    y = A.warp(x, A.affine_displacement((9, 9), 90.0))
    assert torch.allclose(y, torch.rot90(x, 1), atol=1e-5)  # counter-clockwise, as torch.rot90
    assert torch.allclose(A.warp(x, torch.zeros(2, 9, 9)), x, atol=1e-5)
    # zoom 2 about the centre: the centre pixel stays, the pixel one step out comes from half a step out
    assert torch.allclose(A.warp(x, A.affine_displacement((9, 9), 0.0, 2.0))[4, 4], x[4, 4], atol=1e-5)


def test_pure_phase_keeps_magnitude_and_bias_keeps_phase():
    x = _image()
    cfg = A.AugmentConfig(probabilities=(("phase", 1.0),), phase=3.0)
    y = A.augment_image(x, cfg, (1, 2, 3, 4, 5))
    assert torch.allclose(y.abs(), x.abs(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, x)
    rng = np.random.default_rng(0)
    phi = A.smooth_phase(rng, (24, 24), 1.0)
    assert torch.allclose(A.apply_phase(x, phi), x * torch.exp(1j * phi), atol=1e-5)
    b = A.bias_field(np.random.default_rng(1), (24, 24), 0.5)
    assert (b > 0).all()
    y = A.apply_bias(x, b)
    assert torch.allclose(torch.angle(y), torch.angle(x), atol=1e-5)


def test_gain_is_a_real_factor_in_its_range():
    x = _image()
    cfg = A.AugmentConfig(probabilities=(("gain", 1.0),), gain=0.5)
    for s in range(20):
        record = A.AugmentRecord()
        y = A.augment_image(x, cfg, (0, 0, 0, 0, s), record)
        g = record.applied["gain"]
        assert 1 / 1.5 <= g <= 1.5
        torch.testing.assert_close(y, x * g)


def test_noise_level_and_patches():
    x = torch.zeros(64, 64, dtype=torch.complex64)
    y = A.add_noise(x, 0.1, np.random.default_rng(0))
    assert abs(float(y.abs().pow(2).mean().sqrt()) - 0.1) < 0.005  # E|n|^2 = std^2
    cfg = A.AugmentConfig(probabilities=A.parse_augment("all"), patch_size=16)
    shapes = {tuple(A.augment_image(_image(40, 32), cfg, (0, 0, 0, 0, s)).shape) for s in range(5)}
    assert shapes == {(16, 16)}
    x = torch.arange(100.0).reshape(10, 10)
    p = A.random_patch(x, 4, np.random.default_rng(3))
    top, left = int(p[0, 0]) // 10, int(p[0, 0]) % 10
    assert torch.equal(p, x[top : top + 4, left : left + 4])
    with pytest.raises(ValueError, match="does not fit"):
        A.random_patch(x, 11, np.random.default_rng(0))


def test_loader_patches_and_determinism_over_workers(tmp_path):
    random_volume(tmp_path / "a.h5", slices=3, size=16)
    random_volume(tmp_path / "b.h5", slices=3, size=20, seed=1)  # mixed sizes batch fine as patches
    cfg = A.AugmentConfig(probabilities=A.parse_augment("all"), patch_size=8, seed=5)
    # a fixed order: the shuffled order of later passes depends on persistent workers (torch draws one
    # seed from the generator per pass without them), the augmentation of (pass, slice) does not
    kw = dict(data_dir=str(tmp_path), batch_size=2, shard=0, num_shards=1, augment=cfg, deterministic=True)
    runs = []
    for workers in (0, 2):
        it = load_data(num_workers=workers, **kw)
        runs.append([next(it) for _ in range(5)])  # more than one pass over the 6 slices
    for (x0, k0), (x1, k1) in zip(*runs):
        assert x0.shape == (2, 2, 8, 8) and torch.equal(x0, x1) and k0["fname"] == k1["fname"]
    # the second pass over a slice draws new augmentations
    files = index_data(data_dir=str(tmp_path), shard=0, num_shards=1, patch_size=8)
    ds = FastMRISliceDataset(files, augment=cfg)
    assert torch.equal(ds[2][0], ds[(0, 2)][0])
    assert not torch.equal(ds[(0, 2)][0], ds[(1, 2)][0])
    with pytest.raises(ValueError, match="patch_size 17 does not fit"):
        index_data(data_dir=str(tmp_path), shard=0, num_shards=1, patch_size=17)
    # nothing on: the images are those of the plain loader
    plain = FastMRISliceDataset(files)
    off = FastMRISliceDataset(files, augment=A.AugmentConfig())
    assert torch.equal(plain[4][0], off[(3, 4)][0])


def test_image_train_records_the_flags_in_config_json(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    random_volume(data / "a.h5", slices=4, size=16)
    log_dir = tmp_path / "log"
    env = script_env()
    base = [
        sys.executable,
        os.path.join(REPO, "scripts", "image_train.py"),
        f"--data_dir={data}",
        f"--log_dir={log_dir}",
        *TINY_FLAGS,
        "--batch_size=2",
        "--max_steps=1",
    ]
    flags = ["--augment=flip,phase:0.7", "--patch_size=8", "--augment_seed=3", "--augment_noise=0.05"]
    out = subprocess.run(base + flags, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    config = json.loads((log_dir / "config.json").read_text())
    assert config["augment"] == "flip,phase:0.7" and config["patch_size"] == 8
    assert config["augment_seed"] == 3 and config["augment_noise"] == 0.05
    assert A.config_from_flags(config) == A.AugmentConfig(
        probabilities=(("flip", 0.5), ("phase", 0.7)), noise=0.05, patch_size=8, seed=3
    )
    assert "augmentation: flip p=0.5, phase p=0.7; 8x8 patches; seed 3" in (log_dir / "log.txt").read_text()
    # bad flags: one error line before anything is built
    bad_flags = (("--augment=twist", "unknown augmentation 'twist'"), ("--patch_size=7", "multiple of 2"))
    for bad, line in bad_flags:
        out = subprocess.run(base + [bad], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and line in out.stderr and "Traceback" not in out.stderr
    help_text = subprocess.run(base[:2] + ["--help"], env=env, capture_output=True, text=True).stdout
    assert "random square patches" in help_text


def test_defaults_keep_the_demo_config_valid():
    stage1 = json.loads(open(os.path.join(REPO, "checkpoints", "demo", "config_stage1.json")).read())
    assert not A.config_from_flags(stage1).enabled  # a config without the keys means no augmentation
    demo = json.loads(open(os.path.join(REPO, "checkpoints", "demo", "config.json")).read())
    assert dict(A.config_from_flags(demo).probabilities)["gain"] == 1.0  # the fine-tune's augmentations
    assert not A.config_from_flags(A.augment_defaults()).enabled
