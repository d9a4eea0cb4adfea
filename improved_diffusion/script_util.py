"""Build models and diffusions from one flat dict of options; the same names serve as CLI flags and config.

The defaults are upstream improved-diffusion's with the MRI changes listed in docs/engine.md
(image_size=128, learn_sigma=True, noise_schedule="cosine", in_channels=2, channel_mult auto).
"""

import argparse
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import gaussian_diffusion as gd
from .io_util import atomic_write_text
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

NUM_CLASSES = 1000
CONFIG_NAME = "config.json"

# Flags of upstream improved-diffusion's image_train.py that no longer apply here: name -> (upstream's
# default, what happens instead). They are accepted, so copy-pasted upstream commands run, and each one given
# is answered by one "note:" line (:func:`upstream_flag_notes`).
UPSTREAM_TRAIN_FLAGS: Dict[str, Tuple[Any, str]] = {
    "fp16_scale_growth": (
        1e-3,
        "the loss scale is handled by torch.amp.GradScaler (doubled after 2000 steps without overflow, "
        "halved on an overflow); it is logged as loss_scale and lg_loss_scale",
    ),
}


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for every model and diffusion option (the keys of :func:`create_model_and_diffusion`)."""
    return dict(
        image_size=128,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=True,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="cosine",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        in_channels=2,
        channel_mult="",
        attention_token_budget=4.0,
    )


# One ``--help`` line per key of model_and_diffusion_defaults() (tests/test_cli_help.py checks that the keys
# agree), so every script that exposes these flags shows the same text.
MODEL_AND_DIFFUSION_HELP: Dict[str, str] = {
    "image_size": "nominal image side the UNet is built for (sets channel_mult and the attention levels; "
    "the network itself takes any multiple of its downsampling)",
    "num_channels": "base channel count of the UNet",
    "num_res_blocks": "residual blocks per UNet level",
    "num_heads": "attention heads per attention block",
    "num_heads_upsample": "attention heads in the upsampling path (-1: same as num_heads)",
    "attention_resolutions": "feature-map sizes (relative to image_size) with self-attention, e.g. '16,8'",
    "dropout": "dropout rate in the residual blocks",
    "learn_sigma": "the network also predicts the variance interpolation (improved-diffusion's L_hybrid)",
    "sigma_small": "with a fixed variance: use beta-tilde (small) instead of beta",
    "class_cond": "class-conditional model (not supported for reconstruction)",
    "diffusion_steps": "T, the number of steps of the base diffusion",
    "noise_schedule": "beta schedule of the base diffusion",
    "timestep_respacing": "steps to use: '' = all T, 'ddimN' (N evenly spaced), 'N' or 'a,b,c' "
    "(upstream's space_timesteps rule)",
    "use_kl": "train on the variational bound (RESCALED_KL) instead of the MSE",
    "predict_xstart": "the network predicts x0 instead of the noise",
    "rescale_timesteps": "feed the network t scaled to [0, 1000) (as upstream)",
    "rescale_learned_sigmas": "RESCALED_MSE: weight the variational-bound term as upstream",
    "use_checkpoint": "gradient checkpointing in the UNet (less memory, slower)",
    "use_scale_shift_norm": "FiLM-like scale-shift conditioning on the timestep embedding",
    "in_channels": "input channels: 2 = complex image as (real, imaginary)",
    "channel_mult": "per-level channel multipliers, e.g. '1,2,2' ('' = chosen from image_size)",
    "attention_token_budget": "an attention block whose feature map has more than this many times its "
    "positions at the nominal image_size attends within tiles of the nominal size instead of globally "
    "(0: always global, as upstream and as configs written before this flag)",
}

MODEL_AND_DIFFUSION_CHOICES: Dict[str, Sequence[Any]] = {"noise_schedule": ("linear", "cosine")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` of every script: each option shows its default; the description keeps its line breaks."""


