"""The optimizer side of a training step: the training precision, fused AdamW and its resumed state, norms."""

from typing import Any, Dict, List, Optional

import torch

from . import logger

PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_precision(precision: Optional[str], use_fp16: bool, device: torch.device) -> str:
    """The precision to train in: ``precision`` if given, else fp16 when ``use_fp16``, else fp32.

    fp16 needs CUDA: on other devices this logs it once and returns fp32. bf16 runs under autocast on CUDA
    (if the GPU supports it) and on the CPU.

    Raises:
        ValueError: unknown precision, ``use_fp16`` with a different precision, bf16 on a GPU without it.
    """
    p = (precision or "").strip().lower()
    if p and p not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if use_fp16 and p not in ("", "fp16"):
        raise ValueError(f"--use_fp16 True conflicts with --precision {p} (use_fp16 is an alias for fp16)")
    p = p or ("fp16" if use_fp16 else "fp32")
    if p == "fp16" and device.type != "cuda":
        logger.log(f"fp16 mixed precision needs CUDA; training in fp32 on {device.type}")
        return "fp32"
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU does not support bfloat16 (use fp16 or fp32)")
    return p


def make_optimizer(params: List[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the device has one, else torch's default implementation.

    The fused kernel updates all parameters in one pass: on the CPU about 6x faster than the default
    per-tensor loop (about 4 % of a demo-model step), with the same result to float32 rounding.
    """
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused AdamW for these parameters' device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def load_optimizer_state(opt: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``opt.load_state_dict(state)`` that keeps ``opt``'s implementation (fused / foreach).

    A saved state carries the flags of the optimizer that wrote it (e.g. an upstream or older checkpoint:
    not fused); loading them as-is would silently switch this run back to the slower implementation.
    """
    flags = ("fused", "foreach")
    groups = [
        {**saved, **{k: current[k] for k in flags if k in current}}
        for saved, current in zip(state["param_groups"], opt.param_groups)
    ]
    opt.load_state_dict({**state, "param_groups": groups})


def total_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm over a list of tensors (0-dim float32 tensor on their device), in one fused pass."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)
