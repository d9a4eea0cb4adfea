"""A small wrapper around the BART command line (Uecker et al., the Berkeley Advanced Reconstruction
Toolbox, https://mrirecon.github.io/bart/), used as an outside reference for this project's ESPIRiT maps
and compressed-sensing baseline.

Data go through ``.cfl``/``.hdr`` file pairs in a temporary folder: complex64, column-major (Fortran order),
dims ``[x, y, z, coil, maps, ...]``. This project's k-space is ``(C, H, W)``, centred, with the orthonormal
FFT :func:`improved_diffusion.mri.fftc.fft2c`; it maps to BART's ``[H, W, 1, C]`` (our H is BART's x, our W
its y). BART's centred FFT puts the k-space centre at index ``n // 2`` as ours does, and ``pics`` uses the
unitary (orthonormal) FFT, so with maps normalized to ``sum_c |S_c|^2 = 1`` its forward model is exactly
:func:`improved_diffusion.mri.sense.sense_forward` (tests/test_bart.py checks both, odd sizes included).

``pics`` rescales the k-space by an estimated factor before it reconstructs (and does not scale back
without ``-S``), which would change the meaning of λ; :func:`pics_l1` passes ``-w 1`` (no rescaling) by
default, so λ is in the units of the k-space given to it and the image comes back in those units.

Every function raises :class:`BartError` (a ValueError) with a one-line message when ``bart`` is not on
the PATH or a command fails.
"""

import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

BART = "bart"


class BartError(ValueError):
    """``bart`` is missing or one of its commands failed (one-line message)."""


class BartCalibrationWarning(UserWarning):
    """ecalib's calibration region is small and its kernel was reduced to fit."""


# ------------------------------------------------------------------------------------------- cfl files


def write_cfl(name: str, array: np.ndarray) -> None:
    """Write ``array`` as ``<name>.hdr`` + ``<name>.cfl`` (complex64, column-major, its own dims)."""
    arr = np.asarray(array)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    dims = list(arr.shape) + [1] * max(0, 2 - arr.ndim)  # BART needs at least 2 dims in the header
    with open(name + ".hdr", "w") as f:
        f.write("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n")
    np.asarray(arr, dtype=np.complex64).reshape(-1, order="F").astype("<c8").tofile(name + ".cfl")


def read_cfl(name: str) -> np.ndarray:
    """Read ``<name>.hdr`` + ``<name>.cfl`` -> complex64 array with the header's dims (trailing ones dropped,
    at least one dim kept)."""
    try:
        with open(name + ".hdr") as f:
            lines = [line.strip() for line in f]
    except OSError as err:
        raise BartError(f"cannot read {name}.hdr: {err.strerror}") from None
    try:
        dims = [int(d) for d in lines[lines.index("# Dimensions") + 1].split()]
    except (ValueError, IndexError):
        raise BartError(f"{name}.hdr: no '# Dimensions' line followed by integers") from None
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(name + ".cfl", dtype="<c8")
    if data.size != int(np.prod(dims)):
        raise BartError(f"{name}.cfl holds {data.size} values, its header says {dims}")
    return data.reshape(dims, order="F").astype(np.complex64)


# ------------------------------------------------------------------------------------------- running