# Model options added after configs were first written: the value that rebuilds the model those configs
# describe. A config.json without the key gets it (:func:`model_options_from_config`), so old checkpoints
# keep their behaviour; new runs record the default of model_and_diffusion_defaults().
LEGACY_MODEL_OPTIONS: Dict[str, Any] = {"attention_token_budget": 0.0}


def model_options_from_config(config: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The keys of :func:`model_and_diffusion_defaults` from a saved config, old configs included.

    Args:
        config: a training run's config.json (see :func:`load_config`).
        source: what to name in the error (the checkpoint or config path).

    Raises:
        ValueError: if a model key is missing that is not in :data:`LEGACY_MODEL_OPTIONS`.
    """
    keys = model_and_diffusion_defaults().keys()
    missing = [k for k in keys if k not in config and k not in LEGACY_MODEL_OPTIONS]
    if missing:
        raise ValueError(f"{source}: config.json lacks model keys {missing}")
    return {k: config[k] if k in config else LEGACY_MODEL_OPTIONS[k] for k in keys}


def create_model_and_diffusion(**kwargs: Any) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build the UNet and the (respaced) diffusion from exactly the keys of model_and_diffusion_defaults().

    Raises:
        ValueError: if a key is missing or unknown (so a config from another version cannot silently
            fall back to a default).
    """
    expected = set(model_and_diffusion_defaults())
    missing, unknown = sorted(expected - set(kwargs)), sorted(set(kwargs) - expected)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unknown:
            parts.append(f"unknown keys {unknown}")
        raise ValueError(
            "create_model_and_diffusion: "
            + "; ".join(parts)
            + " (start from model_and_diffusion_defaults(), "
            "e.g. args_to_dict(args, model_and_diffusion_defaults().keys()))"
        )
    model = create_model(
        kwargs["image_size"],
        kwargs["num_channels"],
        kwargs["num_res_blocks"],
        learn_sigma=kwargs["learn_sigma"],
        class_cond=kwargs["class_cond"],
        use_checkpoint=kwargs["use_checkpoint"],
        attention_resolutions=kwargs["attention_resolutions"],
        num_heads=kwargs["num_heads"],
        num_heads_upsample=kwargs["num_heads_upsample"],
        use_scale_shift_norm=kwargs["use_scale_shift_norm"],
        dropout=kwargs["dropout"],
        in_channels=kwargs["in_channels"],
        channel_mult=kwargs["channel_mult"],
        attention_token_budget=kwargs["attention_token_budget"],
    )
    diffusion = create_gaussian_diffusion(
        steps=kwargs["diffusion_steps"],
        learn_sigma=kwargs["learn_sigma"],
        sigma_small=kwargs["sigma_small"],
        noise_schedule=kwargs["noise_schedule"],
        use_kl=kwargs["use_kl"],
        predict_xstart=kwargs["predict_xstart"],
        rescale_timesteps=kwargs["rescale_timesteps"],
        rescale_learned_sigmas=kwargs["rescale_learned_sigmas"],
        timestep_respacing=kwargs["timestep_respacing"],
    )
    return model, diffusion


def default_channel_mult(image_size: int) -> Tuple[int, ...]:
    """The per-level channel multipliers for a nominal ``image_size`` (upstream's choices, by size band)."""
    if image_size >= 256:
        return (1, 1, 2, 2, 4, 4)
    if image_size >= 128:
        return (1, 1, 2, 3, 4)
    if image_size >= 64:
        return (1, 2, 3, 4)
    return (1, 2, 2, 2)


def downsampling_factor(config: Dict[str, Any]) -> int:
    """How many times the UNet of ``config`` halves its input: image sides must be multiples of it."""
    mult = config.get("channel_mult", "")
    levels = (
        len(default_channel_mult(int(config["image_size"])))
        if mult in ("", None)
        else len(_parse_int_list(mult, "channel_mult"))
    )
    return 2 ** (levels - 1)


def _parse_int_list(value: Any, name: str) -> Tuple[int, ...]:
    """'1,2,2' / [1, 2, 2] / (1, 2, 2) -> (1, 2, 2); a clear error otherwise."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        items = [value]
    try:
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected comma-separated integers like '1,2,2', got {value!r}") from None
    if any(v < 1 for v in out):
        raise ValueError(f"{name}: values must be positive integers, got {value!r}")
    return out


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str,
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    in_channels: int = 2,
    channel_mult: Any = "",
    attention_token_budget: float = 0.0,
) -> UNetModel:
    """Build the UNet.

    ``attention_resolutions`` lists feature-map sizes relative to the nominal ``image_size`` (e.g. "16,8"
    with image_size=128 means attention at downsampling factors 8 and 16); the UNet itself accepts any H x W.
    ``channel_mult`` "" picks :func:`default_channel_mult` (image_size); "1,2,2" overrides it.
    ``attention_token_budget`` > 0 makes attention on maps above that many times their nominal positions
    run within tiles of the nominal size (see :class:`UNetModel`).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if channel_mult in ("", None):
        mult = default_channel_mult(image_size)
    else:
        mult = _parse_int_list(channel_mult, "channel_mult")
        if not mult:
            raise ValueError(f"channel_mult: need at least one level, got {channel_mult!r}")

    max_ds = 2 ** (len(mult) - 1)
    attention_ds = []
    for res in _parse_int_list(attention_resolutions, "attention_resolutions"):
        ds, rem = divmod(image_size, res)
        # An unreachable resolution would silently disable attention: refuse it.
        if rem or ds & (ds - 1) or ds > max_ds:
            sizes = [image_size // 2**i for i in range(len(mult))]
            raise ValueError(
                f"attention_resolutions: {res} is not a feature-map size of this model "
                f"(image_size {image_size} with {len(mult)} levels has sizes {sizes})"
            )
        attention_ds.append(ds)

    return UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * 2 if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_ds),
        dropout=dropout,
        channel_mult=mult,
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        attention_token_budget=float(attention_token_budget),
        image_size=image_size,
    )


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> SpacedDiffusion:
    """Build the diffusion (always a :class:`SpacedDiffusion`; "" respacing keeps all ``steps``)."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(
    parser: argparse.ArgumentParser,
    default_dict: Dict[str, Any],
    help_texts: Dict[str, str],
    choices: Optional[Dict[str, Sequence[Any]]] = None,
) -> None:
    """Add one ``--key`` flag per entry, typed after its default (bools parsed with :func:`str2bool`).

    Args:
        help_texts: the ``--help`` line of every key (model keys: :data:`MODEL_AND_DIFFUSION_HELP`).
        choices: the allowed values of keys that have a fixed set (argparse then rejects others).

    Raises:
        ValueError: if a key has no help text (so a new option cannot ship undocumented).
    """
    choices = choices or {}
    missing = [k for k in default_dict if not help_texts.get(k)]
    if missing:
        raise ValueError(f"add_dict_to_argparser: no help text for {missing}")
    for k, v in default_dict.items():
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        else:
            v_type = type(v)
        parser.add_argument(
            f"--{k}",
            default=v,
            type=v_type,
            choices=choices.get(k),
            help=help_texts[k],
        )


def add_upstream_flags(parser: argparse.ArgumentParser, flags: Dict[str, Tuple[Any, str]]) -> None:
    """Accept upstream-only flags (e.g. :data:`UPSTREAM_TRAIN_FLAGS`); default None means "not given"."""
    for name, (upstream_default, note) in flags.items():
        v_type = str2bool if isinstance(upstream_default, bool) else type(upstream_default)
        parser.add_argument(
            f"--{name}",
            default=None,
            type=v_type,
            help=f"upstream's flag (upstream's default {upstream_default}; None here = not given): {note}",
        )


def upstream_flag_notes(args: Any, flags: Dict[str, Tuple[Any, str]]) -> List[str]:
    """One line per upstream-only flag given in ``args``: ``note: --<name> is ignored: <why>``."""
    values = args if isinstance(args, dict) else vars(args)
    return [
        f"note: --{name} is ignored: {note}"
        for name, (_, note) in flags.items()
        if values.get(name) is not None
    ]


def args_to_dict(args: Any, keys: Iterable[str]) -> Dict[str, Any]:
    """Pick ``keys`` from an argparse Namespace (or a dict)."""
    if isinstance(args, dict):
        missing = [k for k in keys if k not in args]
        if missing:
            raise ValueError(f"args_to_dict: missing keys {missing}")
        return {k: args[k] for k in keys}
    return {k: getattr(args, k) for k in keys}


def _unknown_flags(tokens: Sequence[str]) -> List[Tuple[Optional[str], Optional[str]]]:
    """``["--a", "1", "--b=2", "x"]`` -> ``[("a", "1"), ("b", "2"), (None, "x")]`` (stray values get None)."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if not eq:
                value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
                i += 0 if value is None else 1
            out.append((key, value))
        else:
            out.append((None, tok))
        i += 1
    return out


