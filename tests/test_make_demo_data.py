"""Tests for datasets/make_demo_data.py on a tiny build: layout, keys, shapes, determinism, loadability."""

import os

import h5py
import numpy as np
import pytest
from tiny import load_module

from improved_diffusion.fastmri_data import check_file, load_data

demo = load_module("datasets/make_demo_data.py")
import mni152  # noqa: E402  (beside the script, on sys.path since it ran)
import synth_contrasts as sc  # noqa: E402

TINY = dict(size=32, slices_per_volume=2, train_volumes=2, val_volumes=1, coils=4)
FAST_ESPIRIT = dict(max_calib=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = demo.build(str(out), **TINY, espirit_kwargs=FAST_ESPIRIT, log=lambda *_: None)
    return out, manifest


def test_layout_keeps_validation_apart():
    vol = mni152.load_template()
    first, last = mni152.brain_slices(vol)
    assert vol.shape == (189, 233, 197) and 15 < first < last < 160
    layout = demo.volume_layout(first, last, 6, 2, 10)
    assert len(layout["train"]) == 6 and len(layout["val"]) == 2
    train = {z for v in layout["train"] for z in v}
    for v in layout["val"]:
        assert len(v) == 10 and min(abs(z - t) for z in v for t in train) >= 4  # a gap of >= 3 slices
        assert min(v) > min(train) and max(v) < max(train)  # validation inside the brain, not at its ends
    with pytest.raises(ValueError, match="does not fit"):
        demo.volume_layout(first, last, 6, 2, 40)


def test_tiny_build_keys_shapes_and_attrs(tiny):
    out, manifest = tiny
    for kind, target in (("singlecoil", "reconstruction_esc"), ("multicoil", "reconstruction_rss")):
        for split, count in (("train", 2), ("val", 1)):
            files = sorted(os.listdir(out / f"{kind}_{split}"))
            assert len(files) == count and all(f.endswith(".h5") for f in files)
            for name in files:
                with h5py.File(out / f"{kind}_{split}" / name) as f:
                    k = f["kspace"]
                    assert k.dtype == np.complex64
                    assert k.shape == ((2, 32, 32) if kind == "singlecoil" else (2, 4, 32, 32))
                    assert f[target].shape == (2, 32, 32) and f[target].dtype == np.float32
                    assert np.isclose(f.attrs["max"], f[target][()].max())
                    assert f.attrs["acquisition"] == "AXT1" and f.attrs["patient_id"].startswith("mni152_")
                    if kind == "multicoil":
                        maps = f["sens_maps"][()]
                        assert (
                            maps.shape == k.shape and maps.dtype == np.complex64 and np.isfinite(maps).all()
                        )
                    else:
                        assert "sens_maps" not in f
                check_file(str(out / f"{kind}_{split}" / name))
    assert len(manifest["files"]) == 6 and (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_tiny_build_is_deterministic(tiny, tmp_path):
    out, _ = tiny
    demo.build(str(tmp_path), **TINY, kinds=("multicoil",), espirit_kwargs=FAST_ESPIRIT, log=lambda *_: None)
    for name in ("multicoil_train/demo_multicoil_train_001.h5", "multicoil_val/demo_multicoil_val_000.h5"):
        with h5py.File(out / name) as a, h5py.File(tmp_path / name) as b:
            np.testing.assert_array_equal(a["kspace"][()], b["kspace"][()])
            np.testing.assert_array_equal(a["sens_maps"][()], b["sens_maps"][()])


def test_demo_folders_feed_the_loader(tiny):
    out, _ = tiny
    for kind in ("singlecoil", "multicoil"):
        x, kw = next(load_data(data_dir=str(out / f"{kind}_train"), batch_size=4, shard=0, num_shards=1))
        assert x.shape == (4, 2, 32, 32) and 0.2 < float(x.abs().max()) < 2
    ratios = demo.scale_statistics(str(out))
    assert set(ratios) == {"singlecoil", "multicoil"} and all(len(r) == 6 for r in ratios.values())


def test_fastmri_slicedataset_reads_the_demo_files(tiny):
    mri_data = pytest.importorskip("fastmri.data.mri_data")
    out, _ = tiny
    ds = mri_data.SliceDataset(out / "multicoil_val", challenge="multicoil")
    kspace, mask, target, attrs, fname, slice_num = ds[1]
    assert kspace.shape == (4, 32, 32) and target.shape == (32, 32) and slice_num == 1
    assert attrs["padding_left"] == 0 and attrs["padding_right"] == 32


def test_cli_tiny_singlecoil(tmp_path, capsys):
    assert demo.main(["--tiny", "--kinds", "singlecoil", "--output_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "built" in text and "singlecoil: max|x|/scale over 6 slices" in text
    assert demo.main(["--kinds", "knee", "--output_dir", str(tmp_path)]) == 2


def test_synthesized_contrasts_lie_in_their_documented_ranges():
    maps = mni152.load_tissue_maps()
    assert maps.shape == (3, 189, 233, 197) and maps.min() >= 0 and maps.sum(axis=0).max() <= 1 + 1e-6
    gm, wm, csf = (maps[i] > 0.95 for i in range(3))
    rng = np.random.default_rng(0)
    for contrast, ranges in sc.CONTRAST_RANGES.items():
        for _ in range(3):
            levels = sc.draw_intensities(rng, contrast)
            image = sc.synthesize(maps[:, 80:100], levels)
            assert 0 <= image.min() and image.max() <= 1
            for tissue, pure in (("gm", gm), ("wm", wm), ("csf", csf)):
                lo, hi = ranges[tissue]
                values = image[pure[80:100]]
                # >= 95% of the tissue, the rest (<= 5%) at most 1
                assert lo * 0.95 - 1e-6 <= values.min() and values.max() <= hi + 0.05 + 1e-6, (
                    contrast,
                    tissue,
                )
    order = {c: sorted(sc.TISSUES, key=lambda t: -r[t][0]) for c, r in sc.CONTRAST_RANGES.items()}
    assert order == {
        "t1": ["wm", "gm", "csf"],
        "t2": ["csf", "gm", "wm"],
        "pd": ["csf", "gm", "wm"],
        "flair": ["gm", "wm", "csf"],
    }
    for r in sc.CONTRAST_RANGES.values():  # the ranges do not overlap, so the order always holds
        lows = sorted(r.values())
        assert lows[0][1] < lows[1][0] and lows[1][1] < lows[2][0]


def test_sections_avoid_the_validation_slices():
    maps = mni152.load_tissue_maps()
    first, last = mni152.brain_slices(mni152.load_template())
    layout = demo.volume_layout(first, last, 6, 2, 10)
    held = sc.heldout_slices(layout, maps.shape[1])
    val = [z for zs in layout["val"] for z in zs]
    assert all(held[z] for z in val) and not any(held[z] for zs in layout["train"] for z in zs)
    rng = np.random.default_rng(1)
    axial = sc.synth_sections(maps, "axial", held, first, last, 5, rng)
    assert all(min(abs(z - v) for v in val) >= sc.HOLDOUT_GAP for z, _, _ in axial)
    for orientation in ("coronal", "sagittal"):
        for _pos, slab, sec in sc.synth_sections(maps, orientation, held, first, last, 3, rng):
            assert sec.shape[1] == 189 and slab in [tuple(s) for s in sc.slabs(held)]
            rows = sec.sum(axis=(0, 2))[::-1]  # per axial slice z (rows run superior first)
            assert rows[held].max() == 0 and rows.max() > 0
            whole = sc.synth_sections(maps, orientation, held, first, last, 1, rng, holdout="none")[0]
            assert whole[1] is None and whole[2].sum(axis=(0, 2))[::-1][held].max() > 0


def test_tiny_build_with_contrasts(tmp_path):
    kw = dict(TINY, kinds=("singlecoil",), log=lambda *_: None)
    manifest = demo.build(str(tmp_path), **kw, contrasts=("t2", "flair"), orientations=("axial", "sagittal"))
    names = sorted(os.listdir(tmp_path / "singlecoil_synth_train"))
    assert names == [
        f"synth_singlecoil_{o}_{c}_000.h5" for o in ("axial", "sagittal") for c in ("flair", "t2")
    ]
    synth = manifest["synthetic"]
    for name in names:
        path = tmp_path / "singlecoil_synth_train" / name
        info = check_file(str(path))
        assert info.num_slices == 2 and info.shape == (32, 32)
        with h5py.File(path) as f:
            orientation, contrast = f.attrs["orientation"], f.attrs["contrast"]
            assert (
                f.attrs["acquisition"] == {"axial": "AX", "sagittal": "SAG"}[orientation] + contrast.upper()
            )
            levels = f.attrs["intensities"]
            for j, tissue in enumerate(sc.TISSUES):
                lo, hi = sc.CONTRAST_RANGES[contrast][tissue]
                assert np.all((lo <= levels[:, j]) & (levels[:, j] <= hi))
        entry = synth["files"][f"singlecoil_synth_train/{name}"]
        if orientation == "axial":
            assert not set(entry["positions"]) & set(synth["heldout_slices"])
        else:
            z0, z1 = entry["slab"]
            assert not set(range(z0, z1)) & set(synth["heldout_slices"])
    x, _ = next(
        load_data(data_dir=str(tmp_path / "singlecoil_synth_train"), batch_size=4, shard=0, num_shards=1)
    )
    assert x.shape == (4, 2, 32, 32) and torch_finite(x)
    # without contrasts: no synthetic folder, no manifest entry (the default output is unchanged)
    plain = demo.build(str(tmp_path / "plain"), **kw)
    assert "synthetic" not in plain and not (tmp_path / "plain" / "singlecoil_synth_train").exists()
    with pytest.raises(ValueError, match="contrasts must be among"):
        demo.build(str(tmp_path / "bad"), **kw, contrasts=("t3",))
    assert demo.main(["--tiny", "--kinds", "singlecoil", "--contrasts", "pd", "--orientations", "coronal",
                      "--synth_holdout", "none", "--output_dir", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert os.listdir(tmp_path / "cli" / "singlecoil_synth_train") == ["synth_singlecoil_coronal_pd_000.h5"]


def torch_finite(x):
    return bool(np.isfinite(x.numpy()).all())
