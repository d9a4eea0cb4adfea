"""TrainLoop: exact resume, atomic checkpoints, NaN handling, SIGTERM, logging, precision, config.json."""

import csv
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from tiny import TINY_FLAGS, TINY_MODEL, script_env, tiny_model_and_diffusion

from improved_diffusion import logger, optim_util, train_util
from improved_diffusion.checkpoint import (
    CheckpointSaveError,
    find_resume_checkpoint,
    list_complete_checkpoints,
)
from improved_diffusion.optim_util import resolve_precision
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.train_util import NonFiniteLossError, TrainLoop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3  # steps per half in the resume test
BATCH = 2


@pytest.fixture(autouse=True)
def _quiet_logger(tmp_path):
    previous = logger.Logger.CURRENT
    logger.configure(str(tmp_path / "default_log"), format_strs=["log", "csv"])
    yield
    logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


def fixed_batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 2, 16, 16, generator=g), {"fname": ["x"] * BATCH}) for _ in range(n)]


def make_loop(log_dir, data, seed=0, **kw):
    model, diffusion = tiny_model_and_diffusion(seed)
    args = dict(
        model=model,
        diffusion=diffusion,
        data=iter(data),
        batch_size=BATCH,
        microbatch=1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        ema_warmup=True,
        log_interval=1,
        save_interval=N,
        weight_decay=0.01,
        schedule_sampler=create_named_schedule_sampler("loss-second-moment", diffusion),
        log_dir=str(log_dir),
    )
    args.update(kw)
    return TrainLoop(**args)


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def assert_same_state(a, b):
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    for ema_a, ema_b in zip(a.ema_params, b.ema_params):
        for x, y in zip(ema_a, ema_b):
            assert torch.equal(x, y)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)


def read_progress(log_dir):
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_two_halves_with_resume_equal_straight_run(tmp_path):
    data = fixed_batches(2 * N)
    seed_all(1)
    straight = make_loop(tmp_path / "straight", data, max_steps=2 * N)
    straight.run_loop()

    seed_all(1)
    first = make_loop(tmp_path / "halves", data[:N], max_steps=N)
    first.run_loop()
    torch.manual_seed(999)  # the resumed run must not depend on the RNG state it starts with
    np.random.seed(999)
    second = make_loop(
        tmp_path / "halves", data[N:], seed=7, resume_checkpoint=str(tmp_path / "halves"), max_steps=2 * N
    )
    assert second.step == N
    second.run_loop()

    assert straight.step == second.step == 2 * N
    assert_same_state(straight, second)
    # The loss-second-moment sampler's history is part of the checkpoint too.
    assert np.array_equal(straight.schedule_sampler._loss_counts, second.schedule_sampler._loss_counts)
    assert np.array_equal(straight.schedule_sampler._loss_history, second.schedule_sampler._loss_history)
    names = sorted(os.listdir(tmp_path / "halves"))
    for step in (N, 2 * N):
        for name in (
            f"model{step:06d}.pt",
            f"opt{step:06d}.pt",
            f"ema_0.9_{step:06d}.pt",
            f"ema_0.99_{step:06d}.pt",
        ):
            assert name in names
    assert not [n for n in names if n.endswith(".tmp")]
    opt = torch.load(tmp_path / "halves" / f"opt{N:06d}.pt", weights_only=True)
    assert opt["step"] == N and set(opt["rng"][0]) == {"python", "numpy", "torch", "cuda"}


