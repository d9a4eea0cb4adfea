"""Every flag of every script has a help text, a type, and its default shown in ``--help``."""

import argparse
import glob
import importlib.util
import os
import sys

import pytest

from improved_diffusion.script_util import (
    MODEL_AND_DIFFUSION_CHOICES,
    MODEL_AND_DIFFUSION_HELP,
    model_and_diffusion_defaults,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    p
    for folder in ("scripts", "benchmarks", "datasets")
    for p in glob.glob(os.path.join(ROOT, folder, "*.py"))
    if "argparse" in open(p).read()  # library modules there (e.g. benchmarks/recon_report.py) have no CLI
)


def _module(path):
    name = "cli_" + os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)  # scripts import their neighbours
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses in the script look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def test_every_cli_is_found():
    names = {os.path.relpath(p, ROOT) for p in SCRIPTS}
    assert {"scripts/image_sample.py", "scripts/image_train.py", "benchmarks/recon_benchmark.py"} <= names
    assert {"datasets/make_demo_data.py", "scripts/prior_sample.py", "scripts/evaluate.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_flag_has_help_type_and_shown_default(path):
    parser = _module(path).create_argparser()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    parser.format_help()  # renders (a stray % in a help text would raise here)
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or "").strip():
            problems.append(f"{flag}: no help")
        if action.nargs != 0 and action.type is None:
            problems.append(f"{flag}: no type")
        # ArgumentDefaultsHelpFormatter adds "(default: %(default)s)" to every optional flag's help
        if action.option_strings and not action.required:
            if "%(default)" not in formatter._get_help_string(action):
                problems.append(f"{flag}: default not shown")
    assert not problems, problems


def test_model_help_and_choices_come_with_the_defaults():
    assert set(MODEL_AND_DIFFUSION_HELP) == set(model_and_diffusion_defaults())
    assert set(MODEL_AND_DIFFUSION_CHOICES) <= set(model_and_diffusion_defaults())


def test_choices_are_enforced():
    sample = _module(os.path.join(ROOT, "scripts", "image_sample.py")).create_argparser()
    for flag in ("--dc", "--clip", "--mask_type"):
        with pytest.raises(SystemExit):
            sample.parse_args(["--input", "x.h5", flag, "bogus"])
    baseline = _module(os.path.join(ROOT, "scripts", "baseline_recon.py")).create_argparser()
    with pytest.raises(SystemExit):
        baseline.parse_args(["--input", "x.h5", "--method", "bogus"])
