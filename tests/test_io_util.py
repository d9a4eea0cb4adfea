"""io_util: the atomic writer keeps the old file or the whole new one; the h5 lister, opener and inspector."""

import os
import stat

import h5py
import numpy as np
import pytest

from improved_diffusion.io_util import (
    BadFileError,
    atomic_write,
    atomic_write_text,
    inspect_h5,
    kspace_dataset,
    list_h5_files,
    open_h5,
)


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write_text(str(path), "first\n") == str(path)  # the folder is created
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o044 == 0o044 or mode & 0o004 == 0  # the usual permissions (umask), not mkstemp's 0600
    atomic_write_text(str(path), "second\n", fsync=True)
    assert path.read_text() == "second\n"

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write(str(path), half_then_fail)
    assert path.read_text() == "second\n"  # the old file, untouched
    assert sorted(os.listdir(path.parent)) == ["out.txt"]  # no temp file left


def test_atomic_write_h5(tmp_path):
    path = str(tmp_path / "x.h5")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f["a"] = np.arange(3)

    atomic_write(path, write)
    with open_h5(path) as f:
        assert list(f["a"][()]) == [0, 1, 2]


def test_list_h5_files_and_open_h5_errors(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.h5", "a/deep/2.hdf5", "a/notes.txt", "b.h5"):
        (tmp_path / name).write_bytes(b"")
    root = str(tmp_path)
    rel = lambda paths: [os.path.relpath(p, root) for p in paths]  # noqa: E731
    assert rel(list_h5_files(root)) == ["a/1.h5", "a/deep/2.hdf5", "b.h5"]
    assert rel(list_h5_files(root, recursive=False)) == ["b.h5"]
    assert rel(list_h5_files([str(tmp_path / "b.h5"), str(tmp_path / "a"), str(tmp_path / "b.h5")])) == [
        "a/1.h5",
        "a/deep/2.hdf5",
        "b.h5",
    ]
    with pytest.raises(BadFileError, match="nothing: no such file or folder"):
        list_h5_files(str(tmp_path / "nothing"))
    with pytest.raises(BadFileError, match=r"b.h5: not a readable HDF5 file: "):
        open_h5(str(tmp_path / "b.h5"))


def test_inspect_h5_and_kspace_dataset_give_one_line_per_problem(tmp_path):
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((2, 4, 4), np.complex64)
        f["real"] = np.zeros((2, 4, 4), np.float32)
        f["flat"] = np.zeros((4, 4), np.complex64)
        f["empty"] = np.zeros((0, 4, 4), np.complex64)
    with inspect_h5(path) as f:
        assert kspace_dataset(f, path).shape == (2, 4, 4)
        for key, problem in (
            ("nope", "missing key 'nope' (keys: ['empty', 'flat', 'kspace', 'real'])"),
            ("real", "'real' must be a complex dataset, got float32"),
            ("flat", "'flat' must be (slices, H, W) or (slices, coils, H, W), got shape (4, 4)"),
            ("empty", "'empty' is empty, shape (0, 4, 4)"),
        ):
            with pytest.raises(BadFileError) as err:
                kspace_dataset(f, path, key)
            assert str(err.value) == f"{path}: {problem}"
    with pytest.raises(BadFileError, match=r"^.*x.h5: unreadable: 'damaged'$"):
        with inspect_h5(path):
            raise KeyError("damaged")  # as h5py raises on damaged metadata
    with pytest.raises(BadFileError, match=r"x.h5: the block's own line$"):
        with inspect_h5(path):
            raise BadFileError(f"{path}: the block's own line")
