"""The training loop: upstream improved-diffusion's TrainLoop with complete, atomic, resumable checkpoints.

What a step does: split the batch into microbatches, draw timesteps from the schedule sampler,
accumulate gradients of the importance-weighted diffusion loss (under ``torch.autocast`` for fp16/bf16),
then, if the loss and gradients are finite, one AdamW update and an update of every EMA copy. A step with a
non-finite loss (or, outside fp16, non-finite gradients) changes nothing and is counted (``nan_steps``);
``max_nan_steps`` of them in a row raise :class:`NonFiniteLossError`. In fp16 the GradScaler skips
overflowing steps itself (not counted).

Checkpoints (complete sets of model, EMA and opt files, atomic, resumable) are
:mod:`improved_diffusion.checkpoint`'s; the precision, optimizer and gradient-norm helpers are
:mod:`improved_diffusion.optim_util`'s. SIGTERM/SIGUSR1 (pre-emption) make every rank save at the next step
boundary and return.
"""

import contextlib
import ctypes
import ctypes.util
import math
import os
import signal
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointSaveError,
    CheckpointSet,
    capture_rng_state,
    ema_filename,
    find_resume_checkpoint,
    load_sampler_state,
    model_filename,
    opt_filename,
    restore_rng_state,
    sampler_state,
    write_checkpoint_set,
)
from .optim_util import load_optimizer_state, make_optimizer, resolve_precision, total_norm


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_nan_steps`` consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def parse_ema_rates(ema_rate: Any) -> List[float]:
    """``"0.9999,0.999"`` / a float / a list -> list of floats in [0, 1)."""
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    elif isinstance(ema_rate, str):
        rates = [float(r) for r in ema_rate.split(",") if r.strip()]
    else:
        rates = [float(r) for r in ema_rate]
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--ema_rate: {r} is not in [0, 1)")
    return rates


def log_loss_dict(diffusion: Any, ts: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
    """Log the mean of each loss term and its means per timestep quartile (``<key>_q0`` .. ``_q3``).

    Args:
        diffusion: provides ``num_timesteps``.
        ts: (N,) timesteps of the samples.
        losses: key -> (N,) per-sample values.
    """
    quartile = (4 * ts.detach().cpu().numpy().astype(np.int64)) // diffusion.num_timesteps
    for key, values in losses.items():
        vals = values.detach().float().cpu().numpy()
        logger.logkv_mean(key, float(vals.mean()), n=len(vals))
        for q in np.unique(quartile):
            sel = vals[quartile == q]
            logger.logkv_mean(f"{key}_q{int(q)}", float(sel.mean()), n=len(sel))


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Let glibc malloc reuse freed memory instead of handing it back to the OS; True if it applied.

    A CPU training step allocates and frees the same large activation buffers every step. With glibc's
    defaults many of them are fresh mmap regions (or trimmed heap) whose pages fault in again on first use:
    about 150 000 page faults per step of the demo model, 10-15 % of the step in kernel time. Raising the
    mmap and trim thresholds to 1 GiB keeps them in the heap; the process's peak memory is unchanged (it
    holds at most what the step needed at its peak). Process-wide and permanent; a no-op off glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    limit = 1 << 30
    _ALLOCATOR_TUNED = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


