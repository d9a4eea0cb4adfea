"""Seeded augmentation of complex MR training images, and random patches.

Every function takes a complex image ``(H, W)`` or its 2-channel form ``(2, H, W)`` (real, imaginary;
:func:`~improved_diffusion.mri.fftc.complex_to_channels`) and returns the same type and shape. Real and
imaginary parts are always transformed together: geometric transforms resample the complex values (so
``|x|`` and the phase move with the anatomy), the phase augmentation multiplies by ``exp(i phi)``, the bias
field multiplies by a positive real field, the noise is circular complex Gaussian.

Augmentations (names of ``--augment``), applied in this order:

========== ============================================================================================
``flip``    with probability p: up-down, left-right or both (1/3 each); exact
``rot90``   rotation by k x 90 degrees, k uniform in {1, 2, 3} (exact; k = 2 only for non-square images,
            so shapes are kept)
``rotate``  small rotation, angle uniform in [-rotate_deg, rotate_deg]
``scale``   isotropic zoom, factor log-uniform in [1 / (1 + scale), 1 + scale]
``elastic`` smooth random displacement field: N(0, elastic_px^2) pixels at an ``elastic_grid`` x
            ``elastic_grid`` grid of control points, bicubically interpolated (Simard et al., ICDAR 2003,
            with a control-point grid instead of a Gaussian-filtered field)
``bias``    smooth multiplicative bias field ``exp(b - mean b)``, b a 2nd-order polynomial over the field
            of view with N(0, bias^2) coefficients (a receive-coil shading)
``phase``   ``x * exp(i phi)``, phi = offset uniform in [-pi, pi) + 2nd-order polynomial with
            N(0, phase^2) coefficients (as datasets/make_demo_data.py simulates)
``noise``   complex Gaussian noise, standard deviation uniform in [0, noise] (E|n|^2 = sigma^2), in the
            units of the image (the normalized image / scale during training)
``gain``    intensity times a factor log-uniform in [1 / (1 + gain), 1 + gain]: reconstruction estimates the
            intensity scale from the sampled k-space centre only, so the normalized peak it gives the network
            varies from slice to slice (transforms.scale_from_kspace); training with a gain teaches the
            prior that range
========== ============================================================================================

``rotate``, ``scale`` and ``elastic`` are composed into one sampling grid and resampled once (bicubic;
points outside the field of view are mirrored back into it). A random patch (``patch_size`` > 0) is cut last.

Determinism: the random numbers of one sample come from ``numpy.random.default_rng`` seeded with
``(seed, stream, epoch, crc32(file name), slice index, augmentation)``; they never touch the global numpy
or torch generators, and do not depend on the number of DataLoader workers or on which rank reads the file
(only on the file's base name and slice). Each augmentation has its own generator, so switching one on or
off leaves the draws of the others unchanged.
"""

import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .mri.fftc import channels_to_complex, complex_to_channels

# The names of --augment in the order they are applied; each with its default probability.
AUGMENTATIONS: Tuple[str, ...] = (
    "flip",
    "rot90",
    "rotate",
    "scale",
    "elastic",
    "bias",
    "phase",
    "noise",
    "gain",
)
DEFAULT_PROBABILITY: Dict[str, float] = {
    "flip": 0.5,
    "rot90": 0.5,
    "rotate": 0.5,
    "scale": 0.5,
    "elastic": 0.5,
    "bias": 0.5,
    "phase": 1.0,  # MR phase is arbitrary: a random smooth phase costs nothing and is always plausible
    "noise": 0.5,
    "gain": 1.0,
}
_PATCH = len(AUGMENTATIONS)  # generator index of the patch position

Image = torch.Tensor  # complex (H, W) or real (2, H, W)


