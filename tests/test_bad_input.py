"""Every bad-input case of docs/bad_input.md through scripts/image_train.py and scripts/image_sample.py.

Each run (benchmarks/bad_input_table.py, in this process, tiny model) must exit with status 2, print exactly
one ``error:`` line naming the file (and the slice for value errors), no traceback, and write no output.
tests/test_image_train_errors.py covers training's several-files, skip and distributed behaviour.
"""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bad_input_table as bad  # noqa: E402

RUNS = [(c.name, s) for c in bad.CASES for s in ("train", "sample") if s not in c.na]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {(r.case, r.script): r for r in bad.run_all(str(tmp_path_factory.mktemp("bad_input")))}


@pytest.mark.parametrize("case, script", RUNS)
def test_one_line_status_2_no_output(runs, case, script):
    r = runs[(case, script)]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.status == 2, r.stderr
    assert r.stderr.strip().splitlines() == r.errors and len(r.errors) == 1, r.stderr
    line = r.errors[0]
    # the line names the bad file (for the training config case: the config.json beside the checkpoint)
    named = os.path.dirname(r.bad_path) if (case, script) == ("config", "train") else r.bad_path
    assert line.startswith(f"error: {named}"), line
    slice_idx = next(c.slice_idx for c in bad.CASES if c.name == case)
    if slice_idx is not None:
        assert f": slice {slice_idx}: " in line, line
    assert r.outputs == [], r.outputs


def test_docs_table_is_generated_from_these_runs(runs):
    with open(os.path.join(ROOT, "docs", "bad_input.md")) as f:
        docs = f.read()

    # numbers masked: HDF5's own messages quote byte offsets, which differ between library builds
    def mask(text):
        return re.sub(r"\d+", "N", text)

    assert mask(docs) == mask(bad.markdown(list(runs.values()))), (
        "docs/bad_input.md is out of date: python benchmarks/bad_input_table.py --output docs/bad_input.md"
    )


def _train(tmp_path, *extra):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    bad.write_good(str(data / "good.h5"))
    return bad.call_script("image_train", [f"--data_dir={data}", *bad.TRAIN_ARGS, *extra])


def test_resume_into_a_log_dir_of_another_model(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    bad.write_checkpoint(str(log), num_channels=16)
    config = (log / "config.json").read_text()
    status, _, err = _train(tmp_path, f"--log_dir={log}", f"--resume_checkpoint={log}")
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {log}/config.json was written for another model/diffusion (num_channels: 16 -> 8); "
        "use the same flags or a new --log_dir"
    ]
    assert (log / "config.json").read_text() == config  # left as it was, nothing else written
    assert sorted(os.listdir(log)) == ["config.json", "model000000.pt"]


def test_resume_from_weights_of_another_model_without_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = bad.write_checkpoint(str(ckpt), num_channels=16)
    os.remove(ckpt / "config.json")  # e.g. an upstream checkpoint: only the weights can tell
    status, _, err = _train(tmp_path, f"--log_dir={tmp_path / 'log'}", f"--resume_checkpoint={path}")
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: --resume_checkpoint {path}: weights do not match the model of these")
    assert "size mismatch" in lines[0]
    assert not any(n.endswith(".pt") for n in os.listdir(tmp_path / "log"))


def test_resume_from_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "model000010.pt"
    log = tmp_path / "log"
    status, _, err = _train(tmp_path, f"--log_dir={log}", f"--resume_checkpoint={missing}")
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: --resume_checkpoint {missing}: no such file or directory"]
    assert not log.exists()


@pytest.mark.parametrize("script", ["train", "sample"])
def test_every_bad_file_of_a_run_is_one_line_before_any_work(tmp_path, script):
    """The header cases together, beside a good file: one line each, and not even the good file is done."""
    data, out, ckpt = tmp_path / "data", tmp_path / "out", tmp_path / "ckpt"
    data.mkdir()
    ckpt.mkdir()
    header_cases = [c for c in bad.CASES if c.make is not None and c.slice_idx is None]
    for case in header_cases:
        case.make(str(data / f"{case.name}.h5"))
    bad.write_good(str(data / "good.h5"))
    if script == "train":
        argv = [f"--data_dir={data}", f"--log_dir={out}", *bad.TRAIN_ARGS]
        status, stdout, err = bad.call_script("image_train", argv)
    else:
        model = bad.write_checkpoint(str(ckpt))
        argv = ["--model_path", model, "--input", str(data), "--output_dir", str(out), *bad.SAMPLE_ARGS]
        status, stdout, err = bad.call_script("image_sample", argv)
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err + stdout
    assert sorted(line.split(": ")[1] for line in lines) == sorted(
        str(data / f"{c.name}.h5") for c in header_cases
    ), err
    assert all(line.startswith("error: ") for line in lines)
    assert not out.exists()
