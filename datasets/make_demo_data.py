"""Build a small fastMRI-format demo set from the MNI152 T1 template that ships with nilearn.

Real anatomy, offline: ``nilearn.datasets.load_mni152_template(resolution=1)`` (197x233x189 at 1 mm, no
download). Axial slices of the brain (empty ends skipped) are cut into ``train_volumes + val_volumes``
equal blocks along z; each volume (one file) is the central ``slices_per_volume`` slices of its block, so
neighbouring volumes are several slices apart and validation (blocks spread through the brain) never
touches a training slice.

Per slice: complex image = magnitude x exp(i phi) with a smooth random phase (2nd-order polynomial,
seeded). To avoid the inverse crime, the 1 mm slice is zero-padded to a 240 mm field of view, Fourier
transformed, and only the central ``size x size`` k-space block is kept (pixel 240/size mm), then complex
Gaussian noise is added. Multi-coil: 8 birdcage coils (``sigpy.mri.birdcage_maps``) multiply the 1 mm
image before the transform, k-space = F(S_c x) + noise, and ``sens_maps`` are added by
``prepare_fastmri.add_sens_maps`` (the preparation script's own code), so the folders are ready to train.

Output (``--output_dir``, default ``demo_data/``): ``singlecoil_{train,val}/`` with ``kspace`` (slices, H, W)
and ``reconstruction_esc``; ``multicoil_{train,val}/`` with ``kspace`` (slices, coils, H, W),
``reconstruction_rss`` and ``sens_maps``; every file also has ``ismrmrd_header`` and the attrs
acquisition, max, norm, patient_id; ``manifest.json`` lists the template slices of every file.

Synthesized contrasts (``--contrasts``, off by default): extra training folders
``{singlecoil,multicoil}_synth_train/`` of T1/T2/PD/FLAIR-like images made from the template's tissue maps,
cut in every ``--orientations`` and kept away from the validation slices (``--synth_holdout``), simulated
like the demo set; ``manifest.json`` gets a ``synthetic`` entry. The intensity ranges and the hold-out
geometry are described in ``synth_contrasts.py``.

Modules beside this script: ``mni152.py`` (template and tissue maps), ``synth_contrasts.py`` (contrasts,
hold-out), ``kspace_simulation.py`` (phase, coils, k-space, targets, file; shared with make_heldout_data.py).

    python datasets/make_demo_data.py                     # full set (~80 slices per kind)
    python datasets/make_demo_data.py --tiny --output_dir /tmp/demo   # seconds, for tests
    python datasets/make_demo_data.py --contrasts t1,t2,pd,flair --orientations axial,coronal,sagittal
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the modules beside this script
import prepare_fastmri  # noqa: E402
from kspace_simulation import (  # noqa: E402
    FOV,
    birdcage_maps,
    folder_size_mb,
    ismrmrd_header,
    pad_to_fov,
    simulate_kspace,
    smooth_phase,
    target_attrs,
    target_from_kspace,
    write_fastmri_file,
)
from mni152 import ORIENTATIONS, brain_slices, load_template, load_tissue_maps  # noqa: E402
from synth_contrasts import (  # noqa: E402
    ACQUISITION_PREFIX,
    CONTRAST_RANGES,
    HOLDOUT_GAP,
    SYNTH_HOLDOUTS,
    TISSUES,
    draw_intensities,
    heldout_slices,
    slabs,
    synth_sections,
    synthesize,
)

from improved_diffusion.io_util import atomic_write_text  # noqa: E402
from improved_diffusion.script_util import HelpFormatter  # noqa: E402
from improved_diffusion.transforms import scale_from_kspace, slice_to_image  # noqa: E402


def volume_layout(
    first: int, last: int, train_volumes: int, val_volumes: int, slices_per_volume: int
) -> Dict[str, List[List[int]]]:
    """Template slice indices of every volume: {"train": [[z, ...], ...], "val": [...]}.

    The range is cut into equal blocks; validation takes blocks spread evenly through the brain (never
    the first or last), and every volume keeps the central slices of its block.
    """
    n = train_volumes + val_volumes
    edges = np.linspace(first, last + 1, n + 1)
    block = int(np.floor(edges[1] - edges[0]))
    if slices_per_volume > block:
        raise ValueError(f"slices_per_volume {slices_per_volume} does not fit in blocks of {block} slices")
    val_blocks = (
        {int(round((i + 1) * n / (val_volumes + 1))) - 1 for i in range(val_volumes)}
        if val_volumes
        else set()
    )
    layout: Dict[str, List[List[int]]] = {"train": [], "val": []}
    for b in range(n):
        start = int(np.floor(edges[b])) + (block - slices_per_volume) // 2
        layout["val" if b in val_blocks else "train"].append(list(range(start, start + slices_per_volume)))
    return layout


def write_slices(
    path: str,
    slices: Sequence[np.ndarray],
    *,
    size: int,
    noise: float,
    seed: Sequence[int],
    coil_maps: Optional[np.ndarray],
    patient_id: str,
    espirit_kwargs: Dict,
    acquisition: str = "AXT1",
    source: str = "MNI152 2009 T1 template (nilearn), simulated k-space",
    attrs: Optional[Dict] = None,
) -> None:
    """Simulate one volume (file) from 1 mm magnitude slices (rows, cols <= FOV) and write it atomically.

    ``attrs`` are written after ``source`` (the demo volumes' ``template_slices``), before ``noise_std``.
    """
    rng = np.random.default_rng(list(seed))
    kspace = []
    for magnitude in slices:
        fine = pad_to_fov(magnitude)
        image = fine * np.exp(1j * smooth_phase(rng, FOV))
        kspace.append(simulate_kspace(image, size, noise, rng, coil_maps))
    kspace = np.stack(kspace)
    target_key, target = target_from_kspace(kspace)
    file_attrs = {
        "acquisition": acquisition,
        **target_attrs(target),
        "patient_id": patient_id,
        "source": source,
    }
    file_attrs.update(attrs or {})
    file_attrs.update(noise_std=noise, fov_mm=FOV)

    def add_maps(tmp: str) -> None:
        prepare_fastmri.add_sens_maps(tmp, compression="gzip", **espirit_kwargs)

    # gzip with byte shuffling: noisy k-space barely compresses, the maps (zero outside the head) halve.
    write_fastmri_file(
        path,
        kspace,
        target_key,
        target,
        ismrmrd_header(size),
        file_attrs,
        packed=dict(compression="gzip", shuffle=True),
        finish=add_maps if coil_maps is not None else None,
    )


def build(
    output_dir: str = "demo_data",
    *,
    size: int = 128,
    slices_per_volume: int = 10,
    train_volumes: int = 6,
    val_volumes: int = 2,
    coils: int = 8,
    noise: float = 0.01,
    seed: int = 0,
    kinds: Sequence[str] = ("singlecoil", "multicoil"),
    espirit_kwargs: Optional[Dict] = None,
    contrasts: Sequence[str] = (),
    orientations: Sequence[str] = ORIENTATIONS,
    synth_volumes: int = 1,
    synth_holdout: str = "slab",
    log=print,
) -> Dict:
    """Write the demo set; returns the manifest (also saved as ``manifest.json``).

    With ``contrasts`` (names of :data:`CONTRAST_RANGES`) it also writes ``{kind}_synth_train/`` with
    ``synth_volumes`` files of ``slices_per_volume`` slices per (orientation, contrast); see the module
    docstring. Without them the output is what it always was.
    """
    if size > FOV or size < 8:
        raise ValueError(f"size must be in [8, {FOV}], got {size}")
    unknown = [k for k in kinds if k not in ("singlecoil", "multicoil")]
    if unknown or not kinds:
        raise ValueError(f"kinds must be singlecoil and/or multicoil, got {list(kinds)}")
    bad = [c for c in contrasts if c not in CONTRAST_RANGES]
    if bad:
        raise ValueError(f"contrasts must be among {', '.join(CONTRAST_RANGES)}, got {', '.join(bad)}")
    if contrasts:
        bad = [o for o in orientations if o not in ORIENTATIONS]
        if bad or not orientations:
            raise ValueError(
                f"orientations must be among {', '.join(ORIENTATIONS)}, got {list(orientations)}"
            )
        if synth_volumes < 1:
            raise ValueError(f"synth_volumes must be >= 1, got {synth_volumes}")
        if synth_holdout not in SYNTH_HOLDOUTS:
            raise ValueError(
                f"synth_holdout must be one of {', '.join(SYNTH_HOLDOUTS)}, got {synth_holdout!r}"
            )
    vol = load_template()
    first, last = brain_slices(vol)
    layout = volume_layout(first, last, train_volumes, val_volumes, slices_per_volume)
    espirit_kwargs = dict(prepare_fastmri.ESPIRIT_DEFAULTS, **(espirit_kwargs or {}))
    maps = birdcage_maps(coils)  # on the 1 mm grid
    manifest = {
        "source": "nilearn MNI152 template, resolution=1",
        "brain_slices": [first, last],
        "size": size,
        "fov_mm": FOV,
        "coils": coils,
        "noise_std": noise,
        "seed": seed,
        "espirit": espirit_kwargs,
        "files": {},
    }
    for kind in kinds:
        k_i = ("singlecoil", "multicoil").index(kind)  # seeds do not depend on which kinds are built
        for s_i, split in enumerate(("train", "val")):
            folder = os.path.join(output_dir, f"{kind}_{split}")
            os.makedirs(folder, exist_ok=True)
            for v, zs in enumerate(layout[split]):
                name = f"demo_{kind}_{split}_{v:03d}.h5"
                t = time.time()
                write_slices(
                    os.path.join(folder, name),
                    [vol[z] for z in zs],
                    size=size,
                    noise=noise,
                    seed=(seed, k_i, s_i, v),
                    coil_maps=maps if kind == "multicoil" else None,
                    patient_id=f"mni152_{kind}_{split}_{v:03d}",
                    espirit_kwargs=espirit_kwargs,
                    attrs={"template_slices": np.asarray(zs, np.int32)},
                )
                manifest["files"][f"{kind}_{split}/{name}"] = zs
                log(f"{kind}_{split}/{name}: template slices {zs[0]}..{zs[-1]} ({time.time() - t:.1f} s)")
    if contrasts:
        manifest["synthetic"] = build_synthetic(
            output_dir,
            vol.shape[0],
            first,
            last,
            layout,
            size=size,
            slices_per_volume=slices_per_volume,
            noise=noise,
            seed=seed,
            kinds=kinds,
            contrasts=contrasts,
            orientations=orientations,
            synth_volumes=synth_volumes,
            synth_holdout=synth_holdout,
            coil_maps=maps,
            espirit_kwargs=espirit_kwargs,
            log=log,
        )
    atomic_write_text(os.path.join(output_dir, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def build_synthetic(
    output_dir: str,
    depth: int,
    first: int,
    last: int,
    layout: Dict[str, List[List[int]]],
    *,
    size: int,
    slices_per_volume: int,
    noise: float,
    seed: int,
    kinds: Sequence[str],
    contrasts: Sequence[str],
    orientations: Sequence[str],
    synth_volumes: int,
    coil_maps: np.ndarray,
    synth_holdout: str = "slab",
    espirit_kwargs: Dict,
    log=print,
) -> Dict:
    """Write ``{kind}_synth_train/`` (synthesized contrasts, all orientations); returns its manifest entry.

    Positions, slabs and intensities are drawn per (orientation, contrast, volume) from seed
    ``(seed, 3, o, c, v)`` and shared by the kinds (as the demo volumes share template slices); phase and
    noise per kind from ``(seed, kind, 2, o, c, v)``.
    """
    maps = load_tissue_maps()
    held = heldout_slices(layout, depth)
    entry = {
        "source": "nilearn MNI152 GM/WM probability maps and brain mask, resolution=1; CSF = mask - GM - WM",
        "intensity_ranges": CONTRAST_RANGES,
        "heldout_slices": [int(z) for z in np.nonzero(held)[0]],
        "holdout_gap": HOLDOUT_GAP,
        "holdout": synth_holdout,
        "slabs": [list(r) for r in slabs(held)] if synth_holdout == "slab" else [],
        "files": {},
    }
    plans = {}
    for o_i, orientation in enumerate(ORIENTATIONS):
        if orientation not in orientations:
            continue  # indices from the full list: seeds do not depend on which orientations are built
        for c_i, contrast in enumerate(CONTRAST_RANGES):
            if contrast not in contrasts:
                continue
            for v in range(synth_volumes):
                rng = np.random.default_rng([seed, 3, o_i, c_i, v])
                sections = synth_sections(
                    maps, orientation, held, first, last, slices_per_volume, rng, synth_holdout
                )
                levels = [draw_intensities(rng, contrast) for _ in sections]
                plans[(o_i, orientation, c_i, contrast, v)] = (sections, levels)
    for kind in kinds:
        k_i = ("singlecoil", "multicoil").index(kind)
        folder = os.path.join(output_dir, f"{kind}_synth_train")
        os.makedirs(folder, exist_ok=True)
        for (o_i, orientation, c_i, contrast, v), (sections, levels) in plans.items():
            name = f"synth_{kind}_{orientation}_{contrast}_{v:03d}.h5"
            t = time.time()
            positions = [p for p, _, _ in sections]
            slab = sections[0][1]
            write_slices(
                os.path.join(folder, name),
                [synthesize(sec, lv) for (_, _, sec), lv in zip(sections, levels)],
                size=size,
                noise=noise,
                seed=(seed, k_i, 2, o_i, c_i, v),
                coil_maps=coil_maps if kind == "multicoil" else None,
                patient_id=f"mni152_synth_{kind}_{orientation}_{contrast}_{v:03d}",
                espirit_kwargs=espirit_kwargs,
                acquisition=ACQUISITION_PREFIX[orientation] + contrast.upper(),
                source=f"MNI152 2009 tissue maps (nilearn), synthesized {contrast}, simulated k-space",
                attrs={
                    "orientation": orientation,
                    "contrast": contrast,
                    "positions": np.asarray(positions, np.int32),
                    "slab": np.asarray(slab if slab is not None else (-1, -1), np.int32),
                    "intensities": np.asarray([[lv[t_] for t_ in TISSUES] for lv in levels], np.float32),
                    "intensity_columns": ",".join(TISSUES),
                },
            )
            entry["files"][f"{kind}_synth_train/{name}"] = {
                "orientation": orientation,
                "contrast": contrast,
                "positions": positions,
                "slab": list(slab) if slab is not None else None,
                "intensities": [{t_: round(lv[t_], 4) for t_ in TISSUES} for lv in levels],
            }
            where = f"slab z {slab[0]}..{slab[1] - 1}, " if slab is not None else ""
            log(f"{kind}_synth_train/{name}: {where}positions {positions[0]}..{positions[-1]} "
                f"({time.time() - t:.1f} s)")  # fmt: skip
    return entry


def scale_statistics(output_dir: str) -> Dict[str, np.ndarray]:
    """max |x| / scale of every slice, per kind (``<kind>_synth`` for the synthesized folders): how the
    intensity scale normalizes the demo images."""
    ratios: Dict[str, List[float]] = {}
    for kind in ("singlecoil", "multicoil"):
        for split in ("train", "val", "synth_train"):
            folder = os.path.join(output_dir, f"{kind}_{split}")
            if not os.path.isdir(folder):
                continue
            group = f"{kind}_synth" if split == "synth_train" else kind
            for name in sorted(os.listdir(folder)):
                with h5py.File(os.path.join(folder, name), "r") as f:
                    for s in range(f["kspace"].shape[0]):
                        k = torch.from_numpy(f["kspace"][s])
                        maps = torch.from_numpy(f["sens_maps"][s]) if "sens_maps" in f else None
                        image = slice_to_image(k, maps)
                        ratios.setdefault(group, []).append(float(image.abs().max()) / scale_from_kspace(k))
    return {kind: np.asarray(r) for kind, r in ratios.items()}


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--output_dir", type=str, default="demo_data", help="output folder (<kind>_train/, _val/)")
    p.add_argument("--size", type=int, default=128, help="matrix size (FOV 240 mm)")
    p.add_argument("--slices_per_volume", type=int, default=10, help="slices per file")
    p.add_argument("--train_volumes", type=int, default=6, help="training files per kind")
    p.add_argument("--val_volumes", type=int, default=2, help="validation files per kind")
    p.add_argument("--coils", type=int, default=8, help="coils of the multi-coil files")
    p.add_argument("--noise", type=float, default=0.01, help="complex noise std (template max = 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of phases, coil maps and noise")
    p.add_argument(
        "--kinds", type=str, default="singlecoil,multicoil", help="comma list of singlecoil, multicoil"
    )
    p.add_argument("--tiny", action="store_true", help="32x32, 2 slices, 2 train + 1 val volumes (tests)")
    p.add_argument(
        "--contrasts",
        type=str,
        default="",
        help="also build <kind>_synth_train/ with these synthesized contrasts: comma list of "
        f"{', '.join(CONTRAST_RANGES)} ('' = none)",
    )
    p.add_argument(
        "--orientations",
        type=str,
        default=",".join(ORIENTATIONS),
        help="orientations of the synthesized slices (with --contrasts)",
    )
    p.add_argument(
        "--synth_volumes",
        type=int,
        default=1,
        help="synthesized files per (orientation, contrast), each of --slices_per_volume slices",
    )
    p.add_argument(
        "--synth_holdout",
        type=str,
        default="slab",
        choices=SYNTH_HOLDOUTS,
        help="coronal/sagittal: 'slab' keeps every voxel away from the validation slices (partial slices), "
        "'none' cuts whole slices through them",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = create_argparser().parse_args(argv)
    if args.tiny:
        args.size, args.slices_per_volume, args.train_volumes, args.val_volumes = 32, 2, 2, 1
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    contrasts = [c.strip().lower() for c in args.contrasts.split(",") if c.strip()]
    orientations = [o.strip().lower() for o in args.orientations.split(",") if o.strip()]
    t0 = time.time()
    try:
        build(
            args.output_dir,
            size=args.size,
            slices_per_volume=args.slices_per_volume,
            train_volumes=args.train_volumes,
            val_volumes=args.val_volumes,
            coils=args.coils,
            noise=args.noise,
            seed=args.seed,
            kinds=kinds,
            contrasts=contrasts,
            orientations=orientations,
            synth_volumes=args.synth_volumes,
            synth_holdout=args.synth_holdout,
        )
    except ValueError as err:
        print(f"make_demo_data: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.time() - t0
    print(f"built {args.output_dir} in {elapsed:.1f} s, {folder_size_mb(args.output_dir):.1f} MB")
    for kind, r in scale_statistics(args.output_dir).items():
        q = np.percentile(r, [0, 5, 50, 95, 100])
        print(f"{kind}: max|x|/scale over {len(r)} slices: min {q[0]:.2f} p5 {q[1]:.2f} median {q[2]:.2f} "
              f"p95 {q[3]:.2f} max {q[4]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
