"""Tests for datasets/make_demo_data.py on a tiny build: layout, keys, shapes, determinism, loadability."""

import importlib.util
import os
import sys

import h5py
import numpy as np
import pytest

from improved_diffusion.fastmri_data import check_file, load_data

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "datasets", "make_demo_data.py")
spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
demo = importlib.util.module_from_spec(spec)
sys.modules["make_demo_data"] = demo
spec.loader.exec_module(demo)

TINY = dict(size=32, slices_per_volume=2, train_volumes=2, val_volumes=1, coils=4)
FAST_ESPIRIT = dict(max_calib=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = demo.build(str(out), **TINY, espirit_kwargs=FAST_ESPIRIT, log=lambda *_: None)
    return out, manifest


def test_layout_keeps_validation_apart():
    vol = demo.load_template()
    first, last = demo.brain_slices(vol)
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
