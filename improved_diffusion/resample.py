"""Timestep samplers for training: uniform, or importance sampling by the loss's second moment.

Importance sampling of t (Nichol & Dhariwal 2021, sec. 3.3) reduces the variance of the VLB
objective: p(t) is proportional to sqrt(E[L_t^2]) over the last few losses seen at each t.
"""

from abc import ABC, abstractmethod
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """A schedule sampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"schedule_sampler: unknown sampler {name!r} (expected 'uniform' or 'loss-second-moment')"
    )


class ScheduleSampler(ABC):
    """A distribution over timesteps used to draw t for the training loss, with unbiasing weights."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Non-negative (num_timesteps,) weights, proportional to the sampling probabilities."""

    def sample(self, batch_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps for a batch.

        Returns:
            indices: (batch_size,) long tensor of timesteps.
            weights: (batch_size,) float tensor 1 / (T p(t)) so that the weighted loss is unbiased.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1.0 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely."""

    def __init__(self, diffusion) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights depend on the losses seen so far."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's losses; when torch.distributed is initialized, gather every rank's first.

        Every rank must call this at the same point so the samplers stay identical. Ranks may have
        different batch sizes: batches are zero-padded to the largest and trimmed after the gather.

        Args:
            local_ts: (B,) timesteps of this rank's batch.
            local_losses: (B,) the corresponding losses.
        """
        if local_ts.shape != local_losses.shape or local_ts.dim() != 1:
            raise ValueError(
                f"update_with_local_losses: local_ts {tuple(local_ts.shape)} and local_losses "
                f"{tuple(local_losses.shape)} must be equal 1-D shapes"
            )
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.detach().tolist())
            return

        # NCCL can only gather CUDA tensors; gloo and mpi gather CPU tensors.
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        world = dist.get_world_size()
        local_n = torch.tensor([len(local_ts)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(local_n) for _ in range(world)]
        dist.all_gather(sizes, local_n)
        sizes_list = [int(s.item()) for s in sizes]
        max_n = max(sizes_list)

        def gather_padded(values: torch.Tensor, dtype: torch.dtype) -> List[torch.Tensor]:
            padded = torch.zeros(max_n, dtype=dtype, device=device)
            padded[: len(values)] = values.detach().to(device=device, dtype=dtype)
            out = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(out, padded)
            return out

        ts_batches = gather_padded(local_ts, torch.int64)
        loss_batches = gather_padded(local_losses, torch.float32)
        timesteps = [t for batch, n in zip(ts_batches, sizes_list) for t in batch[:n].tolist()]
        losses = [x for batch, n in zip(loss_batches, sizes_list) for x in batch[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: List[int], losses: List[float]) -> None:
        """Update the weights from all ranks' timesteps and losses (identical on every rank)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(mean of the last ``history_per_term`` squared losses at t).

    Uniform until every timestep has ``history_per_term`` losses (warm-up); afterwards a small
    ``uniform_prob`` is mixed in so every t keeps being visited.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        if history_per_term < 1:
            raise ValueError(
                f"LossSecondMomentResampler: history_per_term must be >= 1, got {history_per_term}"
            )
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(
                f"LossSecondMomentResampler: uniform_prob must lie in [0, 1], got {uniform_prob}"
            )
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        n = self.diffusion.num_timesteps
        if not self._warmed_up():
            return np.ones([n], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        total = np.sum(w)
        if not np.isfinite(total) or total <= 0:  # all-zero or broken history: fall back to uniform
            return np.ones([n], dtype=np.float64)
        return w / total * (1 - self.uniform_prob) + self.uniform_prob / n

    def update_with_all_losses(self, ts: List[int], losses: List[float]) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss (a sliding window of recent losses).
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
