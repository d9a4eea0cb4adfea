"""Synthesized contrasts for make_demo_data.py: tissue intensities and the sections that avoid validation.

make_demo_data.py ``--contrasts`` (off by default) writes extra training folders
``{singlecoil,multicoil}_synth_train/`` made from nilearn's grey- and white-matter probability maps and brain
mask on the template's grid (``load_mni152_gm_template``, ``load_mni152_wm_template``,
``load_mni152_brain_mask``, resolution=1, no download; CSF = mask - GM - WM clipped at 0). Each slice gets
its own tissue intensities, drawn uniformly from the ranges of :data:`CONTRAST_RANGES` (the template's own
T1 has WM 0.87, GM 0.65, CSF 0.28 in the median of pure-tissue voxels); the image is
``i_GM p_GM + i_WM p_WM + i_CSF p_CSF`` (brain only, like the template), at most 1:

=========  ==============  ==============  ==============  =========================
contrast   WM              GM              CSF             order
=========  ==============  ==============  ==============  =========================
t1         0.80 - 0.95     0.55 - 0.70     0.10 - 0.30     WM > GM > CSF
t2         0.30 - 0.45     0.50 - 0.65     0.85 - 1.00     CSF > GM > WM
pd         0.50 - 0.62     0.65 - 0.78     0.80 - 0.95     CSF > GM > WM (flatter)
flair      0.50 - 0.65     0.70 - 0.90     0.00 - 0.10     GM > WM > CSF (suppressed)
=========  ==============  ==============  ==============  =========================

Slices are cut in every ``--orientations`` (axial, coronal: superior up, sagittal: superior up and anterior
left) and simulated exactly like the demo set (smooth phase, no inverse crime, noise, single- and
multi-coil, same keys). Validation stays apart: axial slices come from the brain slices at least
``HOLDOUT_GAP`` slices away from every validation slice. A coronal or sagittal slice crosses every axial
slice, so with ``--synth_holdout slab`` (the default) it is cut from a slab of the brain between (or beyond)
the validation volumes, at least ``MIN_SLAB`` slices thick, with a cosine taper of ``SLAB_TAPER`` slices at
its edges (a slab profile): no synthesized voxel lies within ``HOLDOUT_GAP`` slices of a validation slice,
and those images show part of the brain. (Under the old 3 x 3-block intensity scale those partial images
normalized far above [-1, 1]; the scale now comes from the whole fully sampled k-space, so every training
slice peaks at 0.5.) ``--synth_holdout none`` cuts whole coronal and sagittal slices instead (they pass
through the validation slices' anatomy, in other contrasts and orientations). ``manifest.json`` gets a
``synthetic`` entry with the held-out slices, every file's positions, slabs and intensities.
"""

from typing import Dict, List, Optional, Tuple

import numpy as np
from mni152 import BRAIN_AREA_FRACTION, oriented

# Synthesized contrasts: (low, high) intensity of each tissue, drawn uniformly per slice (module docstring).
CONTRAST_RANGES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "t1": {"wm": (0.80, 0.95), "gm": (0.55, 0.70), "csf": (0.10, 0.30)},
    "t2": {"wm": (0.30, 0.45), "gm": (0.50, 0.65), "csf": (0.85, 1.00)},
    "pd": {"wm": (0.50, 0.62), "gm": (0.65, 0.78), "csf": (0.80, 0.95)},
    "flair": {"wm": (0.50, 0.65), "gm": (0.70, 0.90), "csf": (0.00, 0.10)},
}
TISSUES = ("gm", "wm", "csf")
ACQUISITION_PREFIX = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}
HOLDOUT_GAP = 4  # synthesized images keep |z - z_val| >= 4 to every validation slice (as training volumes)
SYNTH_HOLDOUTS = ("slab", "none")
MIN_SLAB = 32  # thinnest slab (slices) a coronal or sagittal image is cut from
SLAB_TAPER = 4  # slices of cosine taper at each edge of a slab


def draw_intensities(rng: np.random.Generator, contrast: str) -> Dict[str, float]:
    """One slice's tissue intensities, each uniform in its :data:`CONTRAST_RANGES` range."""
    return {t: float(rng.uniform(*CONTRAST_RANGES[contrast][t])) for t in TISSUES}


