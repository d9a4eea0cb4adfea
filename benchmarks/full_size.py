"""Full-size fastMRI-like multi-coil slice: seconds per reconstruction stage, seconds per slice, PSNR, BART.

Builds a synthetic knee-sized file like fastMRI's multi-coil files: ``kspace`` (slices, 15, 640, 368) with
2x readout oversampling (the object fits in the central 320 rows), an ``ismrmrd_header`` whose
reconSpace is 320x320, and ``reconstruction_rss`` (slices, 320, 320), the RSS of the fully sampled coil
images center-cropped (fastMRI's target). The anatomy is an MNI152 slice (the demo data's template)
with a smooth phase; the coils are 15 smooth complex sensitivities around the object; complex white noise.

Then runs scripts/image_sample.py on it in this process under cProfile (K = 2, DDIM 10 network
evaluations by default: the recommended recipe) and prints the cumulative CPU seconds of each stage
(maps, UNet, attention, data consistency, FFTs), seconds per slice, PSNR against the target, and the
CPU time of ``bart ecalib`` + ``bart pics`` (one thread) on the same masked slice. CPU seconds, not
wall time, because the machine may be shared; run with ``OMP_NUM_THREADS=1``. Works with any version of
the code on ``PYTHONPATH`` (stages are found by function name), so "before" and "after" run the same script:

    PYTHONPATH=/work/main OMP_NUM_THREADS=1 python benchmarks/full_size.py --label before
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/full_size.py --label after

Appends one row per run to ``results/full_size.csv``.
"""

import argparse
import cProfile
import csv
import importlib.util
import os
import pstats
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import h5py
import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stages: (label, file name suffix, function name); cumulative seconds from cProfile.
STAGES = (
    ("total", "reconstruction.py", "reconstruct_slice"),
    ("prepare (noise, whitening, maps)", "coils.py", "prepare_slice"),
    ("  ESPIRiT maps", "espirit.py", "estimate_sens_maps"),
    ("  calibration misfit", "coils.py", "calibration_misfit"),
    ("UNet", "unet.py", ""),  # UNetModel.forward (_class_seconds)
    ("  attention", "unet.py", ""),  # AttentionBlock.forward
    ("DC during sampling", "data_consistency.py", "denoised_fn"),
    ("final DC", "data_consistency.py", "final_data_consistency"),
    ("FFTs (fft2c + ifft2c)", "fftc.py", "fft2c|ifft2c"),
)
CSV_FIELDS = (
    ["label", "code", "threads", "coils", "shape", "num_samples", "nfe", "cpu_seconds_per_slice"]
    + [s[0].strip() for s in STAGES[1:]]
    + ["wall_seconds_per_slice", "psnr", "ssim", "bart_cpu_seconds", "ratio_to_bart"]
)