def check_model_flags(unknown: Sequence[str], config: Dict[str, Any], config_path: str) -> None:
    """Model flags left over by a sampling script's parser must agree with the checkpoint's config.

    Upstream's sampling scripts take every model flag; here they come from config.json, so a copy-pasted
    flag is accepted when it repeats the config's value and refused (one line) when it contradicts it.

    Raises:
        ValueError: an unknown flag, or a model flag that conflicts with ``config``.
    """
    defaults = model_and_diffusion_defaults()
    for key, value in _unknown_flags(unknown):
        if key is None or key not in defaults:
            shown = f"--{key}" if key is not None else value
            raise ValueError(f"unrecognized argument {shown!r} (see --help)")
        want = config.get(key, LEGACY_MODEL_OPTIONS.get(key, defaults[key]))
        try:
            given = str2bool(value) if isinstance(defaults[key], bool) else type(defaults[key])(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            given = value
        if given != want:
            raise ValueError(
                f"--{key} {value} conflicts with the checkpoint's config {config_path} ({key}={want!r}); "
                "model flags come from the checkpoint's config.json, drop the flag"
            )


def str2bool(v: Any) -> bool:
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case) as a bool."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false, yes/no, 1/0), got {v!r}")


def parse_size(value: str, flag: str) -> Optional[Tuple[int, int]]:
    """A size flag: ``""`` -> None, ``"128"`` -> (128, 128), ``"128,96"`` -> (128, 96) as (height, width).

    Raises:
        ValueError: one line naming ``flag`` (e.g. ``"--crop_size"``) when the value is not one or two
            positive integers.
    """
    value = str(value).strip()
    if not value:
        return None
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {value!r}: expected an integer or 'height,width'") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ValueError(f"{flag} {value!r}: expected one or two positive integers")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def save_config(config: Dict[str, Any], log_dir: str) -> str:
    """Write ``config`` as ``<log_dir>/config.json`` atomically (:func:`io_util.atomic_write_text`).

    Returns:
        The path written.
    """
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, CONFIG_NAME)
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"save_config: config is not JSON-serializable: {err}") from None
    return atomic_write_text(path, text + "\n", fsync=True)


def load_config(path: str) -> Dict[str, Any]:
    """Read the config.json of a log dir, or the one beside a checkpoint file.

    Args:
        path: a log directory, a checkpoint file inside one, or a config.json itself.

    Raises:
        FileNotFoundError: if there is no config.json there.
        ValueError: if it is not a JSON object.
    """
    if os.path.isdir(path):
        cfg_path = os.path.join(path, CONFIG_NAME)
    elif os.path.basename(path) == CONFIG_NAME:
        cfg_path = path
    else:
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"load_config: no {CONFIG_NAME} at {cfg_path} (expected beside the checkpoint {path!r}, "
            "written by save_config at training time)"
        )
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"load_config: {cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_config: {cfg_path} must hold a JSON object, got {type(config).__name__}")
    return config
