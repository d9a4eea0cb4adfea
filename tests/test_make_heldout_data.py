"""Tests for datasets/make_heldout_data.py on a reduced build (every volume, 2 slices, 2 noise levels)."""

import os

import h5py
import numpy as np
import pytest
import torch
from tiny import load_module

from improved_diffusion.mri.fftc import ifft2c

heldout = load_module("datasets/make_heldout_data.py")
import kspace_simulation as sim  # noqa: E402  (beside the script, on sys.path since it ran)
import mni152  # noqa: E402

ARGS = ["--max_slices", "2", "--sigmas", "0.001,0.005", "--coils", "8,15", "--singlecoil_sigmas", "0.002"]
FOLDERS = {  # folder -> coils (0 = single-coil)
    "singlecoil_sigma0.002": 0,
    "multicoil8_sigma0.001": 8,
    "multicoil8_sigma0.005": 8,
    "multicoil15_sigma0.001": 15,
    "multicoil15_sigma0.005": 15,
}
NAMES_IN_ORDER = [f"heldout_{v.name}.h5" for v in heldout.VOLUMES]
NAMES = sorted(NAMES_IN_ORDER)


def _no_mni(*_, **__):
    raise AssertionError("the held-out builder must not load the MNI152 template")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds with the same seed (MNI loaders disabled during the first) and one with another seed."""
    import nilearn.datasets

    out = [tmp_path_factory.mktemp(f"heldout{i}") for i in range(3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nilearn.datasets, "load_mni152_template", _no_mni)
        mp.setattr(mni152, "load_template", _no_mni)
        assert heldout.main(ARGS + ["--output_dir", str(out[0]), "--no_progress"]) == 0
    # seeds are per volume and slice: a build of the first two volumes repeats those files exactly
    assert heldout.main(ARGS + ["--output_dir", str(out[1]), "--no_progress", "--max_volumes", "2"]) == 0
    other = ["--sigmas", "0.001", "--coils", "8", "--singlecoil_sigmas", "", "--max_slices", "2"]
    other += ["--output_dir", str(out[2]), "--no_progress", "--seed", "1", "--max_volumes", "1"]
    assert heldout.main(other) == 0
    return out


def _files(root):
    for folder, coils in FOLDERS.items():
        for name in NAMES:
            yield folder, coils, os.path.join(root, folder, name)


def test_layout_keys_shapes_dtypes(builds):
    root = builds[0]
    assert sorted(os.listdir(root)) == sorted([*FOLDERS, "manifest.json"])
    for folder, coils, path in _files(root):
        assert sorted(os.listdir(os.path.join(root, folder))) == NAMES
        with h5py.File(path, "r") as f:
            target_key = "reconstruction_rss" if coils else "reconstruction_esc"
            # no sens_maps: they must be estimated, as on a real scan
            assert sorted(f.keys()) == sorted(["kspace", target_key, "ismrmrd_header", "noise"])
            k, t, n = f["kspace"], f[target_key], f["noise"]
            slices = 1 if "t1_coronal" in path else 2
            assert k.dtype == np.complex64 and t.dtype == np.float32 and n.dtype == np.complex64
            assert k.shape == ((slices, 128, 128) if coils == 0 else (slices, coils, 128, 128))
            assert t.shape == (slices, 128, 128) and n.shape == (1024, max(coils, 1))
            a = f.attrs
            assert np.isclose(a["max"], t[()].max()) and np.isclose(a["norm"], np.linalg.norm(t[()]))
            assert a["noise_covariance"].shape == (max(coils, 1),) * 2
            level = float(folder.split("sigma")[1])
            assert a["noise_level"] == level and np.isclose(a["noise_std"], level * a["kspace_max"])
            assert a["coils"] == max(coils, 1) and a["patient_id"] == os.path.basename(path)[:-3]
            assert a["acquisition"] and "MNI" not in a["source"] and len(a["source_slices"]) == slices
            header = f["ismrmrd_header"][()].decode()
            assert "<x>128</x>" in header and f"<x>{a['fov_mm']:g}</x>" in header
    # the reconstruction scripts open the files and will estimate maps (none stored)
    from improved_diffusion.recon_inputs import MaskSpec, open_volume

    vol = open_volume(os.path.join(root, "multicoil8_sigma0.001", NAMES[0]), MaskSpec())
    assert vol.num_coils == 8 and not vol.has_maps and vol.target_key == "reconstruction_rss"


def test_deterministic(builds):
    """Same seed: bit-identical files (the reduced second build); another seed: other phase and noise."""
    first_two = NAMES_IN_ORDER[:2]
    for folder in FOLDERS:
        assert sorted(os.listdir(builds[1] / folder)) == sorted(first_two)
        for name in first_two:
            with (
                h5py.File(builds[0] / folder / name, "r") as a,
                h5py.File(builds[1] / folder / name, "r") as b,
            ):
                assert sorted(a.keys()) == sorted(b.keys()) and sorted(a.attrs) == sorted(b.attrs)
                for key in a.keys():
                    assert np.array_equal(a[key][()], b[key][()]), (folder, name, key)
                for key in a.attrs:
                    assert np.array_equal(a.attrs[key], b.attrs[key]), (folder, name, key)
    name = first_two[0]
    with (
        h5py.File(builds[0] / "multicoil8_sigma0.001" / name) as a,
        h5py.File(builds[2] / "multicoil8_sigma0.001" / name) as b,
    ):  # another seed: other phase and noise; the magnitude target changes only by k-space truncation
        assert not np.allclose(a["kspace"][()], b["kspace"][()])
        assert not np.allclose(a["noise"][()], b["noise"][()])
        ta, tb = a["reconstruction_rss"][()], b["reconstruction_rss"][()]
        assert 0 < np.linalg.norm(ta - tb) / np.linalg.norm(ta) < 0.05
    assert sorted(os.listdir(builds[2])) == ["manifest.json", "multicoil8_sigma0.001"]


def _highpass_unit(x):
    """Image minus its Gaussian blur (sigma 2 px), zero mean, unit norm, per image; float32."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(x, np.float64)
    x = x - gaussian_filter(x, (0, 2, 2))
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    return (x / np.linalg.norm(x, axis=(-2, -1), keepdims=True)).astype(np.float32)


