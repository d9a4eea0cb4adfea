"""Tests for the fastMRI slice loader: shapes, scale, sharding, ordering and every bad-file case."""

import os
import warnings

import h5py
import numpy as np
import pytest
import torch

from improved_diffusion.fastmri_data import (
    BadFileError,
    FastMRISliceDataset,
    check_file,
    index_data,
    load_data,
    slice_problem,
)
from improved_diffusion.mri.fftc import center_crop, channels_to_complex, fft2c, ifft2c
from improved_diffusion.transforms import slice_to_image


def _phantom(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth complex blob with a phase ramp: (h, w) complex64."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    mag = np.exp(-((xx / 0.6) ** 2 + (yy / 0.5) ** 2) * 2) * (1 + 0.2 * rng.standard_normal((h, w)))
    return (mag * np.exp(1j * (rng.uniform(-3, 3) + xx + 0.5 * yy))).astype(np.complex64)


def _maps(coils: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    maps = np.stack([np.exp(1j * (c * xx + yy)) * (1.5 + np.cos(c + xx)) for c in range(coils)])
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64)


def write_file(path, slices=4, h=24, w=20, coils=0, maps=True, seed=0, **extra):
    """A small fastMRI-style file; coils=0 -> single-coil, else multi-coil (+ sens_maps if maps)."""
    rng = np.random.default_rng(seed)
    imgs = torch.from_numpy(np.stack([_phantom(rng, h, w) for _ in range(slices)]))
    with h5py.File(path, "w") as f:
        if coils:
            s = torch.from_numpy(_maps(coils, h, w))
            f["kspace"] = fft2c(s[None] * imgs[:, None]).numpy()
            if maps:
                f["sens_maps"] = np.broadcast_to(s.numpy(), (slices, coils, h, w)).copy()
        else:
            f["kspace"] = fft2c(imgs).numpy()
        for k, v in extra.items():
            f[k] = v
    return path


def _take(gen, n):
    return [next(gen) for _ in range(n)]


def test_single_coil_shapes_and_round_trip(tmp_path):
    path = write_file(tmp_path / "a.h5", slices=3, h=24, w=20)
    gen = load_data(data_dir=str(tmp_path), batch_size=1, deterministic=True, shard=0, num_shards=1)
    with h5py.File(path) as f:
        kspace = torch.from_numpy(f["kspace"][()])
    for s in range(3):
        x, kw = next(gen)
        assert x.shape == (1, 2, 24, 20) and x.dtype == torch.float32
        assert kw["scale"].dtype == torch.float32 and kw["slice_idx"].dtype == torch.int64
        assert kw["fname"] == ["a.h5"] and kw["slice_idx"].tolist() == [s]
        image = channels_to_complex(x[0]) * kw["scale"][0]
        torch.testing.assert_close(image, ifft2c(kspace[s]), rtol=1e-5, atol=1e-5)
        # Normalized magnitudes of order 1.
        assert 0.2 < x.abs().max() < 2.0


def test_multi_coil_image_is_coil_combination_and_crop(tmp_path):
    path = write_file(tmp_path / "m.h5", slices=2, h=24, w=20, coils=3)
    gen = load_data(
        data_dir=str(tmp_path), batch_size=2, crop_size=16, deterministic=True, shard=0, num_shards=1
    )
    x, kw = next(gen)
    assert x.shape == (2, 2, 16, 16)
    with h5py.File(path) as f:
        k, s = torch.from_numpy(f["kspace"][1]), torch.from_numpy(f["sens_maps"][1])
    expected = center_crop((s.conj() * ifft2c(k)).sum(0), (16, 16))
    torch.testing.assert_close(channels_to_complex(x[1]) * kw["scale"][1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slice_to_image(k, s), (s.conj() * ifft2c(k)).sum(0))


def test_sharding_is_disjoint_and_complete(tmp_path):
    for i in range(5):
        write_file(tmp_path / f"f{i}.h5", slices=2, seed=i)
    seen = []
    for shard in range(3):
        gen = load_data(data_dir=str(tmp_path), batch_size=1, deterministic=True, shard=shard, num_shards=3)
        n = {0: 4, 1: 4, 2: 2}[shard]  # files[shard::3] -> 2, 2, 1 files of 2 slices
        seen.append({(kw["fname"][0], int(kw["slice_idx"][0])) for _, kw in _take(gen, n)})
    assert sum(len(s) for s in seen) == 10 and len(set.union(*seen)) == 10
    assert {f for f, _ in seen[0]} == {"f0.h5", "f3.h5"}


def test_comma_separated_data_dirs(tmp_path):
    """Several folders in one data_dir (e.g. the two training splits) and nothing else from beside them."""
    for split in ("sc_train", "mc_train", "sc_val"):
        (tmp_path / split).mkdir()
        write_file(tmp_path / split / f"{split}.h5", slices=1, coils=2 if split.startswith("mc") else 0)
    dirs = f"{tmp_path / 'sc_train'},{tmp_path / 'mc_train'}"
    gen = load_data(data_dir=dirs, batch_size=1, deterministic=True)
    assert sorted(kw["fname"][0] for _, kw in _take(gen, 2)) == ["mc_train.h5", "sc_train.h5"]
    with pytest.raises(ValueError, match="missing"):
        next(load_data(data_dir=f"{tmp_path / 'sc_train'},{tmp_path / 'missing'}", batch_size=1))


def test_default_shard_is_single_process(tmp_path):
    write_file(tmp_path / "a.h5", slices=2)
    x, _ = next(load_data(data_dir=str(tmp_path), batch_size=2))
    assert x.shape[0] == 2


def test_order_deterministic_and_seeded_shuffle(tmp_path):
    write_file(tmp_path / "a.h5", slices=6)

    def order(**kw):
        gen = load_data(data_dir=str(tmp_path), batch_size=1, shard=0, num_shards=1, **kw)
        return [int(k["slice_idx"][0]) for _, k in _take(gen, 12)]

    assert order(deterministic=True) == list(range(6)) * 2
    assert order(seed=5) == order(seed=5)
    assert order(seed=5) != order(seed=6)
    assert sorted(order(seed=5)[:6]) == list(range(6))


def test_skip_edge_slices_and_workers(tmp_path):
    write_file(tmp_path / "a.h5", slices=5)
    kw = dict(batch_size=1, deterministic=True, skip_edge_slices=1, num_workers=1, shard=0, num_shards=1)
    gen = load_data(data_dir=str(tmp_path), **kw)
    assert [int(k["slice_idx"][0]) for _, k in _take(gen, 4)] == [1, 2, 3, 1]


def test_mixed_sizes_need_crop_for_batches(tmp_path):
    write_file(tmp_path / "a.h5", h=24, w=20)
    write_file(tmp_path / "b.h5", h=20, w=22)
    with pytest.raises(ValueError, match="crop_size"):
        load_data(data_dir=str(tmp_path), batch_size=2, shard=0, num_shards=1).__next__()
    x, _ = next(load_data(data_dir=str(tmp_path), batch_size=2, crop_size=(16, 18), shard=0, num_shards=1))
    assert x.shape == (2, 2, 16, 18)
    x, _ = next(load_data(data_dir=str(tmp_path), batch_size=1, shard=0, num_shards=1))
    assert x.shape[0] == 1


def _bad_files(d):
    """Each bad case: (file name, expected message fragment)."""
    good = write_file(d / "good.h5")
    (d / "corrupt.h5").write_bytes(b"this is not hdf5" * 64)
    data = good.read_bytes()
    (d / "truncated.h5").write_bytes(data[: len(data) // 2])
    with h5py.File(d / "nokey.h5", "w") as f:
        f["reconstruction_esc"] = np.zeros((2, 8, 8), np.float32)
    with h5py.File(d / "dims.h5", "w") as f:
        f["kspace"] = np.zeros((8, 8), np.complex64)
    with h5py.File(d / "real.h5", "w") as f:
        f["kspace"] = np.zeros((2, 8, 8), np.float32)
    write_file(d / "mapshape.h5", coils=2, maps=False, sens_maps=np.zeros((4, 3, 24, 20), np.complex64))
    write_file(d / "nomaps.h5", coils=2, maps=False)
    write_file(d / "undersampled.h5", mask=np.array([1, 0, 1, 1], np.float32))
    return {
        "corrupt.h5": "not a readable HDF5",
        "truncated.h5": "not a readable HDF5",
        "nokey.h5": "missing key 'kspace'",
        "dims.h5": "must be (slices, H, W)",
        "real.h5": "must be a complex dataset",
        "mapshape.h5": "does not match",
        "nomaps.h5": "prepare_fastmri",
        "undersampled.h5": "undersampled",
    }


def test_every_bad_file_gives_one_clear_line(tmp_path):
    cases = _bad_files(tmp_path)
    for name, fragment in cases.items():
        with pytest.raises(BadFileError) as info:
            check_file(str(tmp_path / name))
        msg = str(info.value)
        assert msg.startswith(str(tmp_path / name) + ":") and fragment in msg and "\n" not in msg, msg
    assert check_file(str(tmp_path / "good.h5")).num_slices == 4
    # Error mode: the index pass checks every file, then lists each bad one on its own line (sorted).
    with pytest.raises(BadFileError) as info:
        index_data(data_dir=str(tmp_path), shard=0, num_shards=1)
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / n) for n in sorted(cases)]
    with pytest.raises(BadFileError, match="corrupt.h5"):
        next(load_data(data_dir=str(tmp_path), batch_size=1, shard=0, num_shards=1))


def test_skip_mode_skips_and_reports(tmp_path):
    cases = _bad_files(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = load_data(data_dir=str(tmp_path), batch_size=1, on_bad_file="skip", shard=0, num_shards=1)
        names = {kw["fname"][0] for _, kw in _take(gen, 8)}
    assert names == {"good.h5"}
    text = "\n".join(str(w.message) for w in caught)
    assert all(name in text for name in cases) and f"skipped {len(cases)} of {len(cases) + 1}" in text


def test_skip_mode_report_callback(tmp_path):
    cases = _bad_files(tmp_path)
    lines = []
    infos = index_data(data_dir=str(tmp_path), on_bad_file="skip", shard=0, num_shards=1, report=lines.append)
    assert [i.path for i in infos] == [str(tmp_path / "good.h5")]
    assert len(lines) == len(cases) + 1 and all(line.startswith("skipping bad file ") for line in lines[:-1])
    assert lines[-1] == f"skipped {len(cases)} of {len(cases) + 1} files as bad (on_bad_file='skip')"


def _bad_values(d):
    """Files whose keys and shapes are fine but whose values are not: (name, bad slice, message fragment)."""
    cases = []
    for name, slice_idx, fragment, coils in (
        ("nan_kspace.h5", 2, "'kspace' holds 3 NaN or inf values", 0),
        ("inf_maps.h5", 1, "'sens_maps' holds 1 NaN or inf values", 2),
        ("zero_kspace.h5", 3, "'kspace' is all zero", 0),
    ):
        path = write_file(d / name, coils=coils)
        with h5py.File(path, "r+") as f:
            if name == "nan_kspace.h5":
                f["kspace"][slice_idx, 0, :3] = np.nan
            elif name == "inf_maps.h5":
                f["sens_maps"][slice_idx, 1, 4, 4] = np.inf + 0j
            else:
                f["kspace"][slice_idx] = 0
        cases.append((name, slice_idx, fragment))
    return cases


def test_slice_problem():
    k = torch.ones(2, 4, 4, dtype=torch.complex64)
    maps = k / 2**0.5  # normalized: sum_c |S_c|^2 = 1
    assert slice_problem(k) is None and slice_problem(k, maps) is None
    assert slice_problem(k, k).startswith("'sens_maps' are not normalized: sum_c |S_c|^2 is 2 to 2")
    assert slice_problem(k, 0 * k) == "'sens_maps' is all zero"
    assert slice_problem(torch.zeros(4, 4, dtype=torch.complex64)) == "'kspace' is all zero"
    bad = k.clone()
    bad[0, 0, 0] = complex(0, float("nan"))
    bad[1, 2, 2] = complex(float("inf"), 0)
    assert slice_problem(bad) == "'kspace' holds 2 NaN or inf values"
    assert slice_problem(k, bad) == "'sens_maps' holds 2 NaN or inf values"


def test_bad_values_are_found_when_the_slice_is_read(tmp_path):
    cases = _bad_values(tmp_path)
    infos = index_data(data_dir=str(tmp_path), shard=0, num_shards=1)  # metadata only: all pass
    assert len(infos) == 3
    dataset = FastMRISliceDataset(infos)
    for name, slice_idx, fragment in cases:
        index = dataset.items.index((str(tmp_path / name), slice_idx, name == "inf_maps.h5"))
        with pytest.raises(BadFileError) as info:
            dataset[index]
        assert str(info.value) == f"{tmp_path / name}: slice {slice_idx}: {fragment}"
        dataset[index - 1]  # the file's other slices are fine


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_values_error_mode_stops_with_one_line(tmp_path, num_workers):
    write_file(tmp_path / "nan.h5", slices=2)
    with h5py.File(tmp_path / "nan.h5", "r+") as f:
        f["kspace"][1, 5, 5] = np.nan
    gen = load_data(
        data_dir=str(tmp_path),
        batch_size=1,
        deterministic=True,
        num_workers=num_workers,
        shard=0,
        num_shards=1,
    )
    next(gen)
    with pytest.raises(BadFileError) as info:
        next(gen)
    # Also from a worker process: the original line, not torch's re-raised traceback.
    assert str(info.value) == f"{tmp_path / 'nan.h5'}: slice 1: 'kspace' holds 1 NaN or inf values"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_values_skip_mode_leaves_the_file_out_and_reports_once(tmp_path, num_workers):
    write_file(tmp_path / "good.h5", slices=3)
    cases = _bad_values(tmp_path)
    lines = []
    gen = load_data(
        data_dir=str(tmp_path),
        batch_size=2,
        on_bad_file="skip",
        num_workers=num_workers,
        shard=0,
        num_shards=1,
        report=lines.append,
    )
    batches, known_bad, used_after_report = [], set(), []
    for _ in range(12):  # 2 epochs and more
        x, kw = next(gen)
        used_after_report += [f for f in kw["fname"] if f in known_bad]
        known_bad |= {os.path.basename(line.split(":")[0]) for line in lines}
        batches.append((x, kw))
    assert all(x.shape[0] == 2 and torch.isfinite(x).all() for x, _ in batches)
    assert all("bad" not in kw for _, kw in batches)
    reported = [line for line in lines if line.startswith("skipping bad file")]
    assert sorted(line.split(":")[0][len("skipping bad file ") :] for line in reported) == sorted(
        str(tmp_path / name) for name, _, _ in cases
    )
    for name, slice_idx, fragment in cases:
        assert any(f"{name}: slice {slice_idx}: {fragment}" in line for line in reported), name
    if num_workers == 0:
        # Good slices of a bad file read before its bad slice was found may have been used; none after it
        # (each worker process keeps its own list of bad files).
        assert not used_after_report


def test_skip_mode_every_file_bad_at_read_time(tmp_path):
    _bad_values(tmp_path)
    for name in ("nan_kspace.h5", "inf_maps.h5", "zero_kspace.h5"):
        with h5py.File(tmp_path / name, "r+") as f:
            f["kspace"][...] = 0
    gen = load_data(
        data_dir=str(tmp_path), batch_size=1, on_bad_file="skip", shard=0, num_shards=1, report=print
    )
    with pytest.raises(BadFileError, match="every file of this shard is bad"):
        next(gen)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        next(load_data(data_dir=str(tmp_path / "missing"), batch_size=1))
    with pytest.raises(ValueError, match="no .h5 files"):
        next(load_data(data_dir=str(tmp_path), batch_size=1))
    write_file(tmp_path / "a.h5", slices=2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(load_data(data_dir=str(tmp_path), batch_size=3, shard=0, num_shards=1))
    with pytest.raises(ValueError, match="gets no files"):
        next(load_data(data_dir=str(tmp_path), batch_size=1, shard=1, num_shards=2))
    with pytest.raises(ValueError, match="on_bad_file"):
        next(load_data(data_dir=str(tmp_path), batch_size=1, on_bad_file="ignore", shard=0, num_shards=1))
    with pytest.raises(BadFileError, match="larger than the slices"):
        next(load_data(data_dir=str(tmp_path), batch_size=1, crop_size=64, shard=0, num_shards=1))
    assert os.path.exists(tmp_path / "a.h5")
