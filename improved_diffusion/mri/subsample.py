"""Cartesian undersampling masks with fastMRI's semantics, plus a 2-D Poisson-disc mask.

Layout: k-space here is a complex tensor ``(..., H, W)``; the phase-encode direction (the one that is
undersampled) is the last dimension ``W``. A column mask therefore has shape ``(1, ..., 1, W)`` and
broadcasts against the k-space it was made for (fastMRI stores k-space as ``(..., H, W, 2)`` real and puts
its columns in dim -2; the selected columns are the same).

Column selection follows ``fastmri.data.subsample`` (v0.3.0) draw for draw, so that for the same shape,
arguments and seed the same columns are chosen (checked in tests/test_subsample.py):

1. one ``(center_fraction, acceleration)`` pair is drawn with ``rng.randint(len(center_fractions))``
   (with ``allow_any_combination`` each is drawn independently with ``rng.choice``);
2. ``num_low_frequencies = round(W * center_fraction)`` centre columns are always kept, starting at
   ``(W - num_low_frequencies + 1) // 2`` (so the DC column ``W // 2`` is inside);
3. the outer columns are drawn by the subclass (random / equispaced / equispaced with fraction matching).

Randomness comes only from a private ``np.random.RandomState`` (``seed`` in the constructor); a ``seed``
passed to ``__call__`` gives a mask that depends on that seed alone and leaves the private generator where
it was, exactly like fastMRI's ``temp_seed``. The global numpy and torch generators are never touched.
"""

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

Seed = Optional[Union[int, Tuple[int, ...]]]

MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "poisson")


def seed_from_fname(fname: str) -> Tuple[int, ...]:
    """fastMRI's per-file validation seed: the character codes of the file's base name.

    fastMRI seeds validation masks with ``tuple(map(ord, fname))`` where ``fname`` is the h5 file name
    without its folder (``file1000000.h5``); a path is reduced to that base name here. The result is a
    tuple (not an int) because numpy seeds a tuple differently from any single int, and the tuple is
    what reproduces fastMRI's validation masks. Pass it as ``seed=`` to any mask function.
    """
    name = os.path.basename(str(fname))
    if not name:
        raise ValueError(f"seed_from_fname: empty file name in {fname!r}")
    return tuple(map(ord, name))


def _check_choices(center_fractions: Sequence[float], accelerations: Sequence[float], any_comb: bool) -> None:
    if len(center_fractions) == 0 or len(accelerations) == 0:
        raise ValueError("center_fractions and accelerations must each hold at least one value")
    if len(center_fractions) != len(accelerations) and not any_comb:
        raise ValueError(
            f"center_fractions ({len(center_fractions)} values) and accelerations ({len(accelerations)}) "
            "must have the same length unless allow_any_combination=True"
        )
    for cf in center_fractions:
        if not 0.0 < float(cf) <= 1.0:
            raise ValueError(f"center_fractions must lie in (0, 1], got {cf}")
    for acc in accelerations:
        if not float(acc) >= 1.0:
            raise ValueError(f"accelerations must be >= 1, got {acc}")


def _check_shape(shape: Sequence[int], min_dims: int = 2) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < min_dims or any(s < 1 for s in shape):
        raise ValueError(f"mask shape must be a k-space shape (..., H, W) with positive sizes, got {shape}")
    return shape