def _bank_fft(bank):
    import scipy.fft

    return np.conj(scipy.fft.rfft2(_highpass_unit(bank)))


def _max_circular_ncc(images, bank_fft):
    """Per image: max over bank images and all circular shifts of the high-pass normalized correlation."""
    import scipy.fft

    f = scipy.fft.rfft2(_highpass_unit(images))
    return np.array([scipy.fft.irfft2(fi[None] * bank_fft, s=images.shape[-2:]).max() for fi in f])


def test_no_mni_template_image(builds):
    """The build ran with the MNI loaders disabled (fixture), and no target looks like an MNI section.

    The image check compares high-passed targets with MNI sections on the demo set's grid (every 3rd
    axial, coronal and sagittal section, 1.875 mm pixels) at every circular shift; it is not
    scale-invariant, the disabled loaders are what rule out the template at any scale.
    """
    from scipy.ndimage import zoom

    vol = mni152.load_template()  # (z, AP, LR), 1 mm, max 1
    sections = [vol[z] for z in range(1, vol.shape[0], 3)]
    sections += [vol[:, y, :][::-1] for y in range(1, vol.shape[1], 3)]  # coronal
    sections += [vol[:, :, x][::-1] for x in range(1, vol.shape[2], 3)]  # sagittal
    bank = np.stack([zoom(sim.pad_to_fov(s), 128 / sim.FOV, order=1) for s in sections])
    bank = bank[(bank > 0.2).mean(axis=(1, 2)) > 0.05]  # sections with tissue
    bank_fft = _bank_fft(bank)
    targets = []  # the targets differ between folders only by coil count (same images, same phases)
    for folder, key in (
        ("singlecoil_sigma0.002", "reconstruction_esc"),
        ("multicoil8_sigma0.001", "reconstruction_rss"),
    ):
        for name in NAMES:
            with h5py.File(builds[0] / folder / name, "r") as f:
                targets.append(f[key][()])
    worst = _max_circular_ncc(np.concatenate(targets), bank_fft).max()
    print(f"held-out vs MNI: max high-pass NCC {worst:.3f}")
    assert worst < 0.5, worst  # measured 0.28
    # the check has teeth: an MNI section that is not in the bank, through the held-out simulation
    # (its phase, spline resampling, k-space crop) on the demo's field of view, scores high
    z = 62
    r, c = vol.shape[1:]
    box = (-((sim.FOV - r) // 2), -((sim.FOV - c) // 2), sim.FOV)
    fine = heldout.to_fine_grid(vol[z], box)[None]
    clean = heldout.noiseless_kspace(fine, [z], seed=0, v=0, coil_maps=None)
    _, mni_target = sim.target_from_kspace(clean)
    teeth = _max_circular_ncc(mni_target, bank_fft)[0]
    print(f"MNI section {z} through the held-out simulation: {teeth:.3f}")
    assert teeth > 0.7


def test_noise_samples_have_the_stated_covariance(builds):
    for _, coils, path in _files(builds[0]):
        if not coils:
            continue
        with h5py.File(path, "r") as f:
            noise = f["noise"][()].astype(np.complex128)
            psi = f.attrs["noise_covariance"]
            std = f.attrs["noise_std"]
        assert np.allclose(psi, psi.conj().T) and np.linalg.eigvalsh(psi).min() > 0
        stds = np.sqrt(np.real(np.diag(psi)))
        assert np.isclose(stds.mean(), std)  # noise_std: mean per-coil complex std
        assert stds.max() / stds.min() <= 2 + 1e-9  # scales drawn in 0.7-1.4, then divided by their mean
        corr = np.real(psi) / np.outer(stds, stds)
        off = corr[~np.eye(coils, dtype=bool)]
        assert off.min() >= 0.1 - 1e-9 and off.max() <= 0.3 + 1e-9  # drawn in 0.1-0.3, no shrinking needed
        cov = noise.T @ noise.conj() / len(noise)  # E[n n^H], coils x coils
        est = np.sqrt(np.real(np.diag(cov)))
        assert np.all(np.abs(est / stds - 1) < 0.2), (path, est / stds)
        assert abs(np.abs(cov - psi).max() / np.abs(psi).max()) < 0.2
        est_corr = np.real(cov) / np.outer(est, est)
        assert abs(est_corr[~np.eye(coils, dtype=bool)].mean() - off.mean()) < 0.05


def test_kspace_corner_noise_matches_sigma(builds):
    c = 8  # 8 x 8 blocks at the four corners of k-space
    for _, coils, path in _files(builds[0]):
        with h5py.File(path, "r") as f:
            k = f["kspace"][()]
            std, psi = f.attrs["noise_std"], f.attrs["noise_covariance"]
        if not coils:
            k = k[:, None]
        corners = np.concatenate(
            [k[..., :c, :c], k[..., :c, -c:], k[..., -c:, :c], k[..., -c:, -c:]], axis=-1
        )  # (slices, coils, c, 4c)
        per_coil = np.sqrt((np.abs(corners) ** 2).mean(axis=(0, 2, 3)))
        assert abs(per_coil.mean() / std - 1) < 0.15, (path, per_coil.mean() / std)
        assert np.all(np.abs(per_coil / np.sqrt(np.real(np.diag(psi))) - 1) < 0.35), path


def test_target_is_the_noiseless_image(builds):
    """E|ifft2c(k)|^2 = target^2 + noise power: the target is the noiseless |image| / RSS of this k-space."""
    root = builds[0]
    for folder, coils, path in _files(root):
        with h5py.File(path, "r") as f:
            k = f["kspace"][()]
            target = f["reconstruction_rss" if coils else "reconstruction_esc"][()].astype(np.float64)
            power = float(np.real(np.trace(f.attrs["noise_covariance"])))
        images = ifft2c(torch.from_numpy(k)).numpy()
        sq = np.abs(images) ** 2 if not coils else (np.abs(images) ** 2).sum(axis=1)
        excess = (sq - target**2).mean()
        tol = 0.25 if "0.001" in folder else 0.1  # the signal-noise cross term averages out less at low noise
        assert abs(excess / power - 1) < tol, (path, excess / power)
    # single-coil target: the source magnitude on the 128 grid; multi-coil: it times the coils' RSS
    from scipy.ndimage import zoom

    def coarse(x):
        return zoom(x, 128 / sim.FOV, order=1)

    gain = coarse(np.sqrt((np.abs(sim.birdcage_maps(8)) ** 2).sum(axis=0)))
    for vol in heldout.VOLUMES:
        stack, source_idx = vol.load()
        stack = np.clip(stack, 0, None) / stack.max()
        box = heldout.square_box(stack)
        with h5py.File(root / "singlecoil_sigma0.002" / f"heldout_{vol.name}.h5") as f:
            esc = f["reconstruction_esc"][()]
            picked = list(f.attrs["source_slices"])
        with h5py.File(root / "multicoil8_sigma0.005" / f"heldout_{vol.name}.h5") as f:
            rss = f["reconstruction_rss"][()]
        for i, s in enumerate(picked):
            ref = coarse(heldout.to_fine_grid(stack[source_idx.index(s)], box))
            ncc = np.corrcoef(ref.ravel(), esc[i].ravel())[0, 1]
            assert ncc > 0.97, (vol.name, s, ncc)
            tissue = esc[i] > 0.1 * esc[i].max()
            rel = np.linalg.norm((rss[i] - esc[i] * gain)[tissue]) / np.linalg.norm(rss[i][tissue])
            assert rel < 0.05, (vol.name, s, rel)


def test_bad_input_is_one_clear_line(capsys, tmp_path):
    for argv, message in (
        (["--max_slices", "0"], "--max_slices must be >= 1, got 0"),
        (["--coils", "1"], "--coils: multi-coil needs >= 2 coils"),
        (["--sigmas", "-0.1"], "--sigmas: noise levels must be in [0, 1)"),
        (["--sigmas", "", "--singlecoil_sigmas", ""], "nothing to build"),
    ):
        assert heldout.main(argv + ["--output_dir", str(tmp_path / "x"), "--no_progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("make_heldout_data: error: ") and message in err[0], err
    for argv, message in (
        (["--sigmas", "0.001,abc"], "expected comma-separated numbers"),
        (["--bogus"], "bogus"),
    ):
        with pytest.raises(SystemExit) as exc:
            heldout.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("make_heldout_data: error: ")
        assert message in err[0], err
    parser = heldout.create_argparser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_helpers():
    assert heldout.pick_slices(10, 6) == [0, 2, 4, 5, 7, 9] and heldout.pick_slices(3, 6) == [0, 1, 2]
    assert heldout.pick_slices(14, None) == list(range(14))
    for coils in (2, 8, 15, 32):
        psi = heldout.coil_noise_covariance(coils, np.random.default_rng(coils))
        assert np.linalg.eigvalsh(psi).min() > 0 and np.isclose(np.sqrt(np.diag(psi).real).mean(), 1)
