"""Tests for improved_diffusion.script_util (defaults, factories, flags, config files)."""

import argparse
import json
import os

import pytest
import torch
from tiny import tiny_config

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.inference import DEMO_MODEL
from improved_diffusion.respace import SpacedDiffusion
from improved_diffusion.script_util import (
    LEGACY_MODEL_OPTIONS,
    MODEL_AND_DIFFUSION_CHOICES,
    MODEL_AND_DIFFUSION_HELP,
    UPSTREAM_TRAIN_FLAGS,
    add_dict_to_argparser,
    add_upstream_flags,
    args_to_dict,
    create_model,
    create_model_and_diffusion,
    default_channel_mult,
    downsampling_factor,
    load_config,
    model_and_diffusion_defaults,
    model_options_from_config,
    parse_size,
    save_config,
    str2bool,
    upstream_flag_notes,
)
from improved_diffusion.unet import UNetModel

UPSTREAM_KEYS = {
    "image_size",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_heads_upsample",
    "attention_resolutions",
    "dropout",
    "learn_sigma",
    "sigma_small",
    "class_cond",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
    "use_checkpoint",
    "use_scale_shift_norm",
}


# the tests' tiny model with attention (2 heads at 8x8) and 50 steps
TINY_WITH_ATTENTION = dict(num_channels=16, num_heads=2, attention_resolutions="8", diffusion_steps=50)


def _tiny(**overrides):
    return tiny_config(**{**TINY_WITH_ATTENTION, **overrides})


def test_defaults_keys_and_mri_values():
    d = model_and_diffusion_defaults()
    assert set(d) == UPSTREAM_KEYS | {"in_channels", "channel_mult", "attention_token_budget"}
    assert d["image_size"] == 128 and d["learn_sigma"] is True and d["noise_schedule"] == "cosine"
    assert d["in_channels"] == 2 and d["channel_mult"] == ""


def test_create_model_and_diffusion_tiny():
    model, diffusion = create_model_and_diffusion(**_tiny())
    assert isinstance(model, UNetModel) and isinstance(diffusion, SpacedDiffusion)
    assert model.in_channels == 2 and model.out_channels == 4  # learn_sigma doubles the output channels
    assert model.channel_mult == (1, 2) and model.attention_resolutions == (2,)  # 16 // 8
    assert diffusion.num_timesteps == 50
    assert diffusion.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert diffusion.loss_type == gd.LossType.RESCALED_MSE
    assert diffusion.model_mean_type == gd.ModelMeanType.EPSILON
    out = model(torch.randn(1, 2, 13, 10), torch.tensor([3]))
    assert out.shape == (1, 4, 13, 10)

    _, d2 = create_model_and_diffusion(
        **_tiny(
            timestep_respacing="ddim10", learn_sigma=False, sigma_small=True, predict_xstart=True, use_kl=True
        )
    )
    assert d2.num_timesteps == 10 and d2.timestep_map == list(range(0, 50, 5))
    assert d2.model_var_type == gd.ModelVarType.FIXED_SMALL
    assert d2.model_mean_type == gd.ModelMeanType.START_X and d2.loss_type == gd.LossType.RESCALED_KL
    _, d3 = create_model_and_diffusion(**_tiny(learn_sigma=False, rescale_learned_sigmas=False))
    assert d3.model_var_type == gd.ModelVarType.FIXED_LARGE and d3.loss_type == gd.LossType.MSE


def test_create_model_and_diffusion_rejects_bad_keys():
    cfg = _tiny()
    cfg["lr"] = 1e-4
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        create_model_and_diffusion(**cfg)
    cfg = _tiny()
    del cfg["in_channels"]
    with pytest.raises(ValueError, match=r"missing keys \['in_channels'\]"):
        create_model_and_diffusion(**cfg)


def test_channel_mult_auto_and_override():
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(320) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2, 2)
    assert default_channel_mult(16) == (1, 2, 2, 2)
    model = create_model(
        32,
        8,
        1,
        learn_sigma=False,
        class_cond=False,
        use_checkpoint=False,
        attention_resolutions="16",
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        dropout=0.0,
        in_channels=3,
        channel_mult="",
    )
    assert model.channel_mult == (1, 2, 2, 2) and model.out_channels == 3 and model.in_channels == 3
    model, _ = create_model_and_diffusion(
        **_tiny(image_size=32, channel_mult="1,2,2", attention_resolutions="16")
    )
    assert model.channel_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        create_model_and_diffusion(**_tiny(channel_mult="1,x"))


def test_unreachable_attention_resolution_raises():
    with pytest.raises(ValueError, match="attention_resolutions"):
        create_model_and_diffusion(**_tiny(attention_resolutions="4"))  # 16 // 4 = 4 > 2 levels reach
    with pytest.raises(ValueError, match="attention_resolutions"):
        create_model_and_diffusion(**_tiny(attention_resolutions="5"))