def _import_script(name: str, code_root: str):
    """A script of the code under test (the checkout that ``improved_diffusion`` is imported from)."""
    path = os.path.join(code_root, "scripts", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def header_xml(encoded: Sequence[int], recon: Sequence[int]) -> str:
    """Minimal ISMRMRD XML with fastMRI's fields: encodedSpace and reconSpace matrices (x = readout)."""

    def space(m):
        return f"<matrixSize><x>{m[0]}</x><y>{m[1]}</y><z>1</z></matrixSize>"

    return (
        '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        f"<encodedSpace>{space(encoded)}</encodedSpace><reconSpace>{space(recon)}</reconSpace>"
        "<trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"
    )


def anatomy(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols) complex image: an MNI152 axial slice filling ~90% of (rows, cols), smooth phase."""
    sys.path.insert(0, REPO_ROOT)
    from datasets.mni152 import load_template

    vol = load_template()
    img = torch.from_numpy(vol[vol.shape[0] // 2].copy())[None, None]
    img = torch.nn.functional.interpolate(img, size=(int(0.9 * rows), int(0.9 * cols)), mode="bilinear")
    img = img[0, 0].numpy()
    out = np.zeros((rows, cols), np.float32)
    top, left = (rows - img.shape[0]) // 2, (cols - img.shape[1]) // 2
    out[top : top + img.shape[0], left : left + img.shape[1]] = img
    yy, xx = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    phase = rng.uniform(-np.pi, np.pi) + 0.8 * xx - 0.5 * yy + 0.3 * xx * yy
    return (out * np.exp(1j * phase)).astype(np.complex64)


def coil_maps(coils: int, rows: int, cols: int, obj_rows: int) -> np.ndarray:
    """(coils, rows, cols) smooth complex sensitivities on a ring around the central object."""
    yy, xx = np.meshgrid(np.arange(rows) - rows / 2, np.arange(cols) - cols / 2, indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        cy, cx = 0.55 * obj_rows * np.sin(a), 0.55 * cols * np.cos(a)
        width = 0.45 * max(obj_rows, cols)
        mag = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        phase = 0.5 * c + 2e-3 * (c % 3 - 1) * (xx + yy)
        maps.append(mag * np.exp(1j * phase))
    return np.asarray(maps, np.complex64)


def make_full_size_file(
    path: str,
    slices: int = 1,
    coils: int = 15,
    shape=(640, 368),
    recon: Optional[Sequence[int]] = None,
    noise: float = 0.01,
    seed: int = 0,
) -> None:
    """Write the synthetic fastMRI-like multi-coil file (module docstring); ``recon`` defaults to
    (rows / 2, min(rows / 2, cols)), fastMRI's 320x320 for 640x368."""
    from improved_diffusion.mri.fftc import fft2c, ifft2c

    rng = np.random.default_rng(seed)
    rows, cols = shape
    recon = tuple(recon or (rows // 2, min(rows // 2, cols)))
    obj_rows = rows // 2  # 2x readout oversampling: the object fits in the central half
    kspace, targets = [], []
    maps = coil_maps(coils, rows, cols, obj_rows)
    for _ in range(slices):
        img = np.zeros((rows, cols), np.complex64)
        img[(rows - obj_rows) // 2 : (rows - obj_rows) // 2 + obj_rows] = anatomy(obj_rows, cols, rng)
        k = fft2c(torch.from_numpy(maps * img)).numpy()
        k = k + noise / np.sqrt(2) * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        k = k.astype(np.complex64)
        rss = np.sqrt((np.abs(ifft2c(torch.from_numpy(k)).numpy()) ** 2).sum(0))
        top, left = (rows - recon[0]) // 2, (cols - recon[1]) // 2
        kspace.append(k)
        targets.append(rss[top : top + recon[0], left : left + recon[1]])
    with h5py.File(path, "w") as f:
        f["kspace"] = np.stack(kspace)
        f["reconstruction_rss"] = np.stack(targets).astype(np.float32)
        f["ismrmrd_header"] = header_xml((rows, cols), recon)
        f.attrs["acquisition"] = "CORPD_FBK"


def stage_seconds(stats: pstats.Stats) -> Dict[str, float]:
    """Cumulative seconds of each of STAGES (0 when the function did not run)."""
    out = {}
    for label, suffix, names in STAGES:
        wanted = set(names.split("|"))
        total = 0.0
        for (fname, _, func), (_, _, _, cum, _) in stats.stats.items():
            if fname.endswith(suffix) and func in wanted:
                total += cum
        out[label.strip()] = total
    out["UNet"] = _class_seconds(stats, "unet.py", ("UNetModel",))
    out["attention"] = _class_seconds(stats, "unet.py", ("AttentionBlock",))
    return out


def _class_seconds(stats: pstats.Stats, suffix: str, classes: Sequence[str]) -> float:
    """Cumulative seconds of ``forward`` of the named classes in the file ``suffix`` (cProfile keys carry
    no class, so the class is read from the source: the nearest ``class`` line above the function)."""
    total = 0.0
    for (fname, line, func), (_, _, _, cum, _) in stats.stats.items():
        if fname.endswith(suffix) and func == "forward" and _class_at(fname, line) in classes:
            total += cum
    return total


def _class_at(fname: str, line: int) -> str:
    try:
        with open(fname) as f:
            lines = f.readlines()[:line]
    except OSError:
        return ""
    for text in reversed(lines):
        if text.startswith("class "):
            return text[len("class ") :].split("(")[0].split(":")[0].strip()
    return ""


def bart_seconds(path: str) -> Optional[float]:
    """Seconds of ``bart ecalib`` + ``bart pics`` on the masked first slice (None without BART)."""
    from improved_diffusion.mri import bart
    from improved_diffusion.recon_inputs import MaskSpec, open_volume

    if not bart.bart_available():
        return None
    vol = open_volume(path, MaskSpec())
    k = vol.read_kspace(0)
    # BART runs as child processes: their CPU time, as the diffusion stages' (one thread).
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    start = os.times()
    maps = bart.ecalib(k, vol.mask)
    bart.pics_l1(k * vol.mask, vol.mask, maps, 1e-3 * float(np.abs(k).max()), iters=100)
    end = os.times()
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env
    return (end.children_user + end.children_system) - (start.children_user + start.children_system)


def unit_costs(path: str, model_path: str, num_samples: int = 2, repeats: int = 3) -> Dict[str, float]:
    """CPU seconds of the units a reconstruction repeats, on the grid the code under test reconstructs on:
    ``prepare_slice`` (noise, whitening, maps; once per slice), one network evaluation of the K samples, and
    one ``A^H A`` (one CG iteration's operator) on them. A cheap stand-in for the full profile when a full
    run of slow code does not fit (module docstring)."""
    import inspect

    from improved_diffusion.data_consistency import MeasurementOperator
    from improved_diffusion.mri.coils import prepare_slice
    from improved_diffusion.recon_inputs import MaskSpec, open_volume
    from improved_diffusion.script_util import create_model_and_diffusion, load_config

    vol = open_volume(path, MaskSpec())
    kwargs = {}
    if "fov_rows" in inspect.signature(prepare_slice).parameters:  # the code with the readout crop
        kwargs = {"fov_rows": vol.recon_rows, "num_virtual_coils": 0}
    start = time.process_time()
    data = prepare_slice(vol.read_kspace(0), vol.mask, **kwargs)
    out = {"prepare_slice": time.process_time() - start}
    c, h, w = data.kspace.shape
    out.update(grid=f"{c}x{h}x{w}")
    cfg = load_config(model_path)
    model, _ = create_model_and_diffusion(**{k: v for k, v in cfg.items() if k in _model_keys()})
    model.load_state_dict(torch.load(model_path, map_location="cpu"))
    model.eval()
    x = torch.randn(num_samples, 2, h, w)
    t = torch.full((num_samples,), 100)
    mask = torch.from_numpy(np.asarray(getattr(data, "mask", vol.mask)))
    op = MeasurementOperator(torch.from_numpy(data.kspace), mask, torch.from_numpy(data.maps))
    z = torch.randn(num_samples, h, w, dtype=torch.complex64)
    with torch.no_grad():
        for name, fn, n in (
            ("network evaluation", lambda: model(x, t), 1),
            ("A^H A", lambda: op.normal(z), repeats),
        ):
            fn()  # warm-up (allocations, FFT plans)
            start = time.process_time()
            for _ in range(n):
                fn()
            out[name] = (time.process_time() - start) / n
    return out


def _model_keys():
    from improved_diffusion.script_util import model_and_diffusion_defaults

    return model_and_diffusion_defaults().keys()


def create_argparser() -> argparse.ArgumentParser:
    from improved_diffusion.script_util import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--label", type=str, default="run", help="row label in the CSV (e.g. before / after)")
    p.add_argument("--coils", type=int, default=15, help="coils of the synthetic file")
    p.add_argument("--rows", type=int, default=640, help="k-space rows (readout, 2x oversampled)")
    p.add_argument("--cols", type=int, default=368, help="k-space columns (phase encodes)")
    p.add_argument("--num_samples", type=int, default=2, help="K posterior samples per slice")
    p.add_argument(
        "--extra", type=str, default="", help="more flags for scripts/image_sample.py (space-separated)"
    )
    p.add_argument(
        "--work_dir", type=str, default="", help="where the file and outputs go ('' = a temp folder)"
    )
    p.add_argument(
        "--csv",
        type=str,
        default=os.path.join(REPO_ROOT, "results", "full_size.csv"),
        help="CSV to append to ('' = none)",
    )
    p.add_argument("--no_bart", action="store_true", help="skip the BART timing")
    p.add_argument("--units", action="store_true", help="only the unit costs (unit_costs), no full run")
    p.add_argument(
        "--model_path",
        type=str,
        # this repository's demo checkpoint (inference.DEMO_MODEL), spelled out: improved_diffusion may be
        # imported from an older checkout under test, whose DEMO_MODEL is another file or absent
        default=os.path.join(REPO_ROOT, "checkpoints", "demo", "ema_0.999_007000.pt"),
        help="diffusion checkpoint (config.json beside it), for the full run and --units",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = create_argparser()
    args = p.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="full_size_")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "full_size_knee.h5")
    if not os.path.exists(data):
        make_full_size_file(data, coils=args.coils, shape=(args.rows, args.cols))
    import improved_diffusion

    if args.units:
        costs = unit_costs(data, args.model_path, args.num_samples)
        print(f"unit CPU seconds ({improved_diffusion.__file__}):")
        for key, value in costs.items():
            print(f"  {key:22s} {value if isinstance(value, str) else f'{value:.3f}'}")
        return 0

    code = os.path.dirname(os.path.dirname(os.path.abspath(improved_diffusion.__file__)))
    image_sample = _import_script("image_sample", code)
    out_dir = os.path.join(work, "out_" + args.label)
    flags = ["--input", data, "--output_dir", out_dir, "--model_path", args.model_path]
    flags += ["--num_samples", str(args.num_samples)]
    flags += ["--overwrite", "True", "--png", "False", "--progress", "False"] + args.extra.split()
    # CPU seconds of this process, not wall time: the machine is shared, and with one thread the CPU time
    # of a stage is what it costs whatever else runs.
    prof = cProfile.Profile(time.process_time)
    cpu_start, wall_start = time.process_time(), time.time()
    prof.enable()
    rc = image_sample.main(flags)
    prof.disable()
    cpu_total, wall_total = time.process_time() - cpu_start, time.time() - wall_start
    if rc != 0:
        print(f"full_size: image_sample.py failed with status {rc}", file=sys.stderr)
        return rc
    stats = pstats.Stats(prof)
    stages = stage_seconds(stats)
    with h5py.File(os.path.join(out_dir, "full_size_knee.h5"), "r") as f:
        nfe = int(f.attrs["nfe"])
        seconds = float(f.attrs["seconds_per_slice"])
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        metrics = next(csv.DictReader(f))
    bart_s = None if args.no_bart else bart_seconds(data)
    print(
        f"code: {code}   threads: {torch.get_num_threads()}   "
        f"file: {args.coils} coils {args.rows}x{args.cols}"
    )
    print(f"script: {cpu_total:.1f} CPU s in {wall_total:.1f} s wall (model loading included)")
    print(f"{'stage (CPU seconds)':40s} {'seconds':>9s}")
    for label, _, _ in STAGES:
        print(f"{label:40s} {stages[label.strip()]:9.2f}")
    print(f"wall seconds per slice (script): {seconds:.2f}   NFE {nfe}   K {args.num_samples}")
    print(f"PSNR {float(metrics['psnr']):.2f} dB   SSIM {float(metrics['ssim']):.4f}")
    if bart_s is not None:
        ratio = stages["total"] / bart_s
        print(f"bart ecalib + pics: {bart_s:.2f} CPU s   ratio diffusion / BART (CPU): {ratio:.1f}")
    if args.csv:
        row = {
            "label": args.label,
            "code": code,
            "threads": torch.get_num_threads(),
            "coils": args.coils,
            "shape": f"{args.rows}x{args.cols}",
            "num_samples": args.num_samples,
            "nfe": nfe,
            "cpu_seconds_per_slice": f"{stages['total']:.2f}",
            "wall_seconds_per_slice": f"{seconds:.2f}",
            **{k.strip(): f"{v:.2f}" for k, v in stages.items() if k != "total"},
            "psnr": f"{float(metrics['psnr']):.2f}",
            "ssim": f"{float(metrics['ssim']):.4f}",
            "bart_cpu_seconds": "" if bart_s is None else f"{bart_s:.2f}",
            "ratio_to_bart": "" if bart_s is None else f"{stages['total'] / bart_s:.1f}",
        }
        new = not os.path.exists(args.csv)
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
