"""Masks: fastMRI equality, determinism, centre lines, acceleration, RNG hygiene, Poisson-disc masks."""

import numpy as np
import pytest
import torch

from improved_diffusion.mri.subsample import (
    EquispacedMaskFractionFunc,
    EquiSpacedMaskFunc,
    PoissonMaskFunc,
    RandomMaskFunc,
    apply_mask,
    create_mask_for_mask_type,
    effective_acceleration,
    seed_from_fname,
)

fastmri_subsample = pytest.importorskip("fastmri.data.subsample")

PAIRS = {
    "random": (RandomMaskFunc, "RandomMaskFunc"),
    "equispaced": (EquiSpacedMaskFunc, "EquiSpacedMaskFunc"),
    "equispaced_fraction": (EquispacedMaskFractionFunc, "EquispacedMaskFractionFunc"),
}
ARGS = [
    ([0.08], [4], False),
    ([0.04], [8], False),
    ([0.08, 0.04], [4, 8], False),
    ([0.08, 0.04, 0.1], [4, 8], True),
]
WIDTHS = [31, 32, 33, 127, 128, 320, 369]


def _columns(mask: torch.Tensor) -> np.ndarray:
    return mask.reshape(-1).numpy()


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("args", ARGS)
def test_same_columns_as_fastmri(name, args):
    ours_cls, theirs_name = PAIRS[name]
    theirs_cls = getattr(fastmri_subsample, theirs_name)
    cfs, accs, any_comb = args
    seeds = list(range(12)) + [
        seed_from_fname("file1000000.h5"),
        seed_from_fname("/d/file_brain_AXT2_200.h5"),
    ]
    for width in WIDTHS:
        ours = ours_cls(cfs, accs, seed=7, allow_any_combination=any_comb)
        theirs = theirs_cls(cfs, accs, allow_any_combination=any_comb, seed=7)
        for seed in seeds:
            mask_t, low_t = theirs((1, 20, width, 2), seed=seed)
            mask_o, low_o = ours((1, 20, width), seed=seed)
            assert mask_o.shape == (1, 1, width) and mask_o.dtype == torch.float32
            np.testing.assert_array_equal(
                _columns(mask_o), _columns(mask_t), err_msg=f"{name} W={width} {seed}"
            )
            assert low_o == low_t
        for _ in range(4):  # unseeded calls walk the private generator the same way
            np.testing.assert_array_equal(
                _columns(ours((20, width))[0]), _columns(theirs((1, 20, width, 2))[0])
            )
    # an explicit offset is honoured identically
    ours = ours_cls(cfs, accs, seed=1, allow_any_combination=any_comb)
    theirs = theirs_cls(cfs, accs, allow_any_combination=any_comb, seed=1)
    np.testing.assert_array_equal(
        _columns(ours((8, 64), offset=2, seed=3)[0]), _columns(theirs((1, 8, 64, 2), offset=2, seed=3)[0])
    )


def test_seed_from_fname_is_fastmri_tuple():
    assert seed_from_fname("file1000000.h5") == tuple(map(ord, "file1000000.h5"))
    assert seed_from_fname("/some/dir/file1000000.h5") == seed_from_fname("file1000000.h5")


@pytest.mark.parametrize("name", ["random", "equispaced", "equispaced_fraction"])
def test_determinism_and_global_rng_untouched(name):
    np.random.seed(123)
    torch.manual_seed(123)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    func = create_mask_for_mask_type(name, [0.08], [4])
    a, _ = func((4, 32, 64), seed=5)
    func((4, 32, 64))  # advance the private generator
    b, _ = func((4, 32, 64), seed=5)
    c, _ = create_mask_for_mask_type(name, [0.08], [4])((4, 32, 64), seed=5)
    assert torch.equal(a, b) and torch.equal(a, c)
    d1, _ = create_mask_for_mask_type(name, [0.08], [4], seed=9)((32, 64))
    d2, _ = create_mask_for_mask_type(name, [0.08], [4], seed=9)((32, 64))
    assert torch.equal(d1, d2)
    assert a.shape == (1, 1, 64)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("width", [127, 128, 320, 368])