def test_argparser_round_trip():
    parser = argparse.ArgumentParser()
    defaults = model_and_diffusion_defaults()
    add_dict_to_argparser(parser, defaults, MODEL_AND_DIFFUSION_HELP, MODEL_AND_DIFFUSION_CHOICES)
    args = parser.parse_args(["--learn_sigma", "False", "--num_channels", "64", "--channel_mult", "1,2,2"])
    d = args_to_dict(args, defaults.keys())
    assert d["learn_sigma"] is False and d["num_channels"] == 64 and d["channel_mult"] == "1,2,2"
    assert d["dropout"] == 0.0 and isinstance(d["dropout"], float)
    assert args_to_dict(d, ["num_channels"]) == {"num_channels": 64}
    for text, value in [
        ("yes", True),
        ("T", True),
        ("1", True),
        ("no", False),
        ("false", False),
        ("0", False),
    ]:
        assert str2bool(text) is value
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_argparser_help_texts_and_downsampling_factor():
    parser = argparse.ArgumentParser()
    with pytest.raises(ValueError, match=r"no help text for \['lr'\]"):  # every flag must be documented
        add_dict_to_argparser(parser, {"patch_size": 0, "lr": 1e-4}, help_texts={"patch_size": "side"})
    add_dict_to_argparser(
        parser,
        {"patch_size": 0, "mode": "a"},
        help_texts={"patch_size": "side of a patch", "mode": "a or b"},
        choices={"mode": ("a", "b")},
    )
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["patch_size"] == "side of a patch" and parser.parse_args(["--mode", "b"]).mode == "b"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert downsampling_factor(model_and_diffusion_defaults()) == 16  # image_size 128: 5 levels
    assert downsampling_factor({"image_size": 128, "channel_mult": "1,2"}) == 2


def test_upstream_flags_are_accepted_with_a_note():
    parser = argparse.ArgumentParser()
    add_upstream_flags(parser, {**UPSTREAM_TRAIN_FLAGS, "old_switch": (True, "it does nothing here")})
    assert upstream_flag_notes(parser.parse_args([]), UPSTREAM_TRAIN_FLAGS) == []  # not given: no note
    args = parser.parse_args(["--fp16_scale_growth", "2e-3", "--old_switch", "False"])
    assert args.fp16_scale_growth == 2e-3 and args.old_switch is False
    notes = upstream_flag_notes(args, {**UPSTREAM_TRAIN_FLAGS, "old_switch": (True, "it does nothing here")})
    assert notes[0].startswith("note: --fp16_scale_growth is ignored: the loss scale is handled by ")
    assert "torch.amp.GradScaler" in notes[0] and "\n" not in notes[0]
    assert notes[1] == "note: --old_switch is ignored: it does nothing here"
    assert upstream_flag_notes(vars(args), UPSTREAM_TRAIN_FLAGS) == notes[:1]


def test_parse_size():
    assert parse_size("", "--crop_size") is None and parse_size(" ", "--crop_size") is None
    assert parse_size("128", "--crop_size") == (128, 128)
    assert parse_size(" 96,64 ", "--sample_size") == (96, 64)
    for bad, problem in (("a", "an integer or 'height,width'"), ("0", "positive"), ("1,2,3", "one or two")):
        with pytest.raises(ValueError, match=f"^--sample_size '{bad}': expected .*{problem}"):
            parse_size(bad, "--sample_size")


def test_save_and_load_config(tmp_path):
    cfg = _tiny()
    log_dir = tmp_path / "run"
    path = save_config(cfg, str(log_dir))
    assert path == str(log_dir / "config.json")
    assert os.listdir(log_dir) == ["config.json"]  # no temp files left behind
    assert json.loads((log_dir / "config.json").read_text()) == cfg
    ckpt = log_dir / "ema_0.9999_000100.pt"
    ckpt.write_bytes(b"")
    for where in (str(log_dir), str(ckpt), path):
        assert load_config(where) == cfg
    model, diffusion = create_model_and_diffusion(**load_config(str(ckpt)))
    assert model.out_channels == 4 and diffusion.num_timesteps == 50

    # Overwrite keeps the file valid.
    save_config(dict(cfg, num_channels=32), str(log_dir))
    assert load_config(str(log_dir))["num_channels"] == 32


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(str(tmp_path / "model.pt"))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(str(tmp_path))
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_config({"x": object()}, str(tmp_path / "other"))


# ---------------------------------------------------------------- attention token budget (model flag)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_token_budget_flag_and_config_round_trip(tmp_path):
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults(), help_texts=MODEL_AND_DIFFUSION_HELP)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["attention_token_budget"] == MODEL_AND_DIFFUSION_HELP["attention_token_budget"]
    args = parser.parse_args(["--attention_token_budget", "2"])
    assert args.attention_token_budget == 2.0 and isinstance(args.attention_token_budget, float)
    cfg = _tiny(attention_token_budget=args.attention_token_budget)
    save_config(cfg, str(tmp_path))
    options = model_options_from_config(load_config(str(tmp_path)), str(tmp_path))
    assert options == cfg
    model, _ = create_model_and_diffusion(**options)
    assert model.attention_token_budget == 2.0 and model.image_size == 16
    blocks = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert blocks and all(b.max_tokens == 2 * b.window**2 for b in blocks)


def test_config_without_attention_token_budget_keeps_global_attention(tmp_path):
    cfg = _tiny()
    del cfg["attention_token_budget"]
    save_config(cfg, str(tmp_path))
    options = model_options_from_config(load_config(str(tmp_path)), "old run")
    assert options["attention_token_budget"] == LEGACY_MODEL_OPTIONS["attention_token_budget"] == 0.0
    model, _ = create_model_and_diffusion(**options)
    assert all(m.max_tokens is None for m in model.modules() if type(m).__name__ == "AttentionBlock")
    del cfg["num_channels"]
    with pytest.raises(ValueError, match=r"old run: config.json lacks model keys \['num_channels'\]"):
        model_options_from_config(cfg, "old run")


def test_demo_checkpoint_loads_strictly_with_and_without_budget():
    demo = os.path.join(REPO_ROOT, "checkpoints", "demo")
    options = model_options_from_config(load_config(demo), demo)
    state = torch.load(DEMO_MODEL, map_location="cpu", weights_only=True)
    for budget in (options["attention_token_budget"], 4.0):
        model, _ = create_model_and_diffusion(**{**options, "attention_token_budget": budget})
        model.load_state_dict(state, strict=True)  # the rule adds no parameters or buffers
