"""Tests for improved_diffusion.resample (uniform and loss-second-moment timestep samplers)."""

import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def _diffusion(n=20):
    return SimpleNamespace(num_timesteps=n)


def test_uniform_sampler():
    sampler = create_named_schedule_sampler("uniform", _diffusion(20))
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    t, w = sampler.sample(64, torch.device("cpu"))
    assert t.shape == (64,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 20
    torch.testing.assert_close(w, torch.ones(64))


def test_unknown_sampler():
    with pytest.raises(ValueError, match="schedule_sampler"):
        create_named_schedule_sampler("importance", _diffusion())


def test_loss_second_moment_warms_up_then_non_uniform():
    n, hist = 10, 3
    sampler = LossSecondMomentResampler(_diffusion(n), history_per_term=hist, uniform_prob=0.001)
    assert isinstance(
        create_named_schedule_sampler("loss-second-moment", _diffusion(n)), LossSecondMomentResampler
    )
    losses = np.arange(1, n + 1, dtype=np.float64)  # loss grows with t
    for rep in range(hist):
        np.testing.assert_allclose(sampler.weights(), np.ones(n))  # uniform until every t has `hist` losses
        for t in range(n):
            if rep == hist - 1 and t == n - 1:
                break
            sampler.update_with_local_losses(torch.tensor([t]), torch.tensor([losses[t]]))
    np.testing.assert_allclose(sampler.weights(), np.ones(n))  # one entry still missing
    sampler.update_with_local_losses(torch.tensor([n - 1]), torch.tensor([losses[n - 1]]))

    w = sampler.weights()
    expected = losses / losses.sum() * (1 - 0.001) + 0.001 / n
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.random.seed(0)
    t, iw = sampler.sample(20000, torch.device("cpu"))
    counts = np.bincount(t.numpy(), minlength=n)
    assert counts[-1] > 5 * counts[0]  # non-uniform: large-loss steps drawn far more often
    p = w / w.sum()
    torch.testing.assert_close(iw, torch.from_numpy(1.0 / (n * p[t.numpy()])).float())
    assert abs(float(iw.mean()) - 1.0) < 0.05  # the importance weights keep the loss unbiased


def test_loss_history_is_a_sliding_window():
    sampler = LossSecondMomentResampler(_diffusion(2), history_per_term=2)
    sampler.update_with_all_losses([0, 0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0, 4.0])
    np.testing.assert_allclose(sampler._loss_history[0], [2.0, 3.0])
    np.testing.assert_allclose(sampler._loss_history[1], [4.0, 4.0])
    w = sampler.weights()
    rms = np.sqrt([(4 + 9) / 2, 16.0])
    np.testing.assert_allclose(w, rms / rms.sum() * 0.999 + 0.0005, rtol=1e-9)


def test_shape_mismatch_raises():
    sampler = LossSecondMomentResampler(_diffusion(4))
    with pytest.raises(ValueError, match="local_losses"):
        sampler.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0]))


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = LossSecondMomentResampler(_diffusion(4), history_per_term=2)
        # Unequal batch sizes per rank: 3 on rank 0, 1 on rank 1.
        if rank == 0:
            ts, losses = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
        else:
            ts, losses = torch.tensor([3]), torch.tensor([4.0])
        sampler.update_with_local_losses(ts, losses)
        np.save(os.path.join(result_dir, f"hist{rank}.npy"), sampler._loss_history)
        np.save(os.path.join(result_dir, f"count{rank}.npy"), sampler._loss_counts)
    finally:
        dist.destroy_process_group()


def test_update_synced_across_ranks_with_unequal_batches():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        for rank in (0, 1):
            hist = np.load(os.path.join(tmp, f"hist{rank}.npy"))
            counts = np.load(os.path.join(tmp, f"count{rank}.npy"))
            np.testing.assert_allclose(hist[:, 0], [1.0, 2.0, 3.0, 4.0])  # every rank saw all four losses
            np.testing.assert_array_equal(counts, [1, 1, 1, 1])  # and no padding entries
