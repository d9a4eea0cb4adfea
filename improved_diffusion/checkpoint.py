"""Checkpoint files of a training run: names, complete sets, atomic saves, resume, RNG state.

Upstream's names (``%06d`` = number of completed steps), written by rank 0 in this order, each atomically
(:func:`improved_diffusion.io_util.atomic_write`, fsynced):

- ``model%06d.pt``: the model's ``state_dict`` (fp32);
- ``ema_<rate>_%06d.pt``: the same with the EMA parameters, one per rate;
- ``opt%06d.pt``: ``{"optimizer", "scaler", "step", "rng" (one entry per rank), "nan_steps", ...}``.

The opt file comes last, so a set is complete exactly when its opt file exists; resuming from a directory
uses the newest complete set (:func:`find_resume_checkpoint`). RNG states are kept to plain types and
tensors, so checkpoints load with ``weights_only=True``.
"""

import contextlib
import errno
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import logger
from .io_util import atomic_write

CHECKPOINT_FORMAT_VERSION = 1
_OPT_RE = re.compile(r"^opt(\d{6,})\.pt$")
_MODEL_RE = re.compile(r"^model(\d{6,})\.pt$")


class CheckpointSaveError(OSError):
    """A checkpoint set could not be written (e.g. a full disk); the message is one line naming the file.

    The incomplete set is removed first, so the newest set on disk is the last complete one.
    """


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(err: BaseException) -> bool:
    """True if ``err`` or an exception it was raised from is ENOSPC / EDQUOT."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        err = err.__cause__ or err.__context__
    return False


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------------


def model_filename(step: int) -> str:
    return f"model{step:06d}.pt"


def ema_filename(rate: float, step: int) -> str:
    return f"ema_{rate}_{step:06d}.pt"


def opt_filename(step: int) -> str:
    return f"opt{step:06d}.pt"


def parse_resume_step_from_filename(filename: str) -> int:
    """Step encoded in a checkpoint name such as ``path/to/model000123.pt`` (upstream helper).

    Raises:
        ValueError: if the name has no trailing step number.
    """
    match = re.search(r"(\d+)\.pt$", os.path.basename(filename))
    if match is None:
        raise ValueError(f"checkpoint name {filename!r} does not end in <step>.pt")
    return int(match.group(1))


@dataclass
class CheckpointSet:
    """Paths of one checkpoint set; ``opt`` is None only for a bare model file given explicitly."""

    step: int
    model: str
    opt: Optional[str]
    ema: Dict[float, str] = field(default_factory=dict)


def _checkpoint_set(folder: str, step: int, ema_rates: Sequence[float], opt: Optional[str]) -> CheckpointSet:
    emas = {r: os.path.join(folder, ema_filename(r, step)) for r in ema_rates}
    return CheckpointSet(
        step=step,
        model=os.path.join(folder, model_filename(step)),
        opt=opt,
        ema={r: p for r, p in emas.items() if os.path.isfile(p)},
    )


def list_complete_checkpoints(log_dir: str, ema_rates: Sequence[float] = ()) -> List[CheckpointSet]:
    """Complete checkpoint sets (opt file + model file) in ``log_dir``, oldest first."""
    sets = []
    for name in os.listdir(log_dir):
        match = _OPT_RE.match(name)
        if match is None:
            continue
        step = int(match.group(1))
        if os.path.isfile(os.path.join(log_dir, model_filename(step))):
            sets.append(_checkpoint_set(log_dir, step, ema_rates, os.path.join(log_dir, name)))
    return sorted(sets, key=lambda s: s.step)


def find_resume_checkpoint(path: str, ema_rates: Sequence[float] = ()) -> Optional[CheckpointSet]:
    """Resolve ``--resume_checkpoint``: a model file, or a log directory (newest complete set).

    Args:
        path: ``.../model%06d.pt`` (its opt/EMA files beside it are used when present) or a directory.
        ema_rates: EMA rates whose files to look for.

    Returns:
        The checkpoint set, or None for a directory without a complete set (a fresh start).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is a file that is not named ``model<step>.pt``.
    """
    if os.path.isdir(path):
        sets = list_complete_checkpoints(path, ema_rates)
        return sets[-1] if sets else None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume_checkpoint {path}: no such file or directory")
    match = _MODEL_RE.match(os.path.basename(path))
    if match is None:
        raise ValueError(f"--resume_checkpoint {path}: expected a model<step>.pt file or a log directory")
    step = int(match.group(1))
    folder = os.path.dirname(os.path.abspath(path))
    opt = os.path.join(folder, opt_filename(step))
    ckpt = _checkpoint_set(folder, step, ema_rates, opt if os.path.isfile(opt) else None)
    ckpt.model = path
    return ckpt


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the target folder, fsync, then ``os.replace`` onto ``path``.

    A crash at any point leaves the old file or the complete new one under ``path``, never a partial one
    (:func:`improved_diffusion.io_util.atomic_write`).
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, fsync=True)


def write_checkpoint_set(
    log_dir: str, step: int, files: Sequence[Tuple[str, Callable[[], Any]]], ema_rates: Sequence[float] = ()
) -> None:
    """Write one set: ``files`` are ``(path, make_state)`` in writing order (the opt file last), each atomic.

    Raises:
        CheckpointSaveError: a file could not be written (one line naming it, whether the disk is full, and
            the newest complete set). All files of this step are removed first: saves happen only at steps
            not saved before, so they all belong to the failed set (a crash instead leaves them, and resuming
            ignores the set because its opt file is missing).
    """
    os.makedirs(log_dir, exist_ok=True)
    logger.log(f"saving checkpoint set {step:06d} to {log_dir}")
    for path, make_state in files:
        try:
            atomic_torch_save(make_state(), path)
        except Exception as err:
            for other, _ in files:
                with contextlib.suppress(OSError):
                    os.remove(other)
            raise CheckpointSaveError(_save_failure(log_dir, step, ema_rates, path, err)) from err


def _save_failure(log_dir: str, step: int, ema_rates: Sequence[float], path: str, err: BaseException) -> str:
    """The one-line message for a checkpoint set that could not be written at ``path``."""
    full = is_disk_full(err)
    what = "no space left on the device" if full else f"{type(err).__name__}: {err}"
    try:
        sets = list_complete_checkpoints(log_dir, ema_rates)
    except OSError:
        sets = []
    previous = (
        f"the newest complete set is {sets[-1].step:06d} ({sets[-1].model})" if sets else "no complete set"
    )
    return (
        f"cannot write checkpoint {path}: {what}; removed the incomplete set {step:06d}, "
        f"{previous}. {'Free space' if full else 'Fix that'}, then resume with --resume_checkpoint {log_dir}"
    ).replace("\n", " ")


def sampler_state(sampler: Any) -> Optional[Dict[str, torch.Tensor]]:
    """The loss history of a loss-aware schedule sampler (None for stateless samplers such as uniform)."""
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    if hasattr(sampler, "_loss_history") and hasattr(sampler, "_loss_counts"):
        return {
            "loss_history": torch.from_numpy(np.array(sampler._loss_history, dtype=np.float64)),
            "loss_counts": torch.from_numpy(np.array(sampler._loss_counts, dtype=np.int64)),
        }
    return None


def load_sampler_state(sampler: Any, state: Optional[Dict[str, torch.Tensor]]) -> None:
    """Inverse of :func:`sampler_state`; a state that does not fit (other sampler or steps) is ignored."""
    if state is None:
        return
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
    elif (
        hasattr(sampler, "_loss_history")
        and tuple(state["loss_history"].shape) == sampler._loss_history.shape
    ):
        sampler._loss_history[...] = state["loss_history"].numpy()
        sampler._loss_counts[...] = state["loss_counts"].numpy()
    else:
        logger.warn("the checkpoint's schedule-sampler state does not fit this sampler; it starts afresh")


# ----------------------------------------------------------------------------------------------------------
# RNG state (kept to plain types and tensors so checkpoints load with weights_only=True)
# ----------------------------------------------------------------------------------------------------------


def capture_rng_state() -> Dict[str, Any]:
    """This process's Python, numpy, torch CPU and (if present) current CUDA device RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA state is skipped when CUDA is absent)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