@dataclass(frozen=True)
class AugmentConfig:
    """What to augment and how strongly.

    Attributes:
        probabilities: ``((name, p), ...)`` for the augmentations that are on (others are off); see
            :func:`parse_augment` for the ``--augment`` syntax.
        rotate_deg: largest angle of ``rotate``, degrees.
        scale: ``scale`` zooms by a factor in [1 / (1 + scale), 1 + scale].
        elastic_px: standard deviation of the ``elastic`` displacement at its control points, pixels.
        elastic_grid: control points per side of the ``elastic`` field (>= 2; fewer = smoother).
        bias: standard deviation of the log bias-field polynomial coefficients.
        phase: standard deviation of the phase polynomial coefficients, radians.
        noise: largest noise standard deviation, image units.
        gain: ``gain`` multiplies by a factor in [1 / (1 + gain), 1 + gain].
        patch_size: side of a random square patch cut after augmentation; 0 keeps the whole image.
        seed: base seed of every draw (>= 0).
    """

    probabilities: Tuple[Tuple[str, float], ...] = ()
    rotate_deg: float = 10.0
    scale: float = 0.15
    elastic_px: float = 2.0
    elastic_grid: int = 5
    bias: float = 0.3
    phase: float = 1.0
    noise: float = 0.02
    gain: float = 1.0
    patch_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        probs = dict(self.probabilities)
        for name, p in probs.items():
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"augmentation {name}: probability must be in [0, 1], got {p}")
        # one canonical order, so equal configs compare (and print) equal
        ordered = tuple((n, float(probs[n])) for n in AUGMENTATIONS if n in probs)
        object.__setattr__(self, "probabilities", ordered)
        for name in ("rotate_deg", "scale", "elastic_px", "bias", "phase", "noise", "gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"augment {name} must be a finite number >= 0, got {value!r}")
        if self.rotate_deg > 180:
            raise ValueError(f"augment rotate_deg must be <= 180, got {self.rotate_deg}")
        if not (isinstance(self.elastic_grid, int) and self.elastic_grid >= 2):
            raise ValueError(f"augment elastic_grid must be an int >= 2, got {self.elastic_grid!r}")
        if not (isinstance(self.patch_size, int) and self.patch_size >= 0):
            raise ValueError(f"patch_size must be an int >= 0 (0: whole slices), got {self.patch_size!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"augment seed must be an int >= 0, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        """True when anything changes the images (an augmentation with p > 0 or a patch)."""
        return self.patch_size > 0 or any(p > 0 for _, p in self.probabilities)

    def probability(self, name: str) -> float:
        return dict(self.probabilities).get(name, 0.0)


def parse_augment(spec: str) -> Tuple[Tuple[str, float], ...]:
    """``--augment`` text -> ``((name, p), ...)``.

    ``"none"`` or ``""``: nothing; ``"all"``: every augmentation at its default probability;
    otherwise a comma list of names, each optionally with its probability: ``"flip,rot90,elastic:0.3"``.
    ``all`` can be combined with overrides: ``"all,noise:0"``.

    Raises:
        ValueError: an unknown name, a malformed or out-of-range probability.
    """
    out: Dict[str, float] = {}
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        name, sep, prob = item.partition(":")
        name = name.strip().lower()
        if name == "none" and not sep:
            continue
        if name == "all" and not sep:
            out.update(DEFAULT_PROBABILITY)
            continue
        if name not in AUGMENTATIONS:
            raise ValueError(
                f"--augment: unknown augmentation {name!r}; choose from none, all, {', '.join(AUGMENTATIONS)}"
            )
        if sep:
            try:
                p = float(prob)
            except ValueError:
                raise ValueError(f"--augment: {item!r}: expected name:probability, e.g. {name}:0.5") from None
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"--augment: {item!r}: probability must be in [0, 1]")
        else:
            p = DEFAULT_PROBABILITY[name]
        out[name] = p
    return tuple((n, out[n]) for n in AUGMENTATIONS if n in out)


def sample_key(config: AugmentConfig, stream: int, epoch: int, fname: str, slice_idx: int) -> Tuple[int, ...]:
    """The seed entropy of one sample: ``(seed, stream, epoch, crc32(base name), slice_idx)``."""
    name = str(fname).replace("\\", "/").rsplit("/", 1)[-1]
    key = (config.seed, int(stream), int(epoch), zlib.crc32(name.encode()), int(slice_idx))
    if min(key) < 0:
        raise ValueError(f"augmentation key {key} has a negative entry (seed, stream, epoch, slice)")
    return key


def _rng(key: Sequence[int], which: int) -> np.random.Generator:
    return np.random.default_rng([*key, which])


# ----------------------------------------------------------------------------------------------------------
# Deterministic building blocks (all randomness is passed in).


def _as_channels(x: Image) -> Tuple[torch.Tensor, bool]:
    if x.is_complex():
        if x.ndim != 2:
            raise ValueError(f"complex images must be (H, W), got shape {tuple(x.shape)}")
        return complex_to_channels(x), True
    if x.ndim != 3 or x.shape[0] != 2:
        raise ValueError(f"real images must be (2, H, W) (real, imaginary), got shape {tuple(x.shape)}")
    return x, False


def _back(x: torch.Tensor, was_complex: bool) -> Image:
    return channels_to_complex(x) if was_complex else x.contiguous()


def flip(x: Image, rows: bool, cols: bool) -> Image:
    """Flip the image upside down (``rows``) and/or left-right (``cols``); exact."""
    dims = [d for d, on in ((-2, rows), (-1, cols)) if on]
    return torch.flip(x, dims) if dims else x


def rot90(x: Image, k: int) -> Image:
    """Rotate by ``k`` x 90 degrees (counter-clockwise, as ``torch.rot90``); exact."""
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _coords(h: int, w: int, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates relative to the image centre ((h - 1) / 2, (w - 1) / 2): (y, x), each (h, w)."""
    y = torch.arange(h, dtype=dtype) - (h - 1) / 2
    x = torch.arange(w, dtype=dtype) - (w - 1) / 2
    return torch.meshgrid(y, x, indexing="ij")


def _unit_coords(h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, x) in [-1, 1] over the field of view, each (h, w)."""
    y, x = _coords(h, w)
    return y / max((h - 1) / 2, 1), x / max((w - 1) / 2, 1)


def warp(x: Image, displacement: torch.Tensor) -> Image:
    """Resample ``x`` at ``p + displacement(p)`` (pixel units, (2, H, W) as (dy, dx)); bicubic.

    Real and imaginary channels are interpolated with the same weights, i.e. complex interpolation. Points
    outside the field of view are mirrored back into it (reflection padding), so a zoomed-out or rotated
    image keeps its background noise up to the edges instead of a zero border.
    """
    ch, was_complex = _as_channels(x)
    h, w = ch.shape[-2:]
    if displacement.shape != (2, h, w):
        raise ValueError(f"displacement must be (2, {h}, {w}), got {tuple(displacement.shape)}")
    y, x_ = _coords(h, w)
    sy = y + displacement[0].to(y.dtype)
    sx = x_ + displacement[1].to(y.dtype)
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([sx / max((w - 1) / 2, 1), sy / max((h - 1) / 2, 1)], dim=-1)
    out = F.grid_sample(
        ch[None].float(), grid[None], mode="bicubic", padding_mode="reflection", align_corners=True
    )[0].to(ch.dtype)
    return _back(out, was_complex)


def affine_displacement(shape: Tuple[int, int], angle_deg: float = 0.0, zoom: float = 1.0) -> torch.Tensor:
    """Displacement (2, H, W) of a rotation by ``angle_deg`` and a zoom by ``zoom`` about the image centre.

    The output pixel ``p`` samples the input at ``R(-angle) p / zoom`` (centre-relative), so the anatomy turns
    by ``angle_deg`` (counter-clockwise on screen, row 0 at the top) and grows by ``zoom``.
    """
    if zoom <= 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    y, x = _coords(*shape)
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    # counter-clockwise on screen with rows pointing down: x' = c x + s y, y' = -s x + c y; inverse below
    src_x = (c * x - s * y) / zoom
    src_y = (s * x + c * y) / zoom
    return torch.stack([src_y - y, src_x - x])


def elastic_displacement(
    rng: np.random.Generator, shape: Tuple[int, int], px: float, grid: int
) -> torch.Tensor:
    """Smooth random displacement (2, H, W): N(0, px^2) at ``grid`` x ``grid`` control points, bicubic."""
    coarse = torch.from_numpy(rng.standard_normal((1, 2, grid, grid)).astype(np.float32)) * px
    return F.interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=True)[0]


def _poly(shape: Tuple[int, int], c: np.ndarray) -> torch.Tensor:
    """c[0] x + c[1] y + c[2] x^2 + c[3] y^2 + c[4] x y over [-1, 1]^2."""
    y, x = _unit_coords(*shape)
    c = [float(v) for v in c]
    return c[0] * x + c[1] * y + c[2] * x**2 + c[3] * y**2 + c[4] * x * y


def smooth_phase(rng: np.random.Generator, shape: Tuple[int, int], strength: float) -> torch.Tensor:
    """(H, W) phase map, radians: uniform offset in [-pi, pi) + polynomial with N(0, strength^2) terms."""
    offset = rng.uniform(-math.pi, math.pi)
    return offset + _poly(shape, strength * rng.standard_normal(5))


def apply_phase(x: Image, phi: torch.Tensor) -> Image:
    """``x * exp(i phi)``: a pure phase change, ``|x|`` is kept (to rounding)."""
    ch, was_complex = _as_channels(x)
    c, s = torch.cos(phi).to(ch.dtype), torch.sin(phi).to(ch.dtype)
    re, im = ch[0], ch[1]
    return _back(torch.stack([re * c - im * s, re * s + im * c]), was_complex)


def bias_field(rng: np.random.Generator, shape: Tuple[int, int], strength: float) -> torch.Tensor:
    """(H, W) positive field ``exp(b - mean b)``, b a polynomial with N(0, strength^2) coefficients."""
    b = _poly(shape, strength * rng.standard_normal(5))
    return torch.exp(b - b.mean())


def apply_bias(x: Image, field_: torch.Tensor) -> Image:
    """``x * field``: a positive real field, the phase is kept."""
    ch, was_complex = _as_channels(x)
    return _back(ch * field_.to(ch.dtype), was_complex)


def add_noise(x: Image, std: float, rng: np.random.Generator) -> Image:
    """``x + n``, n circular complex Gaussian with E|n|^2 = std^2."""
    ch, was_complex = _as_channels(x)
    n = rng.standard_normal(tuple(ch.shape)) * (std / math.sqrt(2))
    return _back(ch + torch.from_numpy(n).to(ch.dtype), was_complex)


def random_patch(x: Image, size: int, rng: np.random.Generator) -> Image:
    """A ``size`` x ``size`` crop at a uniformly random position.

    Raises:
        ValueError: if the patch does not fit.
    """
    h, w = x.shape[-2:]
    if not 0 < size <= min(h, w):
        raise ValueError(f"patch_size {size} does not fit in an image of {h}x{w}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return x[..., top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------------------------
# The pipeline.


@dataclass
class AugmentRecord:
    """What :func:`augment_image` drew for one sample (for tests and inspection)."""

    applied: Dict[str, Union[float, int, Tuple]] = field(default_factory=dict)


def augment_image(
    x: Image, config: AugmentConfig, key: Sequence[int], record: Optional[AugmentRecord] = None
) -> Image:
    """Augment one image (see the module docstring for the order and the distributions).

    Args:
        x: complex (H, W) or real (2, H, W) image.
        config: what to apply.
        key: the sample's seed entropy (:func:`sample_key`); equal keys give equal results.
        record: if given, filled with what was applied.

    Returns:
        The augmented image, same type; same shape unless ``config.patch_size`` > 0, then the last two
        dims are (patch_size, patch_size).
    """
    _as_channels(x)  # shape check
    key = tuple(int(k) for k in key)
    applied: Dict[str, Union[float, int, Tuple]] = {}

    def on(name: str) -> Optional[np.random.Generator]:
        p = config.probability(name)
        if p <= 0:
            return None
        rng = _rng(key, AUGMENTATIONS.index(name))
        return rng if rng.random() < p else None

    h, w = x.shape[-2:]
    rng = on("flip")
    if rng is not None:
        # flip itself was drawn with p; each axis then with 1/2, at least one
        rows, cols = [(True, False), (False, True), (True, True)][int(rng.integers(3))]
        x = flip(x, rows, cols)
        applied["flip"] = (rows, cols)
    rng = on("rot90")
    if rng is not None:
        k = int(rng.integers(1, 4)) if h == w else 2
        x = rot90(x, k)
        applied["rot90"] = k

    disp = None
    angle, zoom = 0.0, 1.0
    rng = on("rotate")
    if rng is not None:
        angle = float(rng.uniform(-config.rotate_deg, config.rotate_deg))
        applied["rotate"] = angle
    rng = on("scale")
    if rng is not None:
        zoom = float(math.exp(rng.uniform(-math.log1p(config.scale), math.log1p(config.scale))))
        applied["scale"] = zoom
    if angle != 0.0 or zoom != 1.0:
        disp = affine_displacement((h, w), angle, zoom)
    rng = on("elastic")
    if rng is not None:
        e = elastic_displacement(rng, (h, w), config.elastic_px, config.elastic_grid)
        disp = e if disp is None else disp + e
        applied["elastic"] = float(e.abs().max())
    if disp is not None:
        x = warp(x, disp)

    rng = on("bias")
    if rng is not None:
        b = bias_field(rng, (h, w), config.bias)
        x = apply_bias(x, b)
        applied["bias"] = (float(b.min()), float(b.max()))
    rng = on("phase")
    if rng is not None:
        x = apply_phase(x, smooth_phase(rng, (h, w), config.phase))
        applied["phase"] = True
    if config.patch_size:
        x = random_patch(x, config.patch_size, _rng(key, _PATCH))
    rng = on("noise")
    if rng is not None:
        std = float(rng.uniform(0.0, config.noise))
        x = add_noise(x, std, rng)
        applied["noise"] = std
    rng = on("gain")
    if rng is not None:
        g = float(math.exp(rng.uniform(-math.log1p(config.gain), math.log1p(config.gain))))
        x = x * g
        applied["gain"] = g
    if record is not None:
        record.applied = applied
    return x


# ----------------------------------------------------------------------------------------------------------
# Flags: one name in code, CLI and config.json.


def augment_defaults() -> Dict[str, object]:
    """The training flags of this module with their defaults (no augmentation, whole slices)."""
    d = AugmentConfig()
    return dict(
        augment="none",
        patch_size=d.patch_size,
        augment_seed=d.seed,
        augment_rotate_deg=d.rotate_deg,
        augment_scale=d.scale,
        augment_elastic_px=d.elastic_px,
        augment_elastic_grid=d.elastic_grid,
        augment_bias=d.bias,
        augment_phase=d.phase,
        augment_noise=d.noise,
        augment_gain=d.gain,
    )


AUGMENT_HELP: Dict[str, str] = {
    "augment": "comma list of augmentations, each optionally name:probability: "
    + ", ".join(f"{n} (p {p:g})" for n, p in DEFAULT_PROBABILITY.items())
    + "; 'all' for every one, 'none' for none (docs/training.md)",
    "patch_size": "train on random square patches of this side instead of whole slices (0: whole slices)",
    "augment_seed": "seed of augmentations and patch positions (with the resumed step, pass, file, slice)",
    "augment_rotate_deg": "rotate: largest angle, degrees",
    "augment_scale": "scale: zoom factor in [1/(1+s), 1+s]",
    "augment_elastic_px": "elastic: displacement std at the control points, pixels",
    "augment_elastic_grid": "elastic: control points per side (fewer = smoother)",
    "augment_bias": "bias: std of the log bias-field polynomial coefficients",
    "augment_phase": "phase: std of the phase polynomial coefficients, radians",
    "augment_noise": "noise: largest complex noise std, in normalized image units",
    "augment_gain": "gain: intensity factor in [1/(1+g), 1+g]",
}


def config_from_flags(values: Dict[str, object]) -> AugmentConfig:
    """The :class:`AugmentConfig` of flag values (the keys of :func:`augment_defaults`; others ignored).

    Raises:
        ValueError: a bad ``--augment`` list or a bad strength, naming the flag.
    """
    d = augment_defaults()
    v = {k: values.get(k, d[k]) for k in d}
    try:
        return AugmentConfig(
            probabilities=parse_augment(str(v["augment"])),
            rotate_deg=float(v["augment_rotate_deg"]),
            scale=float(v["augment_scale"]),
            elastic_px=float(v["augment_elastic_px"]),
            elastic_grid=int(v["augment_elastic_grid"]),
            bias=float(v["augment_bias"]),
            phase=float(v["augment_phase"]),
            noise=float(v["augment_noise"]),
            gain=float(v["augment_gain"]),
            patch_size=int(v["patch_size"]),
            seed=int(v["augment_seed"]),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from None