def synthesize(maps: np.ndarray, intensities: Dict[str, float]) -> np.ndarray:
    """``sum_t i_t p_t`` over GM, WM, CSF: maps (3, ...) -> image (...) float32."""
    return sum(np.float32(intensities[t]) * maps[i] for i, t in enumerate(TISSUES)).astype(np.float32)


def heldout_slices(layout: Dict[str, List[List[int]]], depth: int, gap: int = HOLDOUT_GAP) -> np.ndarray:
    """(depth,) bool: axial slices within ``gap`` - 1 of a validation slice (no synthesized voxel there)."""
    held = np.zeros(depth, bool)
    for zs in layout["val"]:
        for z in zs:
            held[max(0, z - gap + 1) : z + gap] = True
    return held


def slabs(held: np.ndarray, min_slab: int = MIN_SLAB) -> List[Tuple[int, int]]:
    """Runs ``[z0, z1)`` of not-held-out axial slices at least ``min_slab`` long."""
    runs, start = [], None
    for z, h in enumerate(list(held) + [True]):
        if not h and start is None:
            start = z
        elif h and start is not None:
            if z - start >= min_slab:
                runs.append((start, z))
            start = None
    return runs


def slab_profile(depth: int, slab: Tuple[int, int], taper: int = SLAB_TAPER) -> np.ndarray:
    """(depth,) weights: 1 inside ``slab``, a cosine ramp over ``taper`` slices at its edges, 0 outside."""
    z0, z1 = slab
    w = np.zeros(depth, np.float32)
    w[z0:z1] = 1
    for d in range(min(taper, (z1 - z0) // 2)):
        ramp = 0.5 - 0.5 * np.cos(np.pi * (d + 0.5) / taper)
        w[z0 + d] = w[z1 - 1 - d] = ramp
    return w


def synth_sections(
    maps: np.ndarray,
    orientation: str,
    held: np.ndarray,
    first: int,
    last: int,
    count: int,
    rng: np.random.Generator,
    holdout: str = "slab",
) -> List[Tuple[int, Optional[Tuple[int, int]], np.ndarray]]:
    """``count`` tissue-map sections (3, rows, cols) of one orientation that avoid the held-out slices.

    Axial: distinct slices of [first, last] that are not held out. Coronal/sagittal with ``holdout``
    "slab": one slab of :func:`slabs` (chosen with probability proportional to its thickness), weighted by
    :func:`slab_profile`, then distinct positions where the slab holds at least BRAIN_AREA_FRACTION of its
    largest brain area; with "none": whole slices at such positions (they cross the held-out slices).

    Returns:
        ``[(position, slab or None, sections (3, rows, cols) float32), ...]`` sorted by position.
    """
    if orientation == "axial":
        allowed = [z for z in range(first, last + 1) if not held[z]]
        if len(allowed) < count:
            raise ValueError(f"only {len(allowed)} axial slices outside the validation volumes, need {count}")
        picks = sorted(int(z) for z in rng.choice(allowed, size=count, replace=False))
        return [(z, None, np.ascontiguousarray(maps[:, z])) for z in picks]
    if holdout not in SYNTH_HOLDOUTS:
        raise ValueError(f"synth_holdout must be one of {', '.join(SYNTH_HOLDOUTS)}, got {holdout!r}")
    if holdout == "none":
        slab, weight = None, np.ones(maps.shape[1], np.float32)
    else:
        runs = slabs(held)
        if not runs:
            raise ValueError(f"no slab of {MIN_SLAB} slices outside the validation volumes for {orientation}")
        lengths = np.array([z1 - z0 for z0, z1 in runs], float)
        slab = runs[int(rng.choice(len(runs), p=lengths / lengths.sum()))]
        weight = slab_profile(maps.shape[1], slab)
    rows_weight = weight[::-1, None]  # oriented() puts superior (high z) first
    view = oriented(maps, orientation)  # (3, positions, rows, cols)
    brain = (view.sum(axis=0) > 0.5) & (rows_weight > 0.5)
    area = brain.sum(axis=(1, 2))
    candidates = np.nonzero(area >= BRAIN_AREA_FRACTION * area.max())[0]
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} {orientation} positions in slab {slab}, need {count}")
    picks = sorted(int(p) for p in rng.choice(candidates, size=count, replace=False))
    return [(p, slab, np.ascontiguousarray(view[:, p] * rows_weight)) for p in picks]
