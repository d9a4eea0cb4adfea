"""benchmarks/train_speed.py runs, and its --baseline_repo plumbing works (with a stand-in checkout).

Upstream's code is not available here, so the stand-in package exposes upstream's module names and
TrainLoop signature on top of ours; it checks the import-under-an-alias and the timing path, not upstream.
"""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size=16", "--num_channels=8", "--num_res_blocks=1", "--attention_resolutions=8"]
TINY += ["--num_heads=1", "--diffusion_steps=20", "--batch_size=2", "--steps=2", "--warmup=1"]

STAND_IN = {
    "__init__.py": "",
    "unet.py": "from improved_diffusion.unet import UNetModel  # noqa: F401\n",
    "script_util.py": "from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: F401\n",
    "train_util.py": textwrap.dedent(
        """
        import torch.distributed as dist
        from improved_diffusion import logger  # noqa: F401
        from improved_diffusion.train_util import TrainLoop as _Ours


        class TrainLoop(_Ours):
            def __init__(self, *, fp16_scale_growth=1e-3, **kwargs):
                assert dist.get_world_size() == 1  # upstream needs a process group
                super().__init__(handle_signals=False, **kwargs)
        """
    ),
}


def _run(args, tmp_path):
    out_json = tmp_path / "result.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "train_speed.py"),
        *TINY,
        *args,
        f"--json={out_json}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.loads(out_json.read_text())


def test_benchmark_reports_steps_per_second(tmp_path):
    stdout, result = _run(["--precision=fp16"], tmp_path)  # fp16 on CPU falls back to fp32
    assert "steps/s" in stdout and result["ours_steps_per_s"] > 0
    assert result["precision_used"] == ("fp16" if "cuda" in result["device"] else "fp32")
    assert result["config"]["image_size"] == 16


def test_baseline_repo_is_imported_under_an_alias(tmp_path):
    pkg = tmp_path / "improved-diffusion" / "improved_diffusion"
    pkg.mkdir(parents=True)
    for name, text in STAND_IN.items():
        (pkg / name).write_text(text)
    stdout, result = _run([f"--baseline_repo={pkg.parent}", "--repeats=2", "--clock=cpu"], tmp_path)
    assert "speed-up (ours vs upstream)" in stdout and "clock cpu" in stdout
    assert result["upstream_steps_per_s"] > 0 and result["speedup"] > 0
    assert len(result["upstream_s_per_step_repeats"]) == len(result["ours_s_per_step_repeats"]) == 2
    assert result["speedup_min"] <= result["speedup_median"] <= result["speedup_max"]
    assert result["peak_memory_gb"] > 0
