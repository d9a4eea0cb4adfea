"""Tests for improved_diffusion.respace (space_timesteps, SpacedDiffusion, timestep mapping)."""

import numpy as np
import pytest
import torch

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.respace import SpacedDiffusion, space_timesteps


def _kwargs(schedule="linear", steps=1000, rescale_timesteps=False):
    return dict(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.RESCALED_MSE,
        rescale_timesteps=rescale_timesteps,
    )


def test_space_timesteps_single_section():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(10, "1") == {0}


def test_space_timesteps_sections():
    # 300 steps in three sections of 100; 10 evenly spaced from each section's first to last step.
    steps = space_timesteps(300, "10,10,10")
    expected = {start + 11 * j for start in (0, 100, 200) for j in range(10)}
    assert steps == expected
    assert space_timesteps(300, [10, 10, 10]) == expected
    # Unequal section sizes: 10 = 4 + 3 + 3, the remainder goes to the first section.
    assert space_timesteps(10, "4,3,3") == set(range(10))
    mixed = space_timesteps(300, "10,15,20")
    assert len(mixed) == 45
    assert len([s for s in mixed if s < 100]) == 10 and len([s for s in mixed if s >= 200]) == 20


def _upstream_rule(num_timesteps, counts):
    """Upstream improved-diffusion's documented respacing rule, written out independently.

    Equal sections (the first ``num_timesteps % len(counts)`` one step longer); in a section of ``size``
    steps, a float position starts at 0 and grows by ``(size - 1) / (count - 1)`` (1 for a count of 1)
    after each kept step; each position is rounded with Python's round (half to even).
    """
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    steps, start = set(), 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position = position + stride
        start += size
    return steps


def _upstream_ddim(num_timesteps, n):
    """Upstream's "ddimN": the smallest integer stride in [1, T) giving exactly N steps (None: no stride)."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == n:
            return set(range(0, num_timesteps, stride))
    return None


@pytest.mark.parametrize(
    "num_timesteps, spec, kept, dropped",
    [
        # 10 additions of 999 / 20 = 49.95 give 499.49999999999994 -> 499; 10 * 49.95 = 499.5 would give 500.
        (1000, "21", 499, 500),
        (1000, "23", 499, 500),  # 11 * 999 / 22 = 499.5
        (100, "15", 49, 50),  # 7 * 99 / 14 = 49.5
    ],
)
def test_space_timesteps_upstream_ties(num_timesteps, spec, kept, dropped):
    steps = space_timesteps(num_timesteps, spec)
    assert kept in steps and dropped not in steps
    assert len(steps) == int(spec)


@pytest.mark.parametrize("num_timesteps", [1000, 4000, 100, 7])
def test_space_timesteps_every_count_matches_upstream_rule(num_timesteps):
    mismatched = [
        c
        for c in range(1, num_timesteps + 1)
        if space_timesteps(num_timesteps, str(c)) != _upstream_rule(num_timesteps, [c])
    ]
    assert not mismatched, f"{len(mismatched)} section counts differ from upstream, e.g. {mismatched[:5]}"


@pytest.mark.parametrize(
    "num_timesteps, counts",
    [
        (300, [10, 15, 20]),
        (1000, [21, 23, 31]),
        (1001, [7, 300, 2]),
        (4000, [250, 31, 35, 1]),
        (7, [3, 2, 1]),
    ],
)
def test_space_timesteps_sections_match_upstream_rule(num_timesteps, counts):
    expected = _upstream_rule(num_timesteps, counts)
    assert space_timesteps(num_timesteps, ",".join(map(str, counts))) == expected
    assert space_timesteps(num_timesteps, counts) == expected


@pytest.mark.parametrize("num_timesteps", [1000, 100, 7])
def test_space_timesteps_ddim_matches_upstream_rule(num_timesteps):
    for n in range(2, num_timesteps + 1):
        expected = _upstream_ddim(num_timesteps, n)
        if expected is None:
            with pytest.raises(ValueError, match="stride"):
                space_timesteps(num_timesteps, f"ddim{n}")
        else:
            assert space_timesteps(num_timesteps, f"ddim{n}") == expected, n
    # Upstream tries strides up to T - 1 only and so refuses "ddim1"; here stride T keeps step 0 alone.
    assert _upstream_ddim(num_timesteps, 1) is None
    assert space_timesteps(num_timesteps, "ddim1") == {0}


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(100, "ddim100") == set(range(100))
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(10, "ddim7")  # no integer stride gives 7 of 10


@pytest.mark.parametrize("bad", ["abc", "ddimx", "0", "5,-1", ""])
def test_space_timesteps_bad_input(bad):
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(100, bad)


def test_space_timesteps_too_many():
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(30, "11,11,11")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["50", "ddim50", "10,20,5", "1000"])
def test_respaced_alphas_cumprod_match_base(schedule, spacing):
    base = gd.GaussianDiffusion(**_kwargs(schedule))
    use = space_timesteps(1000, spacing)
    spaced = SpacedDiffusion(use_timesteps=use, **_kwargs(schedule))
    assert spaced.timestep_map == sorted(use)
    assert spaced.num_timesteps == len(use)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-8)
    assert (spaced.betas > 0).all() and (spaced.betas < 1).all()


def test_wrapped_model_sees_base_timesteps():
    seen = []

    def model(x, t, **kwargs):
        seen.append((t.clone(), kwargs))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    x = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([0, 1, 4])
    use = space_timesteps(100, "5")
    spaced = SpacedDiffusion(use_timesteps=use, **_kwargs("cosine", 100))
    spaced.p_mean_variance(model, x, t, model_kwargs={"y": 1})
    assert seen[-1][0].tolist() == [spaced.timestep_map[i] for i in (0, 1, 4)]
    assert seen[-1][1] == {"y": 1}

    # rescale_timesteps: the model sees base timesteps scaled to [0, 1000).
    rescaled = SpacedDiffusion(use_timesteps=use, **_kwargs("cosine", 100, rescale_timesteps=True))
    rescaled.training_losses(model, x, t)
    expected = torch.tensor([rescaled.timestep_map[i] * 10.0 for i in (0, 1, 4)])
    torch.testing.assert_close(seen[-1][0], expected)
    assert seen[-1][0].dtype == torch.float32


def test_unspaced_rescale_matches_gaussian_diffusion():
    """With all steps kept, SpacedDiffusion behaves exactly like the base diffusion."""
    base = gd.GaussianDiffusion(**_kwargs("cosine", 50, rescale_timesteps=True))
    spaced = SpacedDiffusion(use_timesteps=range(50), **_kwargs("cosine", 50, rescale_timesteps=True))
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-10)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.cat([x * 0.3, torch.zeros_like(x)], dim=1)

    x = torch.randn(2, 2, 4, 4)
    t = torch.tensor([3, 40])
    a = base.p_mean_variance(model, x, t)
    b = spaced.p_mean_variance(model, x, t)
    torch.testing.assert_close(seen[0], seen[1])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_spaced_diffusion_bad_timesteps():
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion(use_timesteps=[0, 1000], **_kwargs())
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion(use_timesteps=[], **_kwargs())