def test_centre_lines_and_acceleration(width):
    for cf, acc in [(0.08, 4), (0.04, 8)]:
        num_low = round(width * cf)
        start = (width - num_low + 1) // 2
        for name in ["random", "equispaced", "equispaced_fraction"]:
            mask, low = create_mask_for_mask_type(name, [cf], [acc])((16, width), seed=0)
            cols = _columns(mask)
            assert low == num_low
            assert cols[start : start + num_low].all() and cols[width // 2] == 1
            assert set(np.unique(cols)) <= {0.0, 1.0}
            if name == "equispaced_fraction":  # matches the target column count closely
                assert abs(cols.sum() - width / acc) <= 2
            if name == "equispaced":  # nominal rate plus the centre block
                assert cols.sum() <= width / acc + num_low + 1
        # random: on average W / acc columns
        func = RandomMaskFunc([cf], [acc], seed=0)
        mean_cols = np.mean([_columns(func((16, width))[0]).sum() for _ in range(300)])
        assert abs(mean_cols - width / acc) < 0.05 * width / acc


def test_effective_acceleration_and_apply_mask():
    kspace = torch.randn(2, 3, 16, 40, dtype=torch.complex64)
    mask_func = EquiSpacedMaskFunc([0.1], [4])
    masked, mask, low = apply_mask(kspace, mask_func, seed=1)
    assert mask.shape == (1, 1, 1, 40) and low == 4
    assert torch.equal(masked, kspace * mask)
    assert (masked[..., _columns(mask) == 0] == 0).all()
    assert effective_acceleration(mask, kspace.shape) == pytest.approx(40 / _columns(mask).sum())
    assert effective_acceleration(mask) == pytest.approx(40 / _columns(mask).sum())
    assert effective_acceleration(torch.ones(8, 8)) == 1.0
    with pytest.raises(ValueError):
        effective_acceleration(torch.zeros(1, 8))
    with pytest.raises(ValueError):
        effective_acceleration(torch.ones(1, 8), (4, 9))


def test_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        RandomMaskFunc([0.08, 0.04], [4])
    with pytest.raises(ValueError, match="unknown mask type"):
        create_mask_for_mask_type("spiral", [0.08], [4])
    with pytest.raises(ValueError, match="center_fractions"):
        RandomMaskFunc([1.5], [4])
    with pytest.raises(ValueError, match="shape"):
        RandomMaskFunc([0.08], [4])((64,))
    with pytest.raises(ValueError, match="integer"):
        EquiSpacedMaskFunc([0.08], [2.5])((8, 64))
    with pytest.raises(ValueError, match="centre block"):
        EquispacedMaskFractionFunc([0.5], [4])((8, 64))


def test_poisson_mask():
    np.random.seed(7)
    torch.manual_seed(7)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    func = create_mask_for_mask_type("poisson", [0.08], [4])
    assert isinstance(func, PoissonMaskFunc)
    for shape in [(2, 64, 64), (63, 80)]:
        mask, low = func(shape, seed=3)
        height, width = shape[-2:]
        assert mask.shape == (height, width) and mask.dtype == torch.float32
        assert torch.equal(mask, func(shape, seed=3)[0])
        assert not torch.equal(mask, func(shape, seed=4)[0])
        calib_h, calib_w = round(height * 0.08), round(width * 0.08)
        assert low == calib_w
        top, left = height // 2 - calib_h // 2, width // 2 - calib_w // 2
        assert mask[top : top + calib_h, left : left + calib_w].all()
        assert mask[height // 2, width // 2] == 1
        assert abs(effective_acceleration(mask, shape) - 4) < 0.1
    mask_a, _ = func((64, 64), seed=seed_from_fname("file_a.h5"))
    mask_b, _ = func((64, 64), seed=seed_from_fname("file_a.h5"))
    assert torch.equal(mask_a, mask_b)
    masked, mask, _ = apply_mask(torch.ones(3, 64, 64, dtype=torch.complex64), func, seed=1)
    assert mask.shape == (64, 64) and torch.equal(masked.real, mask.expand(3, 64, 64))
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]
    assert torch.equal(torch.get_rng_state(), torch_state)
