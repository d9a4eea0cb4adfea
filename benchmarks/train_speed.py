"""Training steps per second for one model/diffusion configuration, optionally against upstream.

Times TrainLoop.run_step (forward + backward over the microbatches, optimizer, EMA, loss logging) on a fixed
random batch, so data loading is excluded; the first ``--warmup`` steps are not timed. With
``--baseline_repo PATH`` (a local checkout of openai/improved-diffusion that you provide; it is not shipped
here) it also times upstream's own UNetModel + GaussianDiffusion + TrainLoop.run_step on the same
configuration in one run: upstream in a child process (as its own training would run, e.g. with glibc's
default allocator settings, which our TrainLoop changes process-wide on the CPU), ours in this one, taking
turns ``--repeats`` times so both see the same machine load. It prints the best time of each, their ratio,
and the range of the per-repeat ratios (the noise). ``--profile`` prints where our step spends its time
(torch.profiler). The peak memory is this process's (ours only): torch's peak allocation on CUDA, the peak
resident set on the CPU (that includes ~0.3 GB of Python and torch).

Example::

    python benchmarks/train_speed.py --image_size 64 --num_channels 32 --batch_size 2 --steps 20
    python benchmarks/train_speed.py --device cuda --precision fp16 --baseline_repo ~/src/improved-diffusion
"""

import argparse
import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from improved_diffusion import logger
from improved_diffusion.io_util import atomic_write_text
from improved_diffusion.script_util import (
    MODEL_AND_DIFFUSION_CHOICES,
    MODEL_AND_DIFFUSION_HELP,
    HelpFormatter,
    add_dict_to_argparser,
    create_model_and_diffusion,
    default_channel_mult,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_util import TrainLoop, keep_freed_memory

UPSTREAM_ALIAS = "upstream_improved_diffusion"
# --clock: elapsed time, or the process's CPU time (user + system, all its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# The model flags of this benchmark, with its small defaults; help texts and choices are the model's own.
MODEL_FLAGS: Dict[str, Any] = dict(
    image_size=64,
    num_channels=32,
    num_res_blocks=2,
    attention_resolutions="16,8",
    num_heads=4,
    channel_mult="",
    in_channels=2,
    learn_sigma=True,
    use_scale_shift_norm=True,
    diffusion_steps=1000,
    noise_schedule="cosine",
)


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_dict_to_argparser(p, MODEL_FLAGS, MODEL_AND_DIFFUSION_HELP, MODEL_AND_DIFFUSION_CHOICES)
    p.add_argument("--batch_size", type=int, default=2, help="images per step")
    p.add_argument("--microbatch", type=int, default=-1, help="image_train.py --microbatch (-1: no split)")
    p.add_argument(
        "--precision", type=str, default="fp32", choices=["fp32", "fp16", "bf16"], help="training precision"
    )
    p.add_argument(
        "--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if available"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=1, help="alternate ours/upstream this often; best is kept")
    p.add_argument(
        "--clock",
        type=str,
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: elapsed time; cpu: this process's CPU time (user + system, all threads), which on a "
        "shared CPU measures the code rather than its share of the machine (CPU device only)",
    )
    p.add_argument(
        "--baseline_repo",
        type=str,
        default="",
        help="local checkout of openai/improved-diffusion ('' = none)",
    )
    p.add_argument(
        "--baseline_allocator",
        type=str,
        default="default",
        choices=["default", "ours"],
        help="upstream's process keeps glibc's malloc defaults (as its own training), or gets the setting "
        "our TrainLoop applies on the CPU (train_util.keep_freed_memory), to see the gain without it",
    )
    p.add_argument(
        "--attention_token_budget",
        type=float,
        default=model_and_diffusion_defaults()["attention_token_budget"],
        help="our model's attention_token_budget (no effect at the nominal image_size)",
    )
    p.add_argument("--profile", action="store_true", help="profile a few of our steps and print the top ops")
    p.add_argument("--json", type=str, default="", help="also write the results to this JSON file ('' = no)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the fixed batch")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = create_argparser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.clock == "cpu" and args.device == "cuda":
        p.error("--clock cpu times the host only; use --clock wall with --device cuda")
    if args.baseline_repo and not os.path.isdir(os.path.join(args.baseline_repo, "improved_diffusion")):
        p.error(f"--baseline_repo {args.baseline_repo}: no improved_diffusion/ package inside")
    return args


def model_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Our model_and_diffusion flags for the benchmark configuration."""
    cfg = model_and_diffusion_defaults()
    mult = args.channel_mult or ",".join(str(m) for m in default_channel_mult(args.image_size))
    cfg.update(
        image_size=args.image_size,
        num_channels=args.num_channels,
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_resolutions,
        num_heads=args.num_heads,
        channel_mult=mult,
        in_channels=args.in_channels,
        learn_sigma=args.learn_sigma,
        use_scale_shift_norm=args.use_scale_shift_norm,
        diffusion_steps=args.diffusion_steps,
        noise_schedule=args.noise_schedule,
        attention_token_budget=args.attention_token_budget,
    )
    return cfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None], device: torch.device, steps: int, warmup: int, clock: str = "wall"
) -> float:
    """Seconds per step of ``step`` after ``warmup`` untimed calls, on the ``clock`` of :data:`CLOCKS`."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        step()
    _sync(device)
    start = now()
    for _ in range(steps):
        step()
    _sync(device)
    return (now() - start) / steps


def fixed_batch(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(args.batch_size, args.in_channels, args.image_size, args.image_size, generator=g)


def loop_args(args: argparse.Namespace) -> dict:
    """The TrainLoop arguments ours and upstream's share (same names in both)."""
    return dict(
        data=iter(()),
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10**9,
    )


def our_step(args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[], None], TrainLoop]:
    torch.manual_seed(args.seed)
    model, diffusion = create_model_and_diffusion(**model_config(args))
    model.to(device)
    batch = fixed_batch(args)
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        **loop_args(args),
        precision=args.precision,
        handle_signals=False,
    )

    def step() -> None:
        loop.run_step(batch, {})
        if loop.step % loop.log_interval == 0:
            logger.dumpkvs()

    return step, loop


