"""The reconstruction field of view: crop the oversampled readout exactly, in k-space.

fastMRI's raw k-space is acquired with 2x readout oversampling (knee: 640 readout rows for a 320-row
reconstruction, ``ismrmrd_header`` encodedSpace 640 x 368 and reconSpace 320 x 320); the targets are
center crops of the full-FOV image. The readout direction (rows, dim -2) is always fully sampled by
Cartesian masks, so the inverse FFT along it, a crop of the rows, and the FFT back,

    ``y_crop = F_rows crop_rows F_rows^H y``,

give the k-space of exactly the cropped image: every measured column is kept, only readout positions
outside the FOV are dropped. White noise stays white with the same std (both transforms are
orthonormal, the crop keeps whole coordinates). Maps, noise, sampling and data consistency then run on
``(rows, W)`` instead of ``(H, W)``, and the model sees the pixels the training crop showed it
(:func:`improved_diffusion.fastmri_data.FastMRISliceDataset` applies the same crop). Masks that
undersample the readout (2-D Poisson) cannot be cropped this way and are refused.

The output crop follows fastMRI (``fastmri.data.transforms.UnetDataTransform``): the target's shape,
unless the image is narrower than the target (fastMRI's "FLAIR 203" case), then ``(W, W)``.
"""

import xml.etree.ElementTree as ET
from typing import Optional, Tuple, Union

import numpy as np
import torch

from .fftc import center_crop, fftc, ifftc

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


def recon_matrix(header: Union[bytes, str, np.ndarray]) -> Optional[Tuple[int, int]]:
    """``(x, y)`` of the ISMRMRD header's ``encoding/reconSpace/matrixSize`` (x = readout), or None.

    Args:
        header: the XML of a fastMRI file's ``ismrmrd_header`` (bytes, str, or a numpy bytes scalar).

    Returns:
        ``(rows, columns)`` of the reconstruction matrix, or None when the header lacks it.

    Raises:
        ValueError: the header is not parseable XML or holds a non-positive size.
    """
    if isinstance(header, np.ndarray):
        header = header.item()
    if isinstance(header, bytes):
        header = header.decode("utf-8", errors="replace")
    try:
        root = ET.fromstring(str(header))
    except ET.ParseError as err:
        raise ValueError(f"ismrmrd_header is not valid XML ({err})") from None
    # ISMRMRD's XML has a default namespace; accept headers written without it too.
    ns = {"m": ISMRMRD_NS} if root.tag.startswith("{") else None
    path = "m:encoding/m:reconSpace/m:matrixSize" if ns else "encoding/reconSpace/matrixSize"
    matrix = root.find(path, ns)
    if matrix is None:
        return None
    size = []
    for axis in ("x", "y"):
        node = matrix.find(f"m:{axis}" if ns else axis, ns)
        if node is None or not (node.text or "").strip().isdigit() or int(node.text) < 1:
            raise ValueError(f"ismrmrd_header reconSpace matrixSize {axis} is not a positive integer")
        size.append(int(node.text))
    return size[0], size[1]


def resolve_fov_rows(option: int, file_rows: Optional[int], grid_rows: int) -> Optional[int]:
    """The rows to crop the readout to, or None for no crop.

    Args:
        option: ``ReconOptions.fov_rows``: > 0 that many rows; 0 the file's reconstruction FOV
            (``file_rows``; no crop when the file tells none); -1 never crop.
        file_rows: rows of the file's reconstruction FOV (header reconSpace, else the target), or None.
        grid_rows: rows H of the k-space grid.

    Raises:
        ValueError: ``option`` < -1, or more rows than the grid has.
    """
    if option < -1:
        raise ValueError(f"fov_rows must be > 0, 0 (the file's FOV) or -1 (no crop), got {option}")
    rows = option if option > 0 else (file_rows if option == 0 else None)
    if rows is None or rows == grid_rows:
        return None
    if rows > grid_rows:
        raise ValueError(f"the reconstruction FOV has {rows} rows, more than the k-space's {grid_rows}")
    return int(rows)


def readout_complete(mask, shape: Tuple[int, int]) -> bool:
    """Whether every column of the mask is sampled in all rows or in none (a readout that can be cropped)."""
    m = np.broadcast_to(np.asarray(mask) != 0, shape)
    return bool((m.all(axis=0) | ~m.any(axis=0)).all())


def readout_crop(kspace: torch.Tensor, rows: int) -> torch.Tensor:
    """k-space ``(..., H, W)`` of the image's central ``rows`` rows: ``(..., rows, W)`` (module docstring).

    The image ``ifft2c`` of the result equals ``center_crop(ifft2c(kspace), (rows, W))``.
    """
    h = kspace.shape[-2]
    if not 0 < rows <= h:
        raise ValueError(f"cannot crop {h} readout rows to {rows}")
    if rows == h:
        return kspace
    image_rows = ifftc(kspace, dim=-2)
    return fftc(center_crop(image_rows, (rows, kspace.shape[-1])), dim=-2)


def crop_rows(image: torch.Tensor, rows: int) -> torch.Tensor:
    """The central ``rows`` rows of image-domain data ``(..., H, W)`` (e.g. sensitivity maps)."""
    return center_crop(image, (rows, image.shape[-1]))


def output_crop(target_shape: Tuple[int, int], image_shape: Tuple[int, int]) -> Tuple[int, int]:
    """fastMRI's output crop: ``target_shape``, or ``(W, W)`` when the image width W is below the target's.

    Raises:
        ValueError: the crop does not fit in the image (more target rows than image rows).
    """
    th, tw = (int(s) for s in target_shape)
    h, w = (int(s) for s in image_shape)
    if w < tw:  # fastMRI's "FLAIR 203" rule (fastmri.data.transforms.UnetDataTransform)
        th, tw = w, w
    if th > h:
        raise ValueError(f"the target {tuple(target_shape)} is taller than the image grid {(h, w)}")
    return th, tw