def test_logged_keys(tmp_path):
    loop = make_loop(tmp_path, fixed_batches(2), max_steps=2)
    logger.configure(str(tmp_path), format_strs=["csv"])
    loop.run_loop()
    rows = read_progress(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"] and rows[-1]["samples"] == str(2 * BATCH)
    for key in ("loss", "mse", "vb", "grad_norm", "param_norm", "nan_steps", "lr"):
        assert rows[-1][key] != "", key
    quartiles = [k for k in rows[0] if k.startswith("loss_q")]
    assert quartiles and set(quartiles) <= {"loss_q0", "loss_q1", "loss_q2", "loss_q3"}


def test_loss_scale_logged_as_upstream_lg_loss_scale(tmp_path):
    loop = make_loop(tmp_path, fixed_batches(1), max_steps=1)
    # fp16 needs CUDA; a CPU GradScaler exercises the same logging path.
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    logger.configure(str(tmp_path), format_strs=["csv"])
    loop.run_loop()
    row = read_progress(tmp_path)[-1]
    assert float(row["loss_scale"]) == 1024.0 and float(row["lg_loss_scale"]) == 10.0


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, fixed_batches(2), max_steps=1, save_interval=1)
    loop.run_loop()
    before = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".pt")}

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # a part of the file is on disk when the "crash" comes
        raise OSError("disk full (simulated)")

    loop.max_steps = 2
    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        loop.run_loop()
    monkeypatch.setattr(torch, "save", real_save)

    after = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".pt")}
    assert after == before  # no file of step 2, previous files untouched
    assert not glob.glob(str(tmp_path / ".*.tmp"))  # temp file cleaned up
    ckpt = find_resume_checkpoint(str(tmp_path), [0.9, 0.99])
    assert ckpt.step == 1 and sorted(ckpt.ema) == [0.9, 0.99]
    torch.load(ckpt.model, weights_only=True)
    torch.load(ckpt.opt, weights_only=True)


class Killed(BaseException):
    """Stands for the process being killed: no ``except Exception`` clean-up runs."""


def test_crash_before_opt_file_leaves_incomplete_set_ignored(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, fixed_batches(2), max_steps=1, save_interval=1)
    loop.run_loop()
    real_replace = os.replace

    def fail_on_opt(src, dst):
        if os.path.basename(dst).startswith("opt"):
            raise Killed("killed before the opt file (simulated)")
        real_replace(src, dst)

    loop.max_steps = 2
    monkeypatch.setattr(train_util.os, "replace", fail_on_opt)
    with pytest.raises(Killed, match="simulated"):
        loop.run_loop()
    monkeypatch.setattr(train_util.os, "replace", real_replace)
    names = os.listdir(tmp_path)
    assert "model000002.pt" in names and "opt000002.pt" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert [s.step for s in list_complete_checkpoints(str(tmp_path))] == [1]
    resumed = make_loop(tmp_path, fixed_batches(1), resume_checkpoint=str(tmp_path))
    assert resumed.step == 1


def test_full_disk_while_saving_removes_the_incomplete_set(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, fixed_batches(3), max_steps=1, save_interval=1)
    loop.run_loop()
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.endswith(".pt")}
    real_save = torch.save
    calls = []

    def full_on_second_file(obj, f, *args, **kwargs):
        calls.append(getattr(f, "name", f))
        if len(calls) == 2:  # model file written; the disk fills up during the first EMA file
            f.write(b"some bytes before the disk filled up")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    loop.max_steps = 2
    monkeypatch.setattr(torch, "save", full_on_second_file)
    with pytest.raises(CheckpointSaveError) as info:
        loop.run_loop()
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 2

    message = str(info.value)
    ema_path = os.path.join(str(tmp_path), "ema_0.9_000002.pt")
    assert "\n" not in message and message.startswith(f"cannot write checkpoint {ema_path}: ")
    assert "no space left on the device" in message and "removed the incomplete set 000002" in message
    assert f"newest complete set is 000001 ({tmp_path / 'model000001.pt'})" in message
    assert f"--resume_checkpoint {tmp_path}" in message
    assert isinstance(info.value, OSError)
    # Nothing of step 2 is left (the complete model file included), no temp file; step 1 is untouched.
    names = os.listdir(tmp_path)
    assert not [n for n in names if "000002" in n or n.endswith(".tmp")], names
    assert {n: (tmp_path / n).read_bytes() for n in names if n.endswith(".pt")} == before
    ckpt = find_resume_checkpoint(str(tmp_path), [0.9, 0.99])
    assert ckpt.step == 1 and sorted(ckpt.ema) == [0.9, 0.99]
    resumed = make_loop(tmp_path, fixed_batches(1), resume_checkpoint=str(tmp_path), max_steps=2)
    assert resumed.step == 1
    resumed.run_loop()
    assert [s.step for s in list_complete_checkpoints(str(tmp_path))] == [1, 2]


def test_other_save_errors_also_remove_the_incomplete_set(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, fixed_batches(2), max_steps=1, save_interval=1)
    real_replace = os.replace

    def fail_on_opt(src, dst):
        if os.path.basename(dst).startswith("opt"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(train_util.os, "replace", fail_on_opt)
    with pytest.raises(CheckpointSaveError) as info:
        loop.run_loop()
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'opt000001.pt'}: PermissionError: ")
    assert "no complete set" in message and "Fix that" in message
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".pt", ".tmp"))]