def import_upstream(repo: str):
    """Import the checkout's ``improved_diffusion`` package under another name (ours keeps its own)."""
    pkg_dir = os.path.join(os.path.abspath(repo), "improved_diffusion")
    spec = importlib.util.spec_from_file_location(
        UPSTREAM_ALIAS, os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[UPSTREAM_ALIAS] = module
    spec.loader.exec_module(module)
    return {
        name: importlib.import_module(f"{UPSTREAM_ALIAS}.{name}")
        for name in ("unet", "script_util", "train_util")
    }


def ensure_process_group(device: torch.device) -> None:
    """Upstream's TrainLoop calls dist.get_world_size() (and wraps the model in DDP on CUDA): give it a
    one-process group, as its own setup_dist would. Our loop sees world size 1 and skips DDP."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
    )


def upstream_step(args: argparse.Namespace, device: torch.device, up) -> Callable[[], None]:
    """Upstream's UNet, diffusion and TrainLoop on the same configuration.

    The UNet is built directly (upstream's create_model fixes in_channels=3) with our in_channels and
    channel_mult, so both models have the same shape.
    """
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    attention_ds = tuple(args.image_size // int(r) for r in args.attention_resolutions.split(",") if r)
    model = (
        up["unet"]
        .UNetModel(
            in_channels=args.in_channels,
            model_channels=args.num_channels,
            out_channels=args.in_channels * (2 if args.learn_sigma else 1),
            num_res_blocks=args.num_res_blocks,
            attention_resolutions=attention_ds,
            dropout=0.0,
            channel_mult=tuple(int(m) for m in cfg["channel_mult"].split(",")),
            num_heads=args.num_heads,
            use_scale_shift_norm=args.use_scale_shift_norm,
        )
        .to(device)
    )
    diffusion = up["script_util"].create_gaussian_diffusion(
        steps=args.diffusion_steps,
        learn_sigma=args.learn_sigma,
        sigma_small=False,
        noise_schedule=args.noise_schedule,
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        timestep_respacing="",
    )
    loop = up["train_util"].TrainLoop(
        model=model,
        diffusion=diffusion,
        **loop_args(args),
        resume_checkpoint="",
        use_fp16=args.precision == "fp16",
    )
    batch = fixed_batch(args)
    calls = [0]

    def step() -> None:
        loop.run_step(batch, {})
        calls[0] += 1
        if calls[0] % 10 == 0:
            up["train_util"].logger.dumpkvs()

    return step


def _upstream_worker(args: argparse.Namespace, conn) -> None:
    """Child process: build upstream's step, then time it on request (``(steps, warmup)`` -> seconds/step)."""
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.baseline_allocator == "ours":
            keep_freed_memory()
        device = pick_device(args.device)
        np.random.seed(args.seed)
        up = import_upstream(args.baseline_repo)
        ensure_process_group(device)
        up["train_util"].logger.configure(
            tempfile.mkdtemp(prefix="train_speed_upstream_"), format_strs=["log"]
        )
        step = upstream_step(args, device, up)
        conn.send(("ready", None))
        while True:
            request = conn.recv()
            if request is None:
                break
            conn.send(("time", time_steps(step, device, *request, clock=args.clock)))
    except Exception as err:  # report to the parent instead of leaving it waiting
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


class UpstreamProcess:
    """Upstream's training step in a child process (spawned: a fresh interpreter and allocator)."""

    def __init__(self, args: argparse.Namespace) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_upstream_worker, args=(args, child), daemon=True)
        self.proc.start()
        child.close()
        self._receive()

    def _receive(self) -> Any:
        kind, value = self.conn.recv()
        if kind == "error":
            self.close()
            raise SystemExit(f"error: upstream baseline failed: {value}")
        return value

    def time_steps(self, steps: int, warmup: int) -> float:
        self.conn.send((steps, warmup))
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: torch's peak allocation on CUDA, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def profile_ours(step: Callable[[], None], device: torch.device, n: int = 5) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    np.random.seed(args.seed)
    # Keep the loop's key-value dumps off the screen: they would drown the result.
    logger.configure(tempfile.mkdtemp(prefix="train_speed_"), format_strs=["log"])

    upstream = None
    if args.baseline_repo:
        if args.precision == "bf16":
            print("upstream has no bf16 mode: baseline skipped")
        else:
            upstream = UpstreamProcess(args)

    ours, loop = our_step(args, device)
    times_ours: List[float] = []
    times_theirs: List[float] = []
    try:
        for _ in range(args.repeats):
            times_ours.append(time_steps(ours, device, args.steps, args.warmup, args.clock))
            if upstream is not None:
                times_theirs.append(upstream.time_steps(args.steps, args.warmup))
    finally:
        if upstream is not None:
            upstream.close()
    best_ours = min(times_ours)

    n_params = sum(p.numel() for p in loop.model.parameters())
    result: Dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "profile")},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "precision_used": loop.precision,
        "parameters": n_params,
        "ours_s_per_step": best_ours,
        "ours_steps_per_s": 1.0 / best_ours,
        "ours_s_per_step_repeats": times_ours,
        "peak_memory_gb": peak_memory_gb(device),
    }
    print("config:", json.dumps(result["config"], sort_keys=True))
    print(
        f"device: {result['device']}, torch threads {result['torch_threads']}, precision {loop.precision}, "
        f"clock {args.clock}"
    )
    print(f"model: {n_params / 1e6:.3f} M parameters")
    print(
        f"ours:     {1.0 / best_ours:8.3f} steps/s  ({best_ours * 1000:.1f} ms/step, best of {args.repeats})"
    )
    print(f"peak memory (ours): {result['peak_memory_gb']:.2f} GB")
    if times_theirs:
        best_theirs = min(times_theirs)
        ratios = [t / o for o, t in zip(times_ours, times_theirs)]
        result.update(
            upstream_s_per_step=best_theirs,
            upstream_steps_per_s=1.0 / best_theirs,
            upstream_s_per_step_repeats=times_theirs,
            speedup=best_theirs / best_ours,
            speedup_median=float(np.median(ratios)),
            speedup_min=min(ratios),
            speedup_max=max(ratios),
        )
        print(
            f"upstream: {1.0 / best_theirs:8.3f} steps/s  ({best_theirs * 1000:.1f} ms/step, "
            f"best of {args.repeats})"
        )
        print(
            f"speed-up (ours vs upstream): {result['speedup']:.2f}x (best vs best); per repeat: median "
            f"{result['speedup_median']:.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x"
        )
    if args.profile:
        table = profile_ours(ours, device)
        print(table)
        result["profile"] = table
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