class MaskFunc:
    """Base class for column (1-D, GRAPPA-style) masks: centre block + outer columns.

    Args:
        center_fractions: fraction of columns kept as a fully sampled centre block; one value is used per
            mask, chosen uniformly (paired with ``accelerations`` by position).
        accelerations: nominal undersampling factors, same length as ``center_fractions``.
        seed: seed of the private generator used when ``__call__`` gets no seed.
        allow_any_combination: draw centre fraction and acceleration independently (fastMRI's option).
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        seed: Seed = None,
        allow_any_combination: bool = False,
    ):
        center_fractions, accelerations = list(center_fractions), list(accelerations)
        _check_choices(center_fractions, accelerations, allow_any_combination)
        self.center_fractions = center_fractions
        self.accelerations = accelerations
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState(seed)

    def _rng_for(self, seed: Seed) -> np.random.RandomState:
        # A fresh generator for an explicit seed is equivalent to fastMRI's reseed-then-restore.
        return self.rng if seed is None else np.random.RandomState(seed)

    def choose_acceleration(self, rng: np.random.RandomState) -> Tuple[float, float]:
        """Draw one (center_fraction, acceleration) pair, consuming the generator like fastMRI."""
        if self.allow_any_combination:
            return float(rng.choice(self.center_fractions)), rng.choice(self.accelerations).item()
        i = rng.randint(len(self.center_fractions))
        return float(self.center_fractions[i]), self.accelerations[i]

    def __call__(
        self, shape: Sequence[int], offset: Optional[int] = None, seed: Seed = None
    ) -> Tuple[torch.Tensor, int]:
        """Sample a column mask for k-space of ``shape``.

        Args:
            shape: k-space shape ``(..., H, W)``; columns are the last dimension.
            offset: first outer column for equispaced masks (drawn at random when None).
            seed: int or tuple seed for this mask only (see :func:`seed_from_fname`).

        Returns:
            ``(mask, num_low_frequencies)``: float32 tensor of shape ``(1, ..., 1, W)`` holding 0/1, and the
            number of fully sampled centre columns.
        """
        shape = _check_shape(shape)
        num_cols = shape[-1]
        rng = self._rng_for(seed)
        center_fraction, acceleration = self.choose_acceleration(rng)
        num_low = int(round(num_cols * center_fraction))
        columns = np.zeros(num_cols, dtype=np.float32)
        start = (num_cols - num_low + 1) // 2
        columns[start : start + num_low] = 1.0
        outer = self.outer_columns(rng, num_cols, acceleration, offset, num_low)
        columns = np.maximum(columns, outer.astype(np.float32))
        mask = torch.from_numpy(columns).reshape((1,) * (len(shape) - 1) + (num_cols,))
        return mask, num_low

    def outer_columns(
        self,
        rng: np.random.RandomState,
        num_cols: int,
        acceleration: float,
        offset: Optional[int],
        num_low: int,
    ) -> np.ndarray:
        """Boolean/0-1 vector (W,) of the columns sampled outside (or across) the centre block."""
        raise NotImplementedError


class RandomMaskFunc(MaskFunc):
    """Centre block + every other column kept independently with probability
    ``(W / acceleration - num_low) / (W - num_low)``, so that ``W / acceleration`` columns are kept on
    average (fastMRI's ``RandomMaskFunc``; the knee default is 4x with centre fraction 0.08)."""

    def outer_columns(self, rng, num_cols, acceleration, offset, num_low):
        # fastMRI always draws W uniforms, whatever the probability; keep the stream identical.
        draws = rng.uniform(size=num_cols)
        if num_low >= num_cols:
            return np.zeros(num_cols, dtype=bool)
        prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
        return draws < prob


class EquiSpacedMaskFunc(MaskFunc):
    """Centre block + every ``acceleration``-th column from ``offset`` (fastMRI's ``EquiSpacedMaskFunc``).

    The centre block comes on top, so the effective acceleration is below the nominal one. ``offset`` is
    drawn from ``[0, acceleration)`` when not given. Accelerations must be integers.
    """

    def outer_columns(self, rng, num_cols, acceleration, offset, num_low):
        if float(acceleration) != int(acceleration):
            raise ValueError(f"EquiSpacedMaskFunc needs integer accelerations, got {acceleration}")
        step = int(acceleration)
        if offset is None:
            offset = rng.randint(0, high=step)
        if not 0 <= offset < num_cols:
            raise ValueError(f"offset must lie in [0, {num_cols}), got {offset}")
        columns = np.zeros(num_cols, dtype=np.float32)
        columns[offset::step] = 1.0
        return columns


class EquispacedMaskFractionFunc(MaskFunc):
    """Centre block + roughly equispaced outer columns with the spacing stretched so that about
    ``W / acceleration`` columns are kept in total (fastMRI's ``EquispacedMaskFractionFunc``, the one used
    for the public multi-coil brain data; the brain default is 8x with centre fraction 0.04).

    The spacing is ``acceleration * (num_low - W) / (num_low * acceleration - W)``; positions
    ``offset, offset + spacing, ...`` below ``W - 1`` are rounded half-to-even, so the spacing is not
    exactly constant (fastMRI issue #54, kept to match the public data).
    """

    def outer_columns(self, rng, num_cols, acceleration, offset, num_low):
        denominator = num_low * acceleration - num_cols
        if denominator >= 0:
            raise ValueError(
                f"equispaced_fraction: the centre block ({num_low} of {num_cols} columns) already reaches "
                f"1/{acceleration} of the columns; use a smaller center fraction or a lower acceleration"
            )
        spacing = acceleration * (num_low - num_cols) / denominator
        if offset is None:
            offset = rng.randint(0, high=round(spacing))
        if not 0 <= offset < num_cols:
            raise ValueError(f"offset must lie in [0, {num_cols}), got {offset}")
        positions = np.round(np.arange(offset, num_cols - 1, spacing)).astype(np.int64)
        columns = np.zeros(num_cols, dtype=np.float32)
        columns[positions] = 1.0
        return columns


class PoissonMaskFunc(MaskFunc):
    """2-D variable-density Poisson-disc mask (``sigpy.mri.poisson``) with a fully sampled centre square.

    The calibration region is ``round(H * cf) x round(W * cf)`` around the k-space centre for the chosen
    centre fraction ``cf``; sigpy tunes the density slope until the whole mask (calibration included)
    reaches the requested acceleration within ``tol`` (absolute), and the corners beyond the inscribed
    ellipse are left empty. Returns an ``(H, W)`` mask, which broadcasts against ``(..., H, W)`` k-space.

    Reference: Bridson, "Fast Poisson disk sampling in arbitrary dimensions", SIGGRAPH sketches 2007
    (as implemented by sigpy); variable density as in Lustig et al., "Sparse MRI", MRM 2007.
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        seed: Seed = None,
        allow_any_combination: bool = False,
        tol: float = 0.1,
    ):
        super().__init__(center_fractions, accelerations, seed, allow_any_combination)
        for acc in self.accelerations:
            if not float(acc) > 1.0:
                raise ValueError(f"PoissonMaskFunc needs accelerations > 1, got {acc}")
        self.tol = tol

    def __call__(
        self, shape: Sequence[int], offset: Optional[int] = None, seed: Seed = None
    ) -> Tuple[torch.Tensor, int]:
        """Sample a 2-D mask for k-space of ``shape`` ``(..., H, W)``.

        Returns:
            ``(mask, num_low_frequencies)``: float32 0/1 tensor ``(H, W)`` and the calibration width in
            columns. ``offset`` is ignored (there is no equispaced grid).
        """
        import sigpy.mri  # lazy: sigpy (numba) import costs seconds and only this mask needs it

        shape = _check_shape(shape)
        height, width = shape[-2:]
        rng = self._rng_for(seed)
        center_fraction, acceleration = self.choose_acceleration(rng)
        calib = (int(round(height * center_fraction)), int(round(width * center_fraction)))
        # sigpy wants an int seed; derive one from our generator so int and tuple seeds both work.
        sigpy_seed = int(rng.randint(0, 2**31 - 1))
        try:
            # sigpy saves and restores the global numpy state when given a seed; its sampler draws from
            # numba's own generator.
            mask = sigpy.mri.poisson(
                (height, width),
                float(acceleration),
                calib=calib,
                dtype=np.float32,
                seed=sigpy_seed,
                tol=self.tol,
            )
        except ValueError as err:
            raise ValueError(
                f"PoissonMaskFunc: cannot reach acceleration {acceleration} on a {height}x{width} grid "
                f"with a {calib[0]}x{calib[1]} calibration region ({err})"
            ) from err
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)), calib[1]


def create_mask_for_mask_type(
    mask_type: str,
    center_fractions: Sequence[float],
    accelerations: Sequence[float],
    seed: Seed = None,
) -> MaskFunc:
    """Mask function by name: ``random``, ``equispaced``, ``equispaced_fraction`` or ``poisson``."""
    classes = {
        "random": RandomMaskFunc,
        "equispaced": EquiSpacedMaskFunc,
        "equispaced_fraction": EquispacedMaskFractionFunc,
        "poisson": PoissonMaskFunc,
    }
    if mask_type not in classes:
        raise ValueError(f"unknown mask type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    return classes[mask_type](center_fractions, accelerations, seed=seed)


def effective_acceleration(
    mask: Union[torch.Tensor, np.ndarray], shape: Optional[Sequence[int]] = None
) -> float:
    """Total number of k-space points over the number of sampled points.

    Args:
        mask: column mask ``(1, ..., 1, W)`` or 2-D mask ``(H, W)`` (nonzero = sampled).
        shape: k-space shape ``(..., H, W)`` the mask is applied to (the mask must broadcast to it);
            defaults to the mask's own shape (for a column mask the ratio does not depend on H).
    """
    m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)) != 0
    target = tuple(int(s) for s in shape) if shape is not None else m.shape
    try:
        sampled = np.broadcast_to(m, target)
    except ValueError as err:
        raise ValueError(
            f"effective_acceleration: mask {m.shape} does not broadcast to shape {target}"
        ) from err
    num_sampled = int(sampled.sum())
    if num_sampled == 0:
        raise ValueError("effective_acceleration: the mask samples no k-space point")
    return float(sampled.size / num_sampled)


def apply_mask(
    kspace: torch.Tensor, mask_func: MaskFunc, seed: Seed = None, offset: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Undersample k-space ``(..., H, W)`` (complex) with a mask drawn for its shape.

    Returns:
        ``(masked_kspace, mask, num_low_frequencies)``; ``mask`` is on ``kspace``'s device, shaped
        ``(1, ..., 1, W)`` for column masks or ``(H, W)`` for 2-D masks. Unsampled entries are exactly +0.
    """
    if kspace.dim() < 2:
        raise ValueError(f"apply_mask: kspace must be (..., H, W), got shape {tuple(kspace.shape)}")
    mask, num_low = mask_func(tuple(kspace.shape), offset=offset, seed=seed)
    mask = mask.to(kspace.device)
    # "+ 0.0" turns the -0 of negative entries times 0 into +0, as fastMRI does.
    return kspace * mask + 0.0, mask, num_low