def bart_available() -> bool:
    """True when the ``bart`` command is on the PATH and runs."""
    if shutil.which(BART) is None:
        return False
    try:
        return subprocess.run([BART, "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def bart_version() -> str:
    """``bart version`` (e.g. ``v0.8.00``); BartError when bart is missing."""
    return _run(["version"]).strip()


def _run(args: Sequence[str], cwd: Optional[str] = None, timeout: float = 600.0) -> str:
    if shutil.which(BART) is None:
        raise BartError(
            "bart is not installed (the 'bart' command is not on the PATH); install it, e.g. "
            "'apt-get install -y bart' on Debian/Ubuntu"
        )
    try:
        # BART's OpenMP threads busy-wait: on a shared or small machine they slow it down many times
        # (measured 10x on 2 busy cores), so one thread unless the caller set OMP_NUM_THREADS.
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(
            [BART, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        raise BartError(f"bart {args[0]} did not finish in {timeout:g} s") from None
    except OSError as err:
        raise BartError(f"bart {args[0]} could not run: {err.strerror}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else "no message"
        raise BartError(f"bart {args[0]} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def run_bart(
    command: Sequence[str],
    inputs: Dict[str, np.ndarray],
    outputs: Sequence[str],
    timeout: float = 600.0,
) -> Dict[str, np.ndarray]:
    """Run one bart command on arrays, in a temporary folder.

    Args:
        command: the arguments after ``bart``, naming the files (without extension) of ``inputs`` and
            ``outputs``, e.g. ``["fft", "-u", "3", "x", "y"]``.
        inputs: file name -> array, written as .cfl (its dims as they are: pass BART's layout).
        outputs: file names to read back.
        timeout: seconds.

    Returns:
        file name -> complex64 array (BART's layout, trailing singleton dims dropped).
    """
    with tempfile.TemporaryDirectory(prefix="bart_") as tmp:
        for name, arr in inputs.items():
            write_cfl(os.path.join(tmp, name), arr)
        _run(list(command), cwd=tmp, timeout=timeout)
        return {name: read_cfl(os.path.join(tmp, name)) for name in outputs}


# ------------------------------------------------------------------------------------------- layout


def to_bart_kspace(kspace: np.ndarray) -> np.ndarray:
    """Our ``(C, H, W)`` (or single-coil ``(H, W)``) -> BART's ``[H, W, 1, C]``."""
    k = np.asarray(kspace)
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3:
        raise BartError(f"expected k-space (C, H, W) or (H, W), got shape {k.shape}")
    return np.ascontiguousarray(np.transpose(k, (1, 2, 0))[:, :, None, :]).astype(np.complex64)


def from_bart_coils(arr: np.ndarray) -> np.ndarray:
    """BART's ``[H, W, 1, C, ...]`` (first index of every dim after the coils) -> our ``(C, H, W)``."""
    a = np.asarray(arr)
    a = a.reshape(a.shape + (1,) * max(0, 4 - a.ndim))
    a = a[(slice(None),) * 4 + (0,) * (a.ndim - 4)]
    if a.shape[2] != 1:
        raise BartError(f"expected a 2-D BART array [x, y, 1, coil], got dims {list(arr.shape)}")
    return np.ascontiguousarray(np.transpose(a[:, :, 0, :], (2, 0, 1))).astype(np.complex64)


def _mask_hw(mask, shape: Tuple[int, int]) -> np.ndarray:
    """A mask broadcastable to (H, W) (e.g. (W,), (1, W), (1, 1, W), (H, W), (C, H, W)) -> (H, W) 0/1."""
    if mask is None:
        return np.ones(shape, np.float32)
    m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask) != 0
    while m.ndim > 2:
        m = m.any(axis=0)
    try:
        return np.broadcast_to(m, shape).astype(np.float32)
    except ValueError:
        raise BartError(f"mask shape {np.shape(mask)} does not broadcast to k-space {shape}") from None


def _dims_arg(value: Union[int, Sequence[int]]) -> str:
    vals = [int(value)] * 2 if np.isscalar(value) else [int(v) for v in value]
    vals = (vals + [1, 1, 1])[:3]
    return ":".join(str(v) for v in vals)


# ------------------------------------------------------------------------------------------- commands


def fft2c(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """``bart fft -u [-i] 3`` over the last two dims of ``(..., H, W)`` (centred, unitary)."""
    x = np.asarray(x, dtype=np.complex64)
    lead = x.shape[:-2]
    flat = x.reshape((-1,) + x.shape[-2:])
    arr = np.transpose(flat, (1, 2, 0))  # [H, W, n]: dims 0 and 1 are transformed (bitmask 3)
    args = ["fft", "-u"] + (["-i"] if inverse else []) + ["3", "x", "y"]
    out = run_bart(args, {"x": arr}, ["y"])["y"].reshape(arr.shape)
    return np.ascontiguousarray(np.transpose(out, (2, 0, 1)).reshape(lead + x.shape[-2:]))


BART_CALIB_SIZE = 24  # ecalib's default limit of the calibration region (-r)
BART_KERNEL = 6  # ecalib's default kernel size (-k)


def calibration_size(
    sampled: np.ndarray, calsize: Union[int, Sequence[int]] = BART_CALIB_SIZE
) -> Tuple[int, int]:
    """The (H, W) size of the fully sampled calibration region that ``bart ecalib`` will use.

    A transcription of BART's ``calib_geom`` (src/calib/calib.c) for 2-D data: W is first cut to its
    central ``calsize`` columns (H, BART's readout, is kept whole), then a box starting at one point,
    placed at ``(n - size) // 2`` of that crop, grows by one along each axis in turn while it stays fully
    sampled and below ``calsize``. (BART then slides the box along H to the most energy; that does not
    change its size.)

    Args:
        sampled: (H, W) bool, the measured points.
        calsize: ``-r`` of ecalib: an int for both axes or (H, W).
    """
    sampled = np.asarray(sampled, dtype=bool)
    h, w = sampled.shape
    lim = [int(calsize)] * 2 if np.isscalar(calsize) else [int(v) for v in calsize][:2]
    tw = min(lim[1], w)
    pat = sampled[:, (w - tw) // 2 : (w - tw) // 2 + tw]
    dims = (h, tw)
    cal, stop = [1, 1], [False, False]

    def full() -> bool:
        r0, c0 = (dims[0] - cal[0]) // 2, (dims[1] - cal[1]) // 2
        return bool(pat[r0 : r0 + cal[0], c0 : c0 + cal[1]].all())

    if not full():
        return (0, 0)
    while not all(stop):
        for i in range(2):
            if cal[i] == dims[i] or cal[i] >= lim[i]:
                stop[i] = True
            if stop[i]:
                continue
            cal[i] += 1
            if not full():
                cal[i] -= 1
                stop[i] = True
    return (cal[0], cal[1])


def ecalib(
    kspace: np.ndarray,
    mask=None,
    calib: Optional[Union[int, Sequence[int]]] = None,
    kernel: Optional[Union[int, Sequence[int]]] = None,
    threshold: Optional[float] = None,
    crop: Optional[float] = None,
    timeout: float = 600.0,
) -> np.ndarray:
    """ESPIRiT maps by ``bart ecalib -m1`` (the first map set).

    Args:
        kspace: ``(C, H, W)`` complex k-space, fully sampled or masked.
        mask: sampling pattern broadcastable to (H, W); points outside it are zeroed first (BART finds the
            fully sampled calibration region from the non-zero samples). None: use the k-space as it is.
        calib: ``-r``: limit of the calibration region (an int for both axes, or (H, W)); None: BART's
            default (24), within which BART takes the largest fully sampled centred region.
        kernel: ``-k``: kernel size (int or (H, W)); None: BART's default (6), reduced along an axis where
            the calibration region (:func:`calibration_size`) is narrower than 6, to the region's width
            less one (with a :class:`BartCalibrationWarning`): fastMRI's 8x masks at 128 columns leave
            5 centre columns, of which BART's centring uses 4, and ``bart ecalib`` aborts on a kernel
            wider than the region.
        threshold: ``-t``: null-space threshold; None: BART's default.
        crop: ``-c``: zero the maps where the eigenvalue is below this; None: BART's default.
        timeout: seconds.

    Returns:
        ``(C, H, W)`` complex64 maps. Their phase is BART's (rotated to the first principal component),
        which may differ from :func:`improved_diffusion.mri.espirit.estimate_sens_maps` by a per-pixel
        phase common to all coils: compare subspaces, not phases.
    """
    k = np.asarray(kspace.detach().cpu().numpy() if hasattr(kspace, "detach") else kspace)
    if k.ndim != 3 or not np.iscomplexobj(k):
        raise BartError(f"ecalib: kspace must be complex (C, H, W), got {k.dtype} {k.shape}")
    k = k * _mask_hw(mask, k.shape[-2:]) if mask is not None else k
    sampled = np.any(k != 0, axis=0)  # BART's own estimate of the pattern
    cal = calibration_size(sampled, BART_CALIB_SIZE if calib is None else calib)
    args = ["ecalib", "-m1"]
    if calib is not None:
        args += ["-r", _dims_arg(calib)]
    if kernel is None and min(cal) < BART_KERNEL:
        # BART asserts (and aborts) when the kernel is larger than the region; a kernel as wide as the
        # region leaves one position and crops most of the maps, so take one less there.
        kernel = tuple(BART_KERNEL if c >= BART_KERNEL else c - 1 for c in cal)
        if min(kernel) < 2:
            raise BartError(
                f"ecalib: the fully sampled centre ({cal[0]}x{cal[1]} as bart finds it) is too small for "
                "ESPIRiT"
            )
        warnings.warn(
            f"bart ecalib: calibration region {cal[0]}x{cal[1]} is smaller than the default kernel "
            f"{BART_KERNEL}; using kernel {kernel[0]}x{kernel[1]}",
            BartCalibrationWarning,
            stacklevel=2,
        )
    if kernel is not None:
        args += ["-k", _dims_arg(kernel)]
    if threshold is not None:
        args += ["-t", f"{float(threshold):g}"]
    if crop is not None:
        args += ["-c", f"{float(crop):g}"]
    out = run_bart(args + ["ksp", "maps"], {"ksp": to_bart_kspace(k)}, ["maps"], timeout=timeout)["maps"]
    maps = from_bart_coils(out)
    if maps.shape != k.shape:
        raise BartError(f"ecalib returned maps {maps.shape} for k-space {k.shape}")
    if not np.all(np.isfinite(maps)):
        raise BartError("ecalib returned non-finite maps")
    return maps


def pics_l1(
    kspace: np.ndarray,
    mask,
    maps: Optional[np.ndarray],
    lamda: float,
    iters: int = 100,
    scaling: Optional[float] = 1.0,
    cycle_spinning: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 600.0,
) -> np.ndarray:
    """L1-wavelet compressed sensing by ``bart pics -l1 -r λ``: ``min_x ½‖M F S x − y‖² + λ‖Ψ x‖₁``.

    Args:
        kspace: ``(C, H, W)`` multi-coil or ``(H, W)`` single-coil k-space (zero where not sampled).
        mask: sampling pattern broadcastable to (H, W), passed as ``-p``; None: fully sampled.
        maps: ``(C, H, W)`` sensitivity maps; None for single-coil (an all-ones map).
        lamda: λ, in the units of ``kspace`` (with ``scaling`` 1).
        iters: ``-i``: iterations (FISTA, BART's default algorithm for one l1 term).
        scaling: ``-w``: BART divides the k-space by this before it reconstructs and returns the image in
            the divided units; 1 (default) keeps the caller's units. None: BART's own estimate (then λ and
            the image are relative to it).
        cycle_spinning: BART's random wavelet shifts per iteration (its default); False passes ``-n``.
        extra_args: more flags for pics (e.g. ``["--wavelet", "haar"]``).
        timeout: seconds.

    Returns:
        ``(H, W)`` complex64 image, in the k-space's units when ``scaling`` is 1.
    """
    k = np.asarray(kspace.detach().cpu().numpy() if hasattr(kspace, "detach") else kspace)
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3 or not np.iscomplexobj(k):
        raise BartError(f"pics_l1: kspace must be complex (C, H, W) or (H, W), got {k.dtype} {k.shape}")
    if maps is None:
        if k.shape[0] != 1:
            raise BartError(f"pics_l1: multi-coil k-space {k.shape} needs sensitivity maps")
        mps = np.ones(k.shape, np.complex64)
    else:
        mps = np.asarray(maps.detach().cpu().numpy() if hasattr(maps, "detach") else maps)
        if mps.shape != k.shape:
            raise BartError(f"pics_l1: sensitivity maps {mps.shape} do not match k-space {k.shape}")
    if not lamda >= 0:
        raise BartError(f"pics_l1: lamda must be >= 0, got {lamda}")
    if any(n % 2 for n in k.shape[-2:]):
        # pics' centre of an odd dimension is one pixel off ours (and `bart fft`'s): its image would be
        # shifted against the maps and the data model; fastMRI's k-space sizes are even
        raise BartError(
            f"pics_l1: odd image size {k.shape[-2:]} is not supported (pics puts the centre one pixel off)"
        )
    pattern = _mask_hw(mask, k.shape[-2:])
    args = ["pics", "-l1", "-r", f"{float(lamda):g}", "-i", str(int(iters))]
    if scaling is not None:
        args += ["-w", f"{float(scaling):g}"]
    if not cycle_spinning:
        args.append("-n")
    args += list(extra_args) + ["-p", "pat", "ksp", "sens", "img"]
    inputs = {
        "ksp": to_bart_kspace(k * pattern),
        "sens": to_bart_kspace(mps),
        "pat": pattern[:, :, None, None],
    }
    img = run_bart(args, inputs, ["img"], timeout=timeout)["img"]
    img = img.reshape(img.shape + (1,) * max(0, 2 - img.ndim))
    if img.shape[:2] != k.shape[-2:] or img.size != k.shape[-2] * k.shape[-1]:
        raise BartError(f"pics returned an image of dims {list(img.shape)} for k-space {k.shape}")
    # pics' internal centred FFT differs from `bart fft -u` (= ours) by a factor (-1)^(n/2) per dimension
    # (measured: n = 18, 22, 230 flip the sign, 16, 20, 128 do not): without it the image is -x wherever
    # one of H/2, W/2 is odd, and |x| hides it
    sign = (-1) ** sum(n // 2 for n in k.shape[-2:])
    return (sign * np.ascontiguousarray(img.reshape(k.shape[-2:]))).astype(np.complex64)
