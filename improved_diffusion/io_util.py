"""File plumbing shared by every module and script: one atomic writer; one h5 lister, opener and inspector.

Every file this project writes (checkpoints, configs, logs' CSV rewrites, reconstructions, previews,
metrics, demo data, benchmark results, the paper) goes through :func:`atomic_write`: the content is
written to a temp file in the target's folder and renamed onto the target, so a crash, a full disk or a
kill leaves the old file or the complete new one, never a partial one, and readers never see one.
"""

import contextlib
import os
import tempfile
from typing import Callable, Iterator, List, Sequence, Union

import h5py

H5_SUFFIXES = (".h5", ".hdf5")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The process umask, read once: mkstemp makes 0600 files, outputs get the usual permissions instead.
_UMASK = _umask()


class BadFileError(ValueError):
    """A data file that cannot be used; the message is one line naming the file and the problem."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def atomic_write(path: str, write: Callable[[str], None], fsync: bool = False, chmod: bool = True) -> str:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, then rename it onto ``path``.

    Args:
        path: the file to (re)place; its folder is created.
        write: writes the whole content to the path it is given (``h5py.File(tmp, "w")``,
            ``torch.save(obj, tmp)``, ``open(tmp, "w")``, ``image.save(tmp, format="PNG")``, ...).
        fsync: flush the temp file to disk before the rename (checkpoints and configs: a power loss then
            leaves the old or the new file; without it only a crash of the process is covered).
        chmod: give the file the usual permissions (0666 minus the umask; mkstemp makes 0600). False when
            ``write`` puts a hard link to another file there, whose mode must not change.

    Returns:
        ``path``.

    Raises:
        Whatever ``write`` or the file system raises (the temp file is removed first).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if chmod:
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str, fsync: bool = False) -> str:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`; returns ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write, fsync=fsync)


def list_h5_files(paths: Union[str, Sequence[str]], recursive: bool = True) -> List[str]:
    """The ``.h5`` / ``.hdf5`` files among ``paths`` (files, and files in folders), sorted and unique.

    Args:
        paths: one path or several; folders are searched (recursively unless ``recursive`` is False), files
            are taken as they are whatever their suffix.
        recursive: search sub-folders too.

    Raises:
        BadFileError: a path that is neither a file nor a folder (one line naming it).
    """
    found = []
    for item in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(item):
            if recursive:
                for root, dirs, files in os.walk(item):
                    dirs.sort()
                    found.extend(os.path.join(root, f) for f in files if f.endswith(H5_SUFFIXES))
            else:
                found.extend(os.path.join(item, f) for f in os.listdir(item) if f.endswith(H5_SUFFIXES))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise BadFileError(f"{item}: no such file or folder")
    return sorted(set(found))


def open_h5(path: str, mode: str = "r") -> h5py.File:
    """``h5py.File(path, mode)``, with a file that is not readable HDF5 as one :class:`BadFileError` line.

    Raises:
        BadFileError: ``"<path>: not a readable HDF5 file: <reason>"``.
    """
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise BadFileError(f"{path}: not a readable HDF5 file: {first_line(err)}") from None


@contextlib.contextmanager
def inspect_h5(path: str) -> Iterator[h5py.File]:
    """``with inspect_h5(path) as f:`` validates a file: :func:`open_h5`, and h5py's errors on damaged
    metadata met inside the block (OSError, KeyError, RuntimeError, ValueError) as one line.

    Raises:
        BadFileError: ``"<path>: not a readable HDF5 file: <reason>"``, ``"<path>: unreadable: <reason>"``,
            or the block's own.
    """
    f = open_h5(path)
    try:
        with f:
            yield f
    except BadFileError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise BadFileError(f"{path}: unreadable: {first_line(err)}") from None


def kspace_dataset(f: h5py.File, path: str, key: str = "kspace") -> h5py.Dataset:
    """The file's k-space, checked without reading it: present, complex, ``(slices, H, W)`` or
    ``(slices, coils, H, W)``, not empty (training and reconstruction inputs alike).

    Raises:
        BadFileError: one line ``"<path>: <problem>"``.
    """
    if key not in f:
        raise BadFileError(f"{path}: missing key '{key}' (keys: {sorted(f.keys())})")
    ksp = f[key]
    if not isinstance(ksp, h5py.Dataset) or ksp.dtype.kind != "c":
        raise BadFileError(
            f"{path}: '{key}' must be a complex dataset, got {getattr(ksp, 'dtype', type(ksp))}"
        )
    if ksp.ndim not in (3, 4):
        raise BadFileError(
            f"{path}: '{key}' must be (slices, H, W) or (slices, coils, H, W), got shape {ksp.shape}"
        )
    if 0 in ksp.shape:
        raise BadFileError(f"{path}: '{key}' is empty, shape {ksp.shape}")
    return ksp