class TrainLoop:
    """Upstream-shaped training loop (see the module docstring for what a step and a checkpoint are).

    Args:
        model: the denoiser, already on ``dist_util.dev()``.
        diffusion: a GaussianDiffusion (``training_losses``, ``num_timesteps``).
        data: iterator of ``(batch (B, C, H, W), kwargs)``; only ``kwargs["y"]`` reaches the model.
        batch_size: per-rank batch size.
        microbatch: samples per forward/backward (<= 0: the whole batch); gradients are averaged over the
            batch whatever the microbatch (upstream summed microbatch means).
        lr: AdamW learning rate.
        ema_rate: "0.9999,0.999" or a float or a list.
        log_interval: dump the logged key values every this many steps.
        save_interval: save a checkpoint set every this many steps (and at the end).
        resume_checkpoint: "" or a model file or a log directory (see :func:`find_resume_checkpoint`).
        use_fp16: alias for ``precision="fp16"``.
        precision: "fp32", "fp16" or "bf16" (None/"": from use_fp16).
        schedule_sampler: a resample.ScheduleSampler (default uniform).
        weight_decay: AdamW weight decay.
        lr_anneal_steps: anneal lr linearly to 0 over this many steps, then stop (0: constant lr).
        max_steps: stop after this many steps in total, counting resumed ones (0: no limit).
        max_nan_steps: stop after this many consecutive non-finite steps (0: never stop).
        ema_warmup: use min(rate, (1 + step) / (10 + step)) instead of rate, so short runs are not dominated
            by the initial weights.
        log_dir: where checkpoints go (default ``logger.get_dir()``).
        handle_signals: catch SIGTERM/SIGUSR1 in :meth:`run_loop` to save and stop.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Iterator[Tuple[torch.Tensor, Dict[str, Any]]],
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: Any,
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str = "",
        use_fp16: bool = False,
        precision: Optional[str] = None,
        schedule_sampler: Any = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        max_steps: int = 0,
        max_nan_steps: int = 10,
        ema_warmup: bool = False,
        log_dir: Optional[str] = None,
        handle_signals: bool = True,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("log_interval", log_interval)):
            if value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if save_interval <= 0:
            raise ValueError(f"--save_interval must be positive, got {save_interval}")
        if lr <= 0:
            raise ValueError(f"--lr must be positive, got {lr}")
        for name, value in (("lr_anneal_steps", lr_anneal_steps), ("max_steps", max_steps)):
            if value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.max_nan_steps = max_nan_steps
        self.ema_warmup = ema_warmup
        self.handle_signals = handle_signals
        self.log_dir = log_dir or logger.get_dir()
        if self.log_dir is None:
            raise ValueError("TrainLoop needs a log directory: call logger.configure(dir) or pass log_dir=")
        if schedule_sampler is None:
            from .resample import UniformSampler

            schedule_sampler = UniformSampler(diffusion)
        self.schedule_sampler = schedule_sampler

        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.precision = resolve_precision(precision, use_fp16, self.device)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        self.world_size = dist_util.get_world_size()
        self.global_batch = batch_size * self.world_size

        self.step = 0  # completed steps, counting resumed ones
        self.nan_steps = 0  # skipped steps in total
        self.consecutive_nan_steps = 0
        self.last_saved_step: Optional[int] = None
        self._signal_received: Optional[int] = None
        self.params = list(model.parameters())

        ckpt = self._find_checkpoint(resume_checkpoint)
        if ckpt is not None:
            logger.log(f"resuming from {ckpt.model} (step {ckpt.step})")
            try:
                self.model.load_state_dict(dist_util.load_state_dict(ckpt.model, map_location=self.device))
            except RuntimeError as err:  # weights of another model: name the file, not 100 size mismatches
                lines = str(err).strip().splitlines()
                raise ValueError(
                    f"--resume_checkpoint {ckpt.model}: weights do not match the model of these flags "
                    f"({' '.join(line.strip() for line in lines[:2])})"
                ) from None
            self.step = ckpt.step
            self.last_saved_step = ckpt.step
        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())

        self.opt = make_optimizer(self.params, lr, weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema_params = [self._initial_ema(rate, ckpt) for rate in self.ema_rate]
        if ckpt is not None:
            self._load_opt_state(ckpt)

        if self.world_size > 1:
            self.ddp_model: torch.nn.Module = DDP(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = self.model

    # ---- resume -------------------------------------------------------------------------------------------

    def _find_checkpoint(self, resume_checkpoint: str) -> Optional[CheckpointSet]:
        if not resume_checkpoint:
            return None
        found: Any = None
        if dist_util.is_main_process():
            try:
                found = find_resume_checkpoint(resume_checkpoint, self.ema_rate)
            except (OSError, ValueError) as err:
                found = err
        found = dist_util.broadcast_object(found)
        if isinstance(found, Exception):
            raise found
        if found is None:
            logger.log(f"no complete checkpoint in {resume_checkpoint}; starting from scratch")
        return found

    def _initial_ema(self, rate: float, ckpt: Optional[CheckpointSet]) -> List[torch.Tensor]:
        if ckpt is not None and rate in ckpt.ema:
            state = dist_util.load_state_dict(ckpt.ema[rate], map_location=self.device)
            return [state[name].detach().clone().float() for name, _ in self.model.named_parameters()]
        if ckpt is not None:
            logger.warn(f"no EMA file for rate {rate} at step {ckpt.step}; EMA restarts from the model")
        return [p.detach().clone() for p in self.params]

    def _load_opt_state(self, ckpt: CheckpointSet) -> None:
        if ckpt.opt is None:
            logger.warn(f"no {opt_filename(ckpt.step)} beside {ckpt.model}: fresh optimizer state and RNG")
            return
        # CPU: the RNG states must stay CPU tensors; the optimizer moves its state to the parameters itself.
        state = dist_util.load_state_dict(ckpt.opt, map_location="cpu")
        if "optimizer" not in state:  # an upstream opt file holds only the optimizer state
            load_optimizer_state(self.opt, state)
            return
        load_optimizer_state(self.opt, state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nan_steps = int(state.get("nan_steps", 0))
        load_sampler_state(self.schedule_sampler, state.get("schedule_sampler"))
        rng = state.get("rng") or []
        if len(rng) == self.world_size:
            restore_rng_state(rng[dist_util.get_rank()])
        else:
            logger.warn(
                f"checkpoint RNG states are for {len(rng)} ranks, this run has {self.world_size}; "
                "RNG streams are not restored (seeds from the command line apply)"
            )

    # ---- the loop -----------------------------------------------------------------------------------------

    def _done(self) -> bool:
        return bool(
            (self.max_steps and self.step >= self.max_steps)
            or (self.lr_anneal_steps and self.step >= self.lr_anneal_steps)
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal_received = signum

    @contextlib.contextmanager
    def _signal_handlers(self):
        previous = {}
        if self.handle_signals:
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is None:
                    continue
                try:
                    previous[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread: leave signals alone
                    break
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run_loop(self) -> str:
        """Train until max_steps / lr_anneal_steps / the data ends / a signal; save at the end.

        Returns:
            Why it stopped: "max_steps", "lr_anneal_steps", "data_exhausted" or "signal".

        Raises:
            NonFiniteLossError: after ``max_nan_steps`` consecutive non-finite steps (nothing is saved then;
                the last checkpoint on disk is the last good one).
        """
        reason = "max_steps" if self.max_steps else "lr_anneal_steps"
        with self._signal_handlers():
            while not self._done():
                try:
                    batch, cond = next(self.data)
                except StopIteration:
                    reason = "data_exhausted"
                    break
                stop = self.run_step(batch, cond)
                if self.step % self.log_interval == 0:
                    logger.dumpkvs()
                if self.step % self.save_interval == 0:
                    if self.consecutive_nan_steps:
                        # Keep the last good checkpoint the newest one while the loss is non-finite.
                        logger.log(f"step {self.step}: not saving during a run of non-finite steps")
                    else:
                        self.save()
                if stop:
                    reason = "signal"
                    logger.log(f"received a stop signal; saving at step {self.step} and exiting")
                    break
            if self.last_saved_step != self.step:
                self.save()
        if self.step % self.log_interval != 0:
            logger.dumpkvs()
        logger.log(f"training stopped at step {self.step} ({reason})")
        return reason

    def run_step(self, batch: torch.Tensor, cond: Dict[str, Any]) -> bool:
        """One training step (counted even when skipped). Returns True if some rank got a stop signal."""
        records = self.forward_backward(batch, cond)
        bad_loss = not bool(torch.isfinite(torch.stack([r[1]["loss"].sum() for r in records])).all())
        # All ranks must agree on skipping (and on stopping) before anyone touches the optimizer or the
        # GradScaler, or their loss scales / weights would drift apart: one tiny all-reduce per step.
        flags = torch.tensor([float(bad_loss), float(self._signal_received is not None)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, stop = (bool(v) for v in flags.tolist())
        if bad_loss:
            self._skip_step()
        else:
            self.scaler.unscale_(self.opt)
            # Gradients are already averaged over ranks, so this norm (and the decision below) is the same
            # everywhere.
            grad_norm = float(total_norm([p.grad for p in self.params if p.grad is not None]))
            if not np.isfinite(grad_norm) and not self.scaler.is_enabled():
                # Outside fp16 a non-finite gradient is as bad as a non-finite loss. In fp16 it is an overflow
                # that the GradScaler handles (it skips the update and lowers the scale).
                self._skip_step()
            else:
                self.consecutive_nan_steps = 0
                self._optimize(records, grad_norm)
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("nan_steps", self.nan_steps)
        if self.max_nan_steps and self.consecutive_nan_steps >= self.max_nan_steps:
            logger.dumpkvs()
            last = (
                os.path.join(self.log_dir, model_filename(self.last_saved_step))
                if self.last_saved_step is not None
                else "none was saved"
            )
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: {self.consecutive_nan_steps} consecutive steps had a "
                f"non-finite loss or gradient (--max_nan_steps {self.max_nan_steps}); these steps did not "
                f"change the weights; last good checkpoint: {last}. "
                "Try a lower --lr, --precision fp32, or check the data."
            )
        return stop

    def forward_backward(
        self, batch: torch.Tensor, cond: Dict[str, Any]
    ) -> List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Accumulate gradients over microbatches.

        Returns:
            Per microbatch: (timesteps (b,), detached per-sample losses {key: (b,)}).
        """
        self.opt.zero_grad(set_to_none=True)
        n = batch.shape[0]
        records = []
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(self.device, non_blocking=True)
            micro_cond = {"y": cond["y"][i : i + self.microbatch].to(self.device)} if "y" in cond else {}
            last = i + self.microbatch >= n
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.ddp_model.no_sync()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
                # Weight by the microbatch's share so the gradient is the batch mean for any microbatch size.
                loss = (losses["loss"].float() * weights).mean() * (micro.shape[0] / n)
                self.scaler.scale(loss).backward()
            records.append((t, {k: v.detach().float() for k, v in losses.items()}))
        return records

    def _skip_step(self) -> None:
        # Only reached without a GradScaler unscale in this step, so the scaler needs no update.
        self.opt.zero_grad(set_to_none=True)
        self.nan_steps += 1
        self.consecutive_nan_steps += 1
        logger.log(
            f"step {self.step + 1}: non-finite loss or gradient; step skipped ({self.nan_steps} so far)"
        )

    def _optimize(
        self, records: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]], grad_norm: float
    ) -> None:
        self._anneal_lr()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        stepped = scale_before is None or self.scaler.get_scale() >= scale_before
        if stepped:
            self._update_ema()
        if hasattr(self.schedule_sampler, "update_with_local_losses"):
            for t, losses in records:
                self.schedule_sampler.update_with_local_losses(t, losses["loss"])
        ts = torch.cat([t for t, _ in records])
        log_loss_dict(self.diffusion, ts, {k: torch.cat([r[1][k] for r in records]) for k in records[0][1]})
        if np.isfinite(grad_norm):
            logger.logkv_mean("grad_norm", grad_norm)
        if (self.step + 1) % self.log_interval == 0:  # only on steps that are dumped: it costs a pass
            logger.logkv("param_norm", float(total_norm(self.params)))
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            logger.logkv("loss_scale", scale)
            logger.logkv("lg_loss_scale", math.log2(scale))  # upstream's key: it kept the scale as log2
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def _anneal_lr(self) -> None:
        if not self.lr_anneal_steps:
            return
        frac_done = self.step / self.lr_anneal_steps
        for group in self.opt.param_groups:
            group["lr"] = self.lr * (1 - frac_done)

    def _update_ema(self) -> None:
        for rate, ema in zip(self.ema_rate, self.ema_params):
            if self.ema_warmup:
                rate = min(rate, (1 + self.step) / (10 + self.step))
            # ema <- rate * ema + (1 - rate) * param
            torch._foreach_lerp_(ema, [p.detach() for p in self.params], 1.0 - rate)

    # ---- saving -------------------------------------------------------------------------------------------

    def _params_to_state_dict(self, params: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), params):
            state[name] = value.detach()
        return state

    def save(self) -> None:
        """Write model, EMA and (last) opt files for the current step; every rank must call it.

        Raises:
            CheckpointSaveError: on every rank when rank 0 could not write the set (one line naming the file;
                the incomplete set is removed, the previous complete set stays the newest).
        """
        rng_states = dist_util.all_gather_object(capture_rng_state())
        error = None
        if dist_util.is_main_process():
            try:
                write_checkpoint_set(
                    self.log_dir, self.step, self._checkpoint_files(rng_states), self.ema_rate
                )
            except Exception as err:  # report to the other ranks instead of leaving them in a barrier
                error = str(err)
                raise
            finally:
                dist_util.broadcast_object(error)
        else:
            error = dist_util.broadcast_object(None)
            if error is not None:
                raise CheckpointSaveError(f"rank 0 failed to save checkpoint set {self.step:06d}: {error}")
        self.last_saved_step = self.step

    def _checkpoint_files(self, rng_states: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
        """``(path, make_state)`` for each file of the current step's set, in writing order (opt last)."""

        def opt_state() -> Dict[str, Any]:
            return {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "step": self.step,
                "nan_steps": self.nan_steps,
                "precision": self.precision,
                "world_size": self.world_size,
                "schedule_sampler": sampler_state(self.schedule_sampler),
                "rng": rng_states,
            }

        files: List[Tuple[str, Any]] = [
            (os.path.join(self.log_dir, model_filename(self.step)), self.model.state_dict)
        ]
        for rate, params in zip(self.ema_rate, self.ema_params):
            path = os.path.join(self.log_dir, ema_filename(rate, self.step))
            files.append((path, lambda params=params: self._params_to_state_dict(params)))
        files.append((os.path.join(self.log_dir, opt_filename(self.step)), opt_state))
        return files