def test_find_resume_checkpoint(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None  # empty dir: fresh start
    for step in (5, 10, 20):
        (tmp_path / f"model{step:06d}.pt").write_bytes(b"m")
    for step in (5, 10):
        (tmp_path / f"opt{step:06d}.pt").write_bytes(b"o")
    (tmp_path / "ema_0.999_000010.pt").write_bytes(b"e")
    ckpt = find_resume_checkpoint(str(tmp_path), [0.999, 0.9])
    assert ckpt.step == 10 and ckpt.opt.endswith("opt000010.pt") and list(ckpt.ema) == [0.999]
    explicit = find_resume_checkpoint(str(tmp_path / "model000020.pt"))
    assert explicit.step == 20 and explicit.opt is None
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        find_resume_checkpoint(str(tmp_path / "nothing.pt"))
    with pytest.raises(ValueError, match="model<step>.pt"):
        find_resume_checkpoint(str(tmp_path / "opt000010.pt"))


class NaNAfter(torch.nn.Module):
    """Wraps a model; returns NaN outputs while ``poisoned`` is set."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.poisoned = False
        self.calls = 0

    def forward(self, x, t, **kwargs):
        out = self.inner(x, t, **kwargs)
        self.calls += 1
        return out * float("nan") if self.poisoned else out


def test_nan_steps_are_skipped_and_stop_after_max(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    wrapped = NaNAfter(model)
    loop = TrainLoop(
        model=wrapped,
        diffusion=diffusion,
        data=iter(fixed_batches(20)),
        batch_size=BATCH,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=2,
        max_steps=2,
        max_nan_steps=3,
        log_dir=str(tmp_path),
    )
    logger.configure(str(tmp_path), format_strs=["csv"])
    loop.run_loop()
    good = {k: v.clone() for k, v in wrapped.state_dict().items()}
    good_ema = [p.clone() for p in loop.ema_params[0]]
    saved = os.path.getmtime(tmp_path / "model000002.pt")

    # One bad step in between good ones: skipped, counted, training goes on.
    wrapped.poisoned = True
    loop.max_steps = 3
    loop.run_loop()
    assert loop.nan_steps == 1 and loop.consecutive_nan_steps == 1
    for k, v in wrapped.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert all(torch.equal(a, b) for a, b in zip(loop.ema_params[0], good_ema))
    wrapped.poisoned = False
    loop.max_steps = 4
    loop.run_loop()
    assert loop.consecutive_nan_steps == 0 and loop.nan_steps == 1

    # max_nan_steps consecutive bad steps: a clear error, weights untouched, last good checkpoint intact.
    good = {k: v.clone() for k, v in wrapped.state_dict().items()}
    saved = os.path.getmtime(tmp_path / "model000004.pt")
    wrapped.poisoned = True
    loop.max_steps = 100
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*model000004\.pt"):
        loop.run_loop()
    assert loop.step == 7 and loop.nan_steps == 4
    for k, v in wrapped.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert os.path.getmtime(tmp_path / "model000004.pt") == saved
    assert not (tmp_path / "model000007.pt").exists()
    state = torch.load(tmp_path / "model000004.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert read_progress(tmp_path)[-1]["nan_steps"] == "4"


def test_lr_annealing_and_ema_warmup(tmp_path):
    loop = make_loop(tmp_path, fixed_batches(10), lr_anneal_steps=4, ema_rate="0.9999", save_interval=100)
    p0 = [p.detach().clone() for p in loop.params]
    assert loop.run_loop() == "lr_anneal_steps"
    assert loop.step == 4
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))
    # With warm-up the EMA at step 4 has moved far from the initial weights (rate 0.9999 alone would not).
    moved = sum(float((e - a).abs().sum()) for e, a in zip(loop.ema_params[0], p0))
    total = sum(float((p.detach() - a).abs().sum()) for p, a in zip(loop.params, p0))
    assert moved > 0.3 * total


def test_precision_resolution(capsys):
    logger.configure(format_strs=["stdout"])
    cpu = torch.device("cpu")
    assert resolve_precision("", False, cpu) == "fp32"
    assert resolve_precision(None, True, cpu) == "fp32"  # fp16 needs CUDA
    assert "fp16 mixed precision needs CUDA" in capsys.readouterr().out
    assert resolve_precision("bf16", False, cpu) == "bf16"
    with pytest.raises(ValueError, match="conflicts"):
        resolve_precision("bf16", True, cpu)
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        resolve_precision("fp8", False, cpu)


def test_bf16_step_on_cpu(tmp_path):
    loop = make_loop(tmp_path, fixed_batches(1), precision="bf16", max_steps=1)
    p0 = [p.detach().clone() for p in loop.params]
    loop.run_loop()
    assert loop.nan_steps == 0 and loop.params[0].dtype == torch.float32
    assert any(not torch.equal(a, p) for a, p in zip(p0, loop.params))


def write_tiny_dataset(folder, num_files=2, slices=4, size=16, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_files):
        k = rng.standard_normal((slices, size, size)) + 1j * rng.standard_normal((slices, size, size))
        with h5py.File(os.path.join(folder, f"vol{i}.h5"), "w") as f:
            f.create_dataset("kspace", data=k.astype(np.complex64))


def _train_cmd(data_dir, log_dir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "image_train.py"),
        f"--data_dir={data_dir}",
        f"--log_dir={log_dir}",
        "--batch_size=2",
        "--log_interval=1",
        *TINY_FLAGS,
        *extra,
    ]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    data_dir, log_dir = tmp_path / "data", tmp_path / "log"
    write_tiny_dataset(data_dir)
    proc = subprocess.Popen(
        _train_cmd(data_dir, log_dir, "--max_steps=100000", "--save_interval=100000", "--ema_rate=0.99,0.9"),
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            progress = log_dir / "progress.csv"
            if progress.exists() and len(progress.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "received a stop signal" in out
    sets = list_complete_checkpoints(str(log_dir), [0.99, 0.9])
    assert len(sets) == 1 and sets[0].step >= 2 and sorted(sets[0].ema) == [0.9, 0.99]

    config = json.loads((log_dir / "config.json").read_text())
    for key in (
        "num_channels",
        "diffusion_steps",
        "noise_schedule",
        "lr",
        "batch_size",
        "ema_rate",
        "data_dir",
    ):
        assert key in config, key
    assert config["num_channels"] == TINY_MODEL["num_channels"] and config["log_dir"] == str(log_dir)

    # Resuming from the log directory continues from that step.
    step = sets[0].step
    out = subprocess.run(
        _train_cmd(data_dir, log_dir, f"--max_steps={step + 1}", f"--resume_checkpoint={log_dir}"),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming from {log_dir}/model{step:06d}.pt" in out.stdout
    assert list_complete_checkpoints(str(log_dir))[-1].step == step + 1


# ---------------------------------------------------------------- optimizer and allocator


def _adamw_run(make, load_from=None, steps=range(3)):
    """Parameters after AdamW steps ``steps`` on fixed gradients (optionally resuming a saved state)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = make(params)
    if load_from is not None:
        params_state, opt_state = load_from
        with torch.no_grad():
            for p, v in zip(params, params_state):
                p.copy_(v)
        optim_util.load_optimizer_state(opt, opt_state)
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, [p.detach().clone() for p in params]


def test_fused_adamw_matches_default_and_resumes_from_its_state():
    def default(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    def fast(params):
        return optim_util.make_optimizer(params, 1e-2, 0.1)

    opt, _ = _adamw_run(fast)
    assert opt.param_groups[0]["fused"] is True  # the CPU has a fused AdamW
    _, ref = _adamw_run(default, steps=range(6))
    # 3 default steps, saved; 3 more after loading that state into the fused optimizer.
    old_opt, old = _adamw_run(default)
    resumed_opt, resumed = _adamw_run(fast, load_from=(old, old_opt.state_dict()), steps=range(3, 6))
    assert resumed_opt.param_groups[0]["fused"] is True  # the saved flags do not switch it back
    for a, b in zip(resumed, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_keep_freed_memory_is_idempotent():
    first = train_util.keep_freed_memory()
    assert isinstance(first, bool) and train_util.keep_freed_memory() == first
    if sys.platform.startswith("linux"):
        assert first  # glibc has mallopt
